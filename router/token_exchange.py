"""The fixed-capacity exchange of decode steps: one all-to-all each way per MoE layer, each token
sent at most once to each rank, no size ever read on the host.

Legend: T tokens on this rank, K experts per token, R ranks, C capacity (rows per destination: the
most tokens any rank holds this step), X local slots per rank, D hidden, W bytes per sent row,
M = R*C rows received, N = M*K candidate copies.

    send (the token's home rank):
      1. dest_TK, slot_TK: the rank and local slot of each copy's expert (or of its chosen replica)
      2. sent_TR: token t has a copy on rank r; pos_TR: its row in r's block (a cumulative count)
      3. row (t, r) of the [R*C, W] byte block: the token's hidden state, then K int32 slots and K
         float32 gate weights, of the copies that go to r (slot NONE: copy k goes elsewhere). The
         block starts filled with byte 0x7F, so rows no token fills read slot NONE too.
      4. one all_to_all_single of the byte block (even splits)
    receive (the experts' rank):
      5. every (row, k) whose slot is not NONE is a copy for that local slot: a stable sort by slot
         (NONE is the largest int32 of four equal bytes, so empty ones sort last; then clamped to X)
         gives the grouped GEMM its rows, and a searchsorted its counts
    combine:
      6. each copy's result times its weight, in float32, summed per received row (the inverse
         permutation, then a sum over K): one partial sum per (token, rank)
      7. one all_to_all_single of the [R*C, D] float32 block back
      8. home: out_t = sum over r of partial[row (t, r)], in float32, then cast (pairs that sent
         nothing read a zero row kept after the block)

Compared with one row per copy (C = max tokens x K to every rank): K times fewer rows at most
(a token whose K experts sit on one rank travels once), the counts travel inside the rows instead
of in an all-to-all of their own, and the partial sums return in float32 (twice the bytes of
bf16), so a token's copies are added in float32 as the local dispatcher adds them; only the
order of that sum differs (each rank's copies first), which moved 2 of 111,104 bf16 outputs by
one ulp in a four-rank probe and none at two ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.router.dispatch import Dispatched, DispatchHandle

META_BYTES_PER_COPY = 8
"""int32 slot and float32 weight."""
NONE = 0x7F7F7F7F
"""The slot of "no copy here": the int32 whose four bytes are the block's fill byte."""
FILL_BYTE = 0x7F


