"""expertmesh: serve sparse Mixture-of-Experts models of the Qwen3-MoE family.

    from expertmesh import LLM, SamplingParams

The names are imported on first use, so `import expertmesh` (and the CLI's --help) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from expertmesh.engine.sampling_params import SamplingParams
    from expertmesh.gateway.llm import LLM


def __getattr__(name: str):
    if name == "LLM":
        from expertmesh.gateway.llm import LLM
        return LLM
    if name == "SamplingParams":
        from expertmesh.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'expertmesh' has no attribute {name!r}")
