"""The embedded default model: a small random-weight Qwen3-MoE checkpoint, made on first use.

`default_model_path()` builds it with `make_tiny` (deterministic, about 5 MB) into a temporary
sibling folder and renames that into place, so a process never sees a half-written model and two
processes racing to create it both end up with the same complete folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .tiny import make_tiny

DEFAULT_MODEL_NAME = "tiny-qwen3-moe-v1"
"""Change the version suffix whenever DEFAULT_MODEL_ARGS (or make_tiny's output) changes."""
DEFAULT_MODEL_ARGS = {
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


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the default model, created on first use.

    `cache_dir` is the model folder itself; None means
    `~/.cache/expertmesh/models/tiny-qwen3-moe-v1`. An existing complete folder is reused as is.
    """
    target = Path(cache_dir) if cache_dir is not None else (
        Path.home() / ".cache" / "expertmesh" / "models" / DEFAULT_MODEL_NAME)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_tiny(staging, **DEFAULT_MODEL_ARGS)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)  # atomic; replaces an empty folder (POSIX rename)
        except OSError:
            if not _is_complete(target):  # not a lost race: something else is in the way
                raise ValueError(f"{target} exists but does not hold the default model") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