def row_layout(hidden: int, dtype: torch.dtype, top_k: int) -> tuple[int, int]:
    """(bytes of the hidden state, padded to 4; bytes of a whole row)."""
    hidden_bytes = -(-hidden * dtype.itemsize // 4) * 4
    return hidden_bytes, hidden_bytes + META_BYTES_PER_COPY * top_k


def exchange_bytes(num_ranks: int, capacity: int, hidden: int, dtype: torch.dtype, top_k: int) -> int:
    """Bytes one rank holds for one MoE layer's exchange: the blocks out and back, and on the
    receiving side the R*C*K candidate copies (in `dtype`, and once in float32 while they are
    weighted and summed)."""
    rows = num_ranks * capacity
    return rows * (row_layout(hidden, dtype, top_k)[1] + 4 * hidden) + rows * top_k * hidden * (2 * dtype.itemsize + 4)


@dataclass(frozen=True)
class SentRows:
    block_MW: torch.Tensor
    """uint8 [R*C, W]: what this rank sends (row r*C + i goes to rank r)."""
    row_TR: torch.Tensor
    """int64 [T, R]: the row of (token t, rank r) in the block, and of its partial sum in the block
    that comes back; R*C (the spare row) where t sends nothing to r."""


class RowPlan:
    """Per-capacity constants on the device (`rank * C - 1` for each rank): made once per capacity
    and kept, because a captured CUDA graph reads them at their first address."""

    def __init__(self, num_ranks: int, device) -> None:
        self.num_ranks = num_ranks
        self.ranks_R = torch.arange(num_ranks, device=device)
        self._bases: dict[int, torch.Tensor] = {}

    def base(self, capacity: int) -> torch.Tensor:
        """At most one small tensor per capacity a step announces (<= max_num_batched_tokens of them)."""
        if capacity not in self._bases:
            self._bases[capacity] = self.ranks_R * capacity - 1
        return self._bases[capacity]


def pack(x_TD: torch.Tensor, dest_TK: torch.Tensor, slot_TK: torch.Tensor, weights_TK: torch.Tensor,
         plan: RowPlan, capacity: int) -> SentRows:
    """Steps 1-3. Needs T <= capacity (the capacity is the most tokens any rank holds)."""
    T, K = dest_TK.shape
    D, R, C = x_TD.shape[1], plan.num_ranks, capacity
    hidden_bytes, W = row_layout(D, x_TD.dtype, K)
    on_TRK = dest_TK.unsqueeze(1) == plan.ranks_R[:, None]
    sent_TR = on_TRK.any(dim=2)
    row_TR = torch.where(sent_TR, plan.base(C) + torch.cumsum(sent_TR, dim=0), R * C)
    pieces = [x_TD.contiguous().view(torch.uint8).unsqueeze(1).expand(T, R, -1)]
    if hidden_bytes > pieces[0].shape[-1]:
        pieces.append(pieces[0].new_zeros(T, R, hidden_bytes - pieces[0].shape[-1]))
    slots_TRK = torch.where(on_TRK, slot_TK.to(torch.int32).unsqueeze(1), NONE)
    weights_TRK = on_TRK * weights_TK.float().unsqueeze(1)
    pieces += [slots_TRK.view(torch.uint8), weights_TRK.view(torch.uint8)]
    block = torch.full((R * C + 1, W), FILL_BYTE, dtype=torch.uint8, device=x_TD.device)
    block.index_copy_(0, row_TR.view(-1), torch.cat(pieces, dim=-1).view(T * R, W))
    return SentRows(block[: R * C], row_TR)


@dataclass(frozen=True)
class CapacityHandle(DispatchHandle):
    """What combine() needs: the receive side's permutation and weights, the send side's rows."""
    valid_N: torch.Tensor = None
    """bool [N]: the sorted row is a real copy."""
    weights_MK: torch.Tensor = None
    """float32 [M, K]: the received copies' gate weights, in the order they arrived (no copy: a
    finite number that multiplies a zero)."""
    sent: SentRows = None


def unpack(block_MW: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int, num_local_experts: int,
           sent: SentRows, topk_weights_TK: torch.Tensor, slots_X1: torch.Tensor) -> Dispatched:
    """Step 5: the received block's copies, sorted by local expert (empty ones last, expert X).
    `slots_X1`: int64 arange(X + 1) on the device (the dispatcher keeps one)."""
    K, X = top_k, num_local_experts
    hidden_bytes, _ = row_layout(hidden, dtype, K)
    hidden_MD = block_MW[:, : hidden * dtype.itemsize].view(dtype)
    slots_N = block_MW[:, hidden_bytes: hidden_bytes + 4 * K].view(torch.int32).reshape(-1)
    weights_MK = block_MW[:, hidden_bytes + 4 * K:].view(torch.float32)
    key_N, perm_N = torch.sort(slots_N, stable=True)
    expert_N = key_N.clamp_max(X).long()
    counts_E = torch.diff(torch.searchsorted(expert_N, slots_X1))
    handle = CapacityHandle(perm_N, topk_weights_TK, expert_N < X, weights_MK, sent)
    return Dispatched(hidden_MD.index_select(0, perm_N // K), counts_E, expert_N, handle)


def partial_sums(y_ND: torch.Tensor, handle: CapacityHandle, top_k: int) -> torch.Tensor:
    """Step 6: float32 [M, D], each received row's weighted sum of its copies' results. Rows the
    experts skipped (past the last valid one) may hold anything: they are zeroed, then put back in
    arrival order, both in the experts' dtype; one float32 pass weights and sums over K, in k order
    as `LocalDispatcher.combine` does."""
    masked = torch.where(handle.valid_N[:, None], y_ND, 0)
    arrived = torch.empty_like(masked).index_copy_(0, handle.order_N, masked)
    return (arrived.view(-1, top_k, y_ND.shape[1]).float() * handle.weights_MK[:, :, None]).sum(dim=1)


def home_buffer(partial_MD: torch.Tensor) -> torch.Tensor:
    """Where the partial sums come back: [M + 1, D] float32, its last row zero (the spare row)."""
    return torch.zeros(partial_MD.shape[0] + 1, partial_MD.shape[1], dtype=partial_MD.dtype,
                       device=partial_MD.device)


def gather_home(back_M1D: torch.Tensor, handle: CapacityHandle, dtype: torch.dtype) -> torch.Tensor:
    """Step 8: [T, D] in `dtype`, each token's partial sums from the ranks it was sent to."""
    row_TR = handle.sent.row_TR
    parts_TRD = back_M1D.index_select(0, row_TR.view(-1)).view(*row_TR.shape, back_M1D.shape[1])
    return parts_TRD.sum(dim=1).to(dtype)
