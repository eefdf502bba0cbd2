"""Where the engine's files come from: the checkpoint directory and the tokenizer of a `ModelLoadConfig`.

Every process that reads the files calls these (the driver, each Ray rank on its own node): a local
directory is used as it is, a Hugging Face repo id is fetched into that node's Hugging Face cache once
(model/hub.py) and read from there afterwards.
"""
from __future__ import annotations

from pathlib import Path

from expertmesh.engine.config import ModelLoadConfig
from expertmesh.model.hub import CHECKPOINT_FILES, CONFIG_FILES, TOKENIZER_FILES, checkpoint_dir
from expertmesh.model.tokenizer import Tokenizer


def model_dir(load: ModelLoadConfig) -> Path:
    """The local checkpoint directory of `load.model` (None: the embedded default model); dummy weights
    fetch no weight files."""
    if load.model is None:
        from expertmesh.model.default import default_model_path

        return default_model_path()
    files = CONFIG_FILES if load.load_format == "dummy" else CHECKPOINT_FILES
    return checkpoint_dir(load.model, revision=load.revision, download_dir=load.download_dir, files=files)


def load_tokenizer(load: ModelLoadConfig) -> Tokenizer:
    """The tokenizer of `load.tokenizer` (or of the model), with `load.chat_template` when given."""
    if load.tokenizer:
        source = checkpoint_dir(load.tokenizer, download_dir=load.download_dir, files=TOKENIZER_FILES)
    else:
        source = model_dir(load)
    return Tokenizer.from_pretrained(source, chat_template=load.chat_template)
