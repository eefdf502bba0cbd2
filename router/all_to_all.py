"""The all-to-all dispatcher: token copies travel to the ranks that own their experts and back.

Legend: T tokens on this rank, K experts per token, N = T*K copies sent, M copies received,
D hidden, R ranks, X = max experts per rank (local slots), E this rank's experts.

    dispatch:
      1. key of each copy = owner rank * X + local slot of its expert (the placement table);
         stable sort by key -> copies grouped by destination rank, and by expert inside each
      2. counts per (rank, slot) exchanged with one all_to_all_single   [R*X ints]
      3. one host sync: send and receive sizes per rank
      4. hidden rows exchanged with all_to_all_single (uneven splits)
      5. received rows come grouped by source rank; a stable sort by local slot regroups
         them by expert for the grouped GEMM
    combine:
      6. undo 5, send the rows back with the inverse all_to_all_single, and finish exactly as
         the local dispatcher does (unsort, weighted sum over K on the token's home rank)

A rank with no tokens still takes part in both exchanges (with zero rows). The collective is
handed in (`AllToAll`); this module never looks up a process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.router.dispatch import Dispatched, DispatchHandle, LocalDispatcher
from expertmesh.router.timing import StageTimer


class AllToAll(Protocol):
    """What the dispatcher needs of a collective (torch.distributed's signature)."""

    rank: int
    world_size: int

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None) -> None: ...


@dataclass(frozen=True)
class SendPlan:
    """Where each of this rank's copies goes (steps 1 and 2, before any communication)."""
    order_N: torch.Tensor
    """Flat copy index (t*K + k) of each row, in send order."""
    counts_RX: torch.Tensor
    """Copies for each (destination rank, local slot)."""


def plan_send(topk_ids_TK: torch.Tensor, owner_E: torch.Tensor, slot_E: torch.Tensor,
              num_ranks: int, max_slots: int) -> SendPlan:
    ids_N = topk_ids_TK.reshape(-1)
    key_N = owner_E[ids_N] * max_slots + slot_E[ids_N]
    _, order_N = torch.sort(key_N, stable=True)
    counts = torch.zeros(num_ranks * max_slots, dtype=torch.int64, device=ids_N.device)
    counts.index_add_(0, key_N, torch.ones_like(key_N))
    return SendPlan(order_N, counts.view(num_ranks, max_slots))


@dataclass(frozen=True)
class ReceivePlan:
    """How the received rows (grouped by source rank, then slot) are regrouped by local expert."""
    perm_M: torch.Tensor
    """Row of the received block that goes to position i of the expert-sorted block."""
    expert_M: torch.Tensor
    """Local expert of each row of the expert-sorted block (non-decreasing)."""
    counts_E: torch.Tensor
    """Rows per local expert."""


def plan_receive(recv_counts_RX: torch.Tensor, num_local_experts: int, num_rows: int) -> ReceivePlan:
    R, X = recv_counts_RX.shape
    slots = torch.arange(X, device=recv_counts_RX.device).repeat(R)
    slot_of_row = torch.repeat_interleave(slots, recv_counts_RX.reshape(-1), output_size=num_rows)
    expert_M, perm_M = torch.sort(slot_of_row, stable=True)
    return ReceivePlan(perm_M, expert_M, recv_counts_RX.sum(dim=0)[:num_local_experts])


@dataclass(frozen=True)
class AllToAllHandle(DispatchHandle):
    perm_M: torch.Tensor = None
    send_splits: tuple[int, ...] = ()
    recv_splits: tuple[int, ...] = ()


class AllToAllDispatcher(LocalDispatcher):
    def __init__(self, owner_E: torch.Tensor, slot_E: torch.Tensor, num_local_experts: int,
                 collective: AllToAll, timer: StageTimer | None = None) -> None:
        rank = collective.rank
        super().__init__(torch.where(owner_E == rank, slot_E, -1))
        self.owner_E, self.slot_E = owner_E, slot_E
        self.num_local_experts = num_local_experts
        self.num_ranks = collective.world_size
        self.max_slots = int(torch.bincount(owner_E, minlength=self.num_ranks).max())
        self.collective = collective
        self.timer = timer

    def _exchange(self, output, input, output_splits=None, input_splits=None) -> None:
        def call():
            self.collective.all_to_all_single(output, input, output_splits, input_splits)
        if self.timer is None:
            call()
        else:
            self.timer.measure("all_to_all", call, input.device)

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> Dispatched:
        K = topk_ids_TK.shape[1]
        send = plan_send(topk_ids_TK, self.owner_E, self.slot_E, self.num_ranks, self.max_slots)
        recv_counts_RX = torch.empty_like(send.counts_RX)
        self._exchange(recv_counts_RX, send.counts_RX)
        splits = torch.stack((send.counts_RX.sum(1), recv_counts_RX.sum(1))).tolist()  # the one host sync
        send_splits, recv_splits = splits
        x_send = x_TD[send.order_N // K]
        x_recv = x_TD.new_empty(sum(recv_splits), x_TD.shape[1])
        self._exchange(x_recv, x_send, recv_splits, send_splits)
        recv = plan_receive(recv_counts_RX, self.num_local_experts, x_recv.shape[0])
        handle = AllToAllHandle(send.order_N, topk_weights_TK, recv.perm_M, tuple(send_splits), tuple(recv_splits))
        return Dispatched(x_recv[recv.perm_M], recv.counts_E, recv.expert_M, handle)

    def combine(self, y_ND: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        y_recv = torch.empty_like(y_ND).index_copy_(0, handle.perm_M, y_ND)
        y_back = y_ND.new_empty(sum(handle.send_splits), y_ND.shape[1])
        self._exchange(y_back, y_recv, list(handle.send_splits), list(handle.recv_splits))
        return super().combine(y_back, handle)
