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

Fixed-capacity mode (decode): when the runner announces, through `begin_step`, that no rank
holds more than `max_tokens` tokens this step, and the experts run grouped, the exchange is the
one of `router/token_exchange.py`: each token travels at most once to each rank, in a row that
also carries its copies' slots and weights, C = max_tokens rows to every rank; one all-to-all
each way, sizes known without looking at the data. No host sync: the CPU keeps queueing work
ahead of the GPU, and the step can be captured in a CUDA graph.

All ranks see the same step plan, so they pick the same mode.

Redundant copies (EPLB, router/eplb.py): with `ReplicaTables` the key of step 1 is the physical
slot (rank * X + local slot) of one copy of the copy's expert in this MoE layer: copy
(token index + rank) mod copies, chosen on the device from tables that a rebalance overwrites in
place (a captured CUDA graph reads the new tables on its next replay).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.router import token_exchange
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


class ReplicaTables:
    """Per MoE layer, where each logical expert's copies are: device tensors that stay put (a
    rebalance `update`s them in place). Physical slot p = rank * S + local slot.

    copies_LEC: int64 [L, E, C], the physical slots of each expert's copies (past its count, the
    first again); num_copies_LE: int64 [L, E], its copies (>= 1)."""

    def __init__(self, layouts_LP, num_experts: int, max_copies: int, device) -> None:
        self.num_experts, self.max_copies = num_experts, max_copies
        copies, counts = self._tables(layouts_LP)
        self.copies_LEC = torch.tensor(copies, dtype=torch.int64, device=device)
        self.num_copies_LE = torch.tensor(counts, dtype=torch.int64, device=device)

    def _tables(self, layouts_LP):
        from expertmesh.router.eplb import replica_tables

        tables = [replica_tables(layout, self.num_experts, self.max_copies) for layout in layouts_LP]
        return [t[0] for t in tables], [t[1] for t in tables]

    def update(self, layouts_LP) -> None:
        copies, counts = self._tables(layouts_LP)
        self.copies_LEC.copy_(torch.tensor(copies, dtype=torch.int64))
        self.num_copies_LE.copy_(torch.tensor(counts, dtype=torch.int64))

    def physical_slots(self, layer: int, topk_ids_TK: torch.Tensor, rank: int) -> torch.Tensor:
        """[T*K] int64: the physical slot each routed copy goes to; no host sync."""
        T, K = topk_ids_TK.shape
        ids_N = topk_ids_TK.reshape(-1).long()
        token_N = torch.arange(T * K, device=ids_N.device) // K
        choice_N = (token_N + rank) % self.num_copies_LE[layer][ids_N]
        return self.copies_LEC[layer][ids_N, choice_N]


