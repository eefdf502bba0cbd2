"""The embedded default model, and the random tiny model tests use.

The default is the trained demo model (`demo/`, DESIGN.md's demo section): a small Qwen3-MoE
checkpoint shipped as package data in `expertmesh/demo/checkpoint/`. `model` may not import
`demo`, so the folder is found by path: this file's package folder's parent (the import package
`expertmesh`, whose `demo` is a symlink in a checkout and a real folder in a wheel) holds
`demo/checkpoint`. `default_model_path()` copies it into a cache folder once, so the path a Serve
config names is the same on every node and never points into one node's site-packages.

`tiny_model_path()` builds the random-weight model of `make_tiny` (deterministic, about 5 MB):
the model tests use where they need random weights (outputs that run to max_tokens, say).

Both write into a temporary sibling folder and rename that into place, so a process never sees a
half-written model and two processes racing to create it both end up with the same complete folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .tiny import make_tiny

DEFAULT_MODEL_NAME = "demo-qwen3-moe-v3"
"""Change the version suffix whenever the shipped checkpoint changes."""
SHIPPED_MODEL_DIR = Path(__file__).parent.parent / "demo" / "checkpoint"
"""The demo checkpoint inside the installed package (DESIGN.md: how the default is found)."""
TINY_MODEL_NAME = "tiny-qwen3-moe-v1"
"""Change the version suffix whenever TINY_MODEL_ARGS (or make_tiny's output) changes."""
TINY_MODEL_ARGS = {
    "model_type": "qwen3_moe",
    "num_layers": 4,
    "num_experts": 8,
    "top_k": 2,
    "hidden_size": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 32,
    "moe_intermediate_size": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "dtype": "float32",
    "seed": 0,
    "num_shards": 2,
}
_REQUIRED_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _models_dir() -> Path:
    return Path.home() / ".cache" / "expertmesh" / "models"


def _materialize(target: Path, fill: Callable[[Path], object], what: str) -> Path:
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(staging)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)  # atomic; replaces an empty folder (POSIX rename)
        except OSError:
            if not _is_complete(target):  # not a lost race: something else is in the way
                raise ValueError(f"{target} exists but does not hold the {what}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy_shipped(staging: Path) -> None:
    if not _is_complete(SHIPPED_MODEL_DIR):
        raise FileNotFoundError(f"the demo checkpoint is missing from the package ({SHIPPED_MODEL_DIR}); "
                                "reinstall expertmesh, or train it: python -m expertmesh.demo.train")
    for file in sorted(SHIPPED_MODEL_DIR.iterdir()):
        if file.is_file():
            shutil.copyfile(file, staging / file.name)


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the default (trained demo) model, copied from the package on first use.

    `cache_dir` is the model folder itself; None means `~/.cache/expertmesh/models/demo-qwen3-moe-v3`.
    An existing complete folder is reused as is.
    """
    target = Path(cache_dir) if cache_dir is not None else _models_dir() / DEFAULT_MODEL_NAME
    return _materialize(target, _copy_shipped, "default model")


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the random-weight tiny model (`make_tiny(**TINY_MODEL_ARGS)`), built on first use.

    `cache_dir` is the model folder itself; None means `~/.cache/expertmesh/models/tiny-qwen3-moe-v1`.
    """
    target = Path(cache_dir) if cache_dir is not None else _models_dir() / TINY_MODEL_NAME
    return _materialize(target, lambda staging: make_tiny(staging, **TINY_MODEL_ARGS), "tiny model")
