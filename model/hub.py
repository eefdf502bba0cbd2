"""Checkpoints by name: a local directory, or a Hugging Face repo id fetched into the Hugging Face cache.

    checkpoint_dir("/models/Qwen3-30B-A3B")   a directory that exists wins, as it is
    checkpoint_dir("Qwen/Qwen3-30B-A3B")      the repo's snapshot: downloaded once (with a progress bar)
                                              into the Hugging Face cache ($HF_HOME/hub, or download_dir),
                                              then read from there; only the files the engine reads

`huggingface_hub` honours its environment itself: HF_HUB_OFFLINE=1 (only the cache is read), HF_HOME,
HF_TOKEN, HF_ENDPOINT. It is imported only when a repo id is given.
"""
from __future__ import annotations

import re
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""What model/tokenizer.py reads (vocab.json and merges.txt: tokenizers of older checkpoints)."""
CONFIG_FILES = ("config.json", *TOKENIZER_FILES)
"""A checkpoint without its weights (load_format dummy)."""
CHECKPOINT_FILES = (*CONFIG_FILES, "*.safetensors", "*.safetensors.index.json")
"""Everything the engine reads of a checkpoint; never *.bin, *.pth or *.gguf copies of the weights."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_repo_id(name: str) -> bool:
    """`org/name` as the Hub spells repo ids (no `--` or `..`, no leading `-` or `.`)."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith((".", "-"))


def checkpoint_dir(name: str, *, revision: str | None = None, download_dir: str | None = None,
                   files: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    """The local directory of checkpoint `name`: the directory itself, or the snapshot of Hugging Face
    repo `name` at `revision` (default: main) holding `files` (glob patterns), downloaded when it is
    not cached. ValueError with what to do when neither exists, or when offline and not cached."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(name):
        raise ValueError(f"model directory {name!r} does not exist (and it is not a Hugging Face repo id, org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = download_dir or constants.HF_HUB_CACHE
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=download_dir, allow_patterns=list(files)))
    except GatedRepoError:
        raise ValueError(f"Hugging Face repo {name!r} is gated: accept its terms on huggingface.co, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model {name!r} is neither a local directory nor a Hugging Face repo (a private repo "
                         "needs `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"Hugging Face repo {name!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ValueError(f"model {name!r}{at} is not in the Hugging Face cache ({cache}) and {why}: download it "
                         "once where the Hub can be reached, or give a local directory") from None
