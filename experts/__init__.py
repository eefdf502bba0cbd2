"""The experts of one rank and the grouped-GEMM paths that run them (imports nothing of ours)."""
from expertmesh.experts.grouped import EXPERT_IMPLS, Experts

__all__ = ["EXPERT_IMPLS", "Experts"]
