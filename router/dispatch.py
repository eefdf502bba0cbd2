"""Dispatch and combine: move token copies to their experts and bring the results home.

Legend: T tokens, K experts per token, N = T*K token copies, D hidden, E local experts.

Contract (torchtitan's): `dispatch()` returns the copies sorted by local expert, the count per
local expert and a frozen `DispatchHandle`; the experts run on exactly those rows; `combine()`
takes the rows back in the same order and returns the gate-weighted sum per token, [T, D].

    x_TD, topk_ids_TK, topk_weights_TK
        │ 1. map global expert ids to local slots (placement table)
        │ 2. stable sort of the N copies by local expert  -> order_N
        ▼
    x_sorted_ND = x_TD[order_N // K], counts_E
        │ experts (grouped GEMM)
        ▼
    y_sorted_ND ──3. unsort (y_NK[order_N] = y_sorted)──4. weighted sum over K──▶ out_TD

The local dispatcher serves EP=1 and is the oracle; the all-to-all dispatcher extends it by
exchanging rows between ranks between steps 2 and the experts (and back before step 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchHandle:
    """What combine() needs to undo dispatch(). order_N: flat copy index (t*K + k) of each sorted row."""

    order_N: torch.Tensor
    topk_weights_TK: torch.Tensor


@dataclass(frozen=True)
class Dispatched:
    x_ND: torch.Tensor
    """Token copies sorted by local expert."""
    counts_E: torch.Tensor
    """Rows per local expert (int64, sums to N)."""
    expert_N: torch.Tensor
    """The local expert of each row (non-decreasing)."""
    handle: DispatchHandle


class LocalDispatcher:
    """All experts live on this rank. `expert_to_local_E` maps global expert id -> local slot."""

    def __init__(self, expert_to_local_E: torch.Tensor) -> None:
        self.expert_to_local_E = expert_to_local_E
        self.num_local_experts = int(expert_to_local_E.max()) + 1 if expert_to_local_E.numel() else 0

    @classmethod
    def identity(cls, num_experts: int, device: torch.device | str = "cpu") -> LocalDispatcher:
        return cls(torch.arange(num_experts, device=device))

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 layer: int = 0) -> Dispatched:
        """`layer`: the MoE layer (one table serves every layer here)."""
        K = topk_ids_TK.shape[1]
        local_N = self.expert_to_local_E[topk_ids_TK.reshape(-1)]
        expert_N, order_N = torch.sort(local_N, stable=True)
        if local_N.is_cuda:  # bincount sizes its output from the data, so on a GPU it waits for it
            counts_E = torch.zeros(self.num_local_experts, dtype=torch.int64, device=local_N.device)
            counts_E.index_add_(0, local_N, torch.ones_like(local_N))
        else:
            counts_E = torch.bincount(local_N, minlength=self.num_local_experts)
        return Dispatched(x_TD.index_select(0, order_N // K), counts_E, expert_N,
                          DispatchHandle(order_N, topk_weights_TK))

    def combine(self, y_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        T, K = handle.topk_weights_TK.shape
        y_unsorted = torch.empty_like(y_ND).index_copy_(0, handle.order_N, y_ND)
        weighted = y_unsorted.view(T, K, y_ND.shape[1]).float() * handle.topk_weights_TK[:, :, None]
        return weighted.sum(dim=1).to(y_ND.dtype)
