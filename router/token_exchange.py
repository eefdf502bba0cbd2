"""The fixed-capacity exchange of decode steps: one all-to-all each way per MoE layer, each token
sent at most once to each rank, no size ever read on the host.

Legend: T tokens on this rank, K experts per token, R ranks, C capacity (rows per destination: the
most tokens any rank holds this step), X local slots per rank, D hidden, W bytes per sent row,
M = R*C rows received, N = M*K candidate copies.

    send (the token's home rank):
      1. dest_TK, slot_TK: the rank and local slot of each copy's expert (or of its chosen replica)
      2. sent_TR: token t has a copy on rank r; pos_TR: its row in r's block (a cumulative count)
      3. row (t, r) of the [R*C, W] byte block: the token's hidden state, then K int32 slot+1 and K
         float32 gate weights, of the copies that go to r (slot+1 = 0: copy k goes elsewhere).
         Rows no token fills stay zero, so they carry no copy.
      4. one all_to_all_single of the byte block (even splits)
    receive (the experts' rank):
      5. every (row, k) with slot+1 > 0 is a copy for that local slot: a stable sort by slot (empty
         ones get slot X and sort last) gives the grouped GEMM its rows and counts
    combine:
      6. each copy's result times its weight, in float32, summed per received row (the inverse
         permutation, then a sum over K): one partial sum per (token, rank)
      7. one all_to_all_single of the [R*C, D] float32 block back
      8. home: out_t = sum over r of partial[r, pos_TR[t, r]] where sent_TR, in float32, then cast

Compared with one row per copy (C = max tokens x K to every rank): K times fewer rows at most
(a token whose K experts sit on one rank travels once), the counts travel inside the rows instead
of in an all-to-all of their own, and the partial sums return in float32 (twice the bytes of
bf16) so that EP adds the copies in float32 as the local dispatcher does: greedy tokens equal EP=1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.router.dispatch import Dispatched, DispatchHandle

META_BYTES_PER_COPY = 8
"""int32 slot+1 and float32 weight."""


def row_layout(hidden: int, dtype: torch.dtype, top_k: int) -> tuple[int, int]:
    """(bytes of the hidden state, padded to 4; bytes of a whole row)."""
    hidden_bytes = -(-hidden * torch.empty((), dtype=dtype).element_size() // 4) * 4
    return hidden_bytes, hidden_bytes + META_BYTES_PER_COPY * top_k


def exchange_bytes(num_ranks: int, capacity: int, hidden: int, dtype: torch.dtype, top_k: int) -> int:
    """Bytes one rank sends in one MoE layer, out and back."""
    return num_ranks * capacity * (row_layout(hidden, dtype, top_k)[1] + 4 * hidden)


@dataclass(frozen=True)
class SentRows:
    block_MW: torch.Tensor
    """uint8 [R*C, W]: what this rank sends (row r*C + i goes to rank r)."""
    sent_TR: torch.Tensor
    """bool [T, R]: token t has at least one copy on rank r."""
    pos_TR: torch.Tensor
    """int64 [T, R]: the token's row in rank r's block (meaningful where sent_TR)."""


def pack(x_TD: torch.Tensor, dest_TK: torch.Tensor, slot_TK: torch.Tensor, weights_TK: torch.Tensor,
         num_ranks: int, capacity: int) -> SentRows:
    """Steps 1-3. Needs T <= capacity (the capacity is the most tokens any rank holds)."""
    T, K = dest_TK.shape
    D, R, C = x_TD.shape[1], num_ranks, capacity
    hidden_bytes, W = row_layout(D, x_TD.dtype, K)
    on_TKR = dest_TK.unsqueeze(-1) == torch.arange(R, device=dest_TK.device)
    sent_TR = on_TKR.any(dim=1)
    pos_TR = torch.cumsum(sent_TR, dim=0) - 1
    ranks_R = torch.arange(R, device=dest_TK.device)
    # Row of each (t, r) in the block; pairs that send nothing write into a spare last row.
    row_P = torch.where(sent_TR, ranks_R * C + pos_TR, R * C).reshape(-1)
    block = torch.zeros(R * C + 1, W, dtype=torch.uint8, device=x_TD.device)
    hidden_view = block[:, :hidden_bytes].view(x_TD.dtype)[:, :D]
    hidden_view.index_copy_(0, row_P, x_TD.unsqueeze(1).expand(T, R, D).reshape(T * R, D))
    on_TRK = on_TKR.transpose(1, 2)
    slots_TRK = torch.where(on_TRK, slot_TK.unsqueeze(1).to(torch.int32) + 1, 0)
    weights_TRK = torch.where(on_TRK, weights_TK.unsqueeze(1).float(), 0.0)
    block[:, hidden_bytes: hidden_bytes + 4 * K].view(torch.int32).index_copy_(0, row_P, slots_TRK.reshape(T * R, K))
    block[:, hidden_bytes + 4 * K:].view(torch.float32).index_copy_(0, row_P, weights_TRK.reshape(T * R, K))
    return SentRows(block[: R * C], sent_TR, pos_TR)


@dataclass(frozen=True)
class CapacityHandle(DispatchHandle):
    """What combine() needs: the receive side's permutation and weights, the send side's rows."""
    valid_N: torch.Tensor = None
    """bool [N]: the sorted row is a real copy."""
    weights_N: torch.Tensor = None
    """float32 [N]: its gate weight (0 for empty rows)."""
    sent: SentRows = None
    capacity: int = 0


def unpack(block_MW: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int, num_local_experts: int,
           sent: SentRows, topk_weights_TK: torch.Tensor, capacity: int) -> Dispatched:
    """Step 5: the received block's copies, sorted by local expert (empty ones last, expert X)."""
    K, X = top_k, num_local_experts
    hidden_bytes, _ = row_layout(hidden, dtype, K)
    hidden_MD = block_MW[:, :hidden_bytes].view(dtype)[:, :hidden]
    slots_N = block_MW[:, hidden_bytes: hidden_bytes + 4 * K].view(torch.int32).reshape(-1)
    weights_N = block_MW[:, hidden_bytes + 4 * K:].view(torch.float32).reshape(-1)
    key_N = torch.where(slots_N > 0, slots_N.long() - 1, X)
    expert_N, perm_N = torch.sort(key_N, stable=True)
    counts = torch.zeros(X + 1, dtype=torch.int64, device=block_MW.device)
    counts.index_add_(0, key_N, torch.ones_like(key_N))
    handle = CapacityHandle(perm_N, topk_weights_TK, expert_N < X, weights_N[perm_N], sent, capacity)
    return Dispatched(hidden_MD.index_select(0, perm_N // K), counts[:X], expert_N, handle)


def partial_sums(y_ND: torch.Tensor, handle: CapacityHandle, top_k: int) -> torch.Tensor:
    """Step 6: float32 [M, D], each received row's weighted sum of its copies' results (rows the
    experts skipped, past the last valid one, may hold anything: they are masked, not multiplied)."""
    weighted = torch.where(handle.valid_N[:, None], y_ND.float() * handle.weights_N[:, None], 0.0)
    unsorted = torch.empty_like(weighted).index_copy_(0, handle.order_N, weighted)
    return unsorted.view(-1, top_k, y_ND.shape[1]).sum(dim=1)


def gather_home(back_MD: torch.Tensor, handle: CapacityHandle, dtype: torch.dtype) -> torch.Tensor:
    """Step 8: [T, D] in `dtype`, each token's partial sums from the ranks it was sent to."""
    sent = handle.sent
    R = sent.sent_TR.shape[1]
    rows_TR = torch.arange(R, device=back_MD.device) * handle.capacity + sent.pos_TR.clamp(min=0)
    parts_TRD = back_MD.index_select(0, rows_TR.reshape(-1)).view(*rows_TR.shape, back_MD.shape[1])
    return torch.where(sent.sent_TR[..., None], parts_TRD, 0.0).sum(dim=1).to(dtype)
