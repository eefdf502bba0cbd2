"""Where the engine's files come from: the checkpoint directory and the tokenizer of a `ModelLoadConfig`."""
from __future__ import annotations

from pathlib import Path

from expertmesh.engine.config import ModelLoadConfig
from expertmesh.model.tokenizer import Tokenizer


def model_dir(load: ModelLoadConfig) -> Path:
    """The local checkpoint directory of `load.model`."""
    if load.model is None:
        from expertmesh.model.default import default_model_path

        return default_model_path()
    path = Path(load.model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {load.model!r} does not exist")
    return path


def load_tokenizer(load: ModelLoadConfig) -> Tokenizer:
    """The tokenizer of `load.tokenizer` (or of the model), with `load.chat_template` when given."""
    source = model_dir(ModelLoadConfig(load.tokenizer)) if load.tokenizer else model_dir(load)
    return Tokenizer.from_pretrained(source, chat_template=load.chat_template)