def plan_send(topk_ids_TK: torch.Tensor, owner_E: torch.Tensor, slot_E: torch.Tensor,
              num_ranks: int, max_slots: int, key_N: torch.Tensor | None = None) -> SendPlan:
    """`key_N`: the copies' physical slots when they are chosen already (`ReplicaTables`)."""
    ids_N = topk_ids_TK.reshape(-1)
    if key_N is None:
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
                 collective: AllToAll, timer: StageTimer | None = None, replicas: ReplicaTables | None = None) -> None:
        """`owner_E`, `slot_E`: each expert's rank and local slot; with `replicas` (redundant copies,
        per layer) they are unused and every rank holds `num_local_experts` slots."""
        rank = collective.rank
        super().__init__(torch.where(owner_E == rank, slot_E, -1))
        self.owner_E, self.slot_E = owner_E, slot_E
        self.num_local_experts = num_local_experts
        self.num_ranks = collective.world_size
        self.replicas = replicas
        self.max_slots = (num_local_experts if replicas is not None
                          else int(torch.bincount(owner_E, minlength=self.num_ranks).max()))
        self.collective = collective
        self.timer = timer
        self.capacity: int | None = None
        self.max_exchange_bytes = 256 << 20
        """The fixed-capacity exchange's cap on what one rank holds for one MoE layer."""
        self.row_plan = token_exchange.RowPlan(self.num_ranks, owner_E.device)
        self.slots_X1 = torch.arange(num_local_experts + 1, device=owner_E.device)
        self.supports_fixed_capacity = False
        """Set by the owner when the experts stop at the last valid row (grouped_mm)."""

    def begin_step(self, max_tokens_per_rank: int, top_k: int, *, hidden_size: int, dtype: torch.dtype) -> None:
        """Choose this step's mode from numbers every rank shares (the plan): fixed capacity when
        what the exchange holds (`token_exchange.exchange_bytes`) stays under `max_exchange_bytes`
        per rank (decode steps and short prefills), exact splits otherwise."""
        capacity = max_tokens_per_rank
        fits = (token_exchange.exchange_bytes(self.num_ranks, capacity, hidden_size, dtype, top_k)
                <= self.max_exchange_bytes)
        self.capacity = capacity if self.supports_fixed_capacity and fits and capacity > 0 else None

    def _exchange(self, output, input, output_splits=None, input_splits=None) -> None:
        def call():
            self.collective.all_to_all_single(output, input, output_splits, input_splits)
        if self.timer is None:
            call()
        else:
            self.timer.measure("all_to_all", call, input.device)

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 layer: int = 0) -> Dispatched:
        """`layer`: the MoE layer (its replica tables, with redundant copies)."""
        K = topk_ids_TK.shape[1]
        key_N = (None if self.replicas is None
                 else self.replicas.physical_slots(layer, topk_ids_TK, self.collective.rank))
        if self.capacity is not None:
            return self._dispatch_fixed(x_TD, topk_ids_TK, topk_weights_TK, key_N)
        send = plan_send(topk_ids_TK, self.owner_E, self.slot_E, self.num_ranks, self.max_slots, key_N)
        recv_counts_RX = torch.empty_like(send.counts_RX)
        self._exchange(recv_counts_RX, send.counts_RX)
        splits = torch.stack((send.counts_RX.sum(1), recv_counts_RX.sum(1))).tolist()  # the one host sync
        send_splits, recv_splits = splits
        x_send = x_TD.index_select(0, send.order_N // K)
        x_recv = x_TD.new_empty(sum(recv_splits), x_TD.shape[1])
        self._exchange(x_recv, x_send, recv_splits, send_splits)
        recv = plan_receive(recv_counts_RX, self.num_local_experts, x_recv.shape[0])
        handle = AllToAllHandle(send.order_N, topk_weights_TK, recv.perm_M, tuple(send_splits), tuple(recv_splits))
        return Dispatched(x_recv.index_select(0, recv.perm_M), recv.counts_E, recv.expert_M, handle)

    def _dispatch_fixed(self, x_TD, topk_ids_TK, topk_weights_TK, key_N) -> Dispatched:
        C = self.capacity
        if x_TD.shape[0] > C:
            raise ValueError(f"{x_TD.shape[0]} tokens on rank {self.collective.rank}, over this step's "
                             f"announced capacity of {C} (begin_step)")
        if key_N is None:
            dest_TK, slot_TK = self.owner_E[topk_ids_TK], self.slot_E[topk_ids_TK]
        else:
            key_TK = key_N.view(topk_ids_TK.shape)
            dest_TK, slot_TK = key_TK // self.max_slots, key_TK % self.max_slots
        sent = token_exchange.pack(x_TD, dest_TK, slot_TK, topk_weights_TK, self.row_plan, C)
        received = torch.empty_like(sent.block_MW)
        self._exchange(received, sent.block_MW)
        return token_exchange.unpack(received, x_TD.shape[1], x_TD.dtype, topk_ids_TK.shape[1],
                                     self.num_local_experts, sent, topk_weights_TK, self.slots_X1)

    def combine(self, y_ND: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        if isinstance(handle, token_exchange.CapacityHandle):
            partial_MD = token_exchange.partial_sums(y_ND, handle, handle.topk_weights_TK.shape[1])
            back_M1D = token_exchange.home_buffer(partial_MD)
            self._exchange(back_M1D[:-1], partial_MD)
            return token_exchange.gather_home(back_M1D, handle, y_ND.dtype)
        y_recv = torch.empty_like(y_ND).index_copy_(0, handle.perm_M, y_ND)
        y_back = y_ND.new_empty(sum(handle.send_splits), y_ND.shape[1])
        self._exchange(y_back, y_recv, list(handle.send_splits), list(handle.recv_splits))
        return super().combine(y_back, handle)
