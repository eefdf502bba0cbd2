"""Gating, dispatch/combine and expert-load statistics."""
from expertmesh.router.dispatch import Dispatched, DispatchHandle, LocalDispatcher
from expertmesh.router.gating import GateConfig, gate, softmax_topk, topk_softmax
from expertmesh.router.stats import ExpertLoadStats

__all__ = [
           "DispatchHandle",
           "Dispatched",
           "ExpertLoadStats",
           "GateConfig",
           "LocalDispatcher",
           "gate",
           "softmax_topk",
           "topk_softmax",
]
