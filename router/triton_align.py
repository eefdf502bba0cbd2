"""Alignment of token copies to expert blocks in three Triton kernels, no host sync.

The arithmetic and the names are router/align.py's (its reference is the oracle). The copies are
cut into P chunks, one program each, so the work spreads over the GPU without atomics and the
order inside a bucket stays the copy order (deterministic, equal to a stable sort):

    1. count:   program p histograms its chunk's buckets          -> hist_PB      (B = E+1 buckets)
    2. plan:    one program sums the histograms, pads each bucket to BM rows, takes prefix sums
                -> num_padded, block_bucket, the sentinel N in every padding row, and for each
                chunk and bucket the row where the chunk's first copy of that bucket goes -> start_PB
    3. scatter: program p places its copies: start_PB[p, bucket] + rank among the chunk's earlier
                copies of the same bucket                          -> sorted_ids

A chunk is processed SUB copies at a time as a [SUB, buckets] one-hot tile (a cumulative sum down
its columns gives each copy's rank); chunks hold several SUB steps when N is large, so that P
stays near 256 and the single planning program reads little.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh.router.align import AlignedBlocks, max_blocks

MAX_PROGRAMS = 256
TILE_ELEMENTS = 8192
"""Elements of the one-hot and histogram tiles (int32): 64 registers a thread at 4 warps."""


@triton.jit
def _bucket_of(ids_ptr, map_ptr, offs, num_copies, num_experts, HAS_MAP: tl.constexpr):
    inside = offs < num_copies
    expert = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int32)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=inside & (expert >= 0), other=-1).to(tl.int32)
    bucket = tl.where((expert >= 0) & (expert < num_experts), expert, num_experts)
    return tl.where(inside, bucket, -1)  # -1: past the last copy, in no bucket


@triton.jit
def _align_count_kernel(ids_ptr, map_ptr, hist_ptr, num_copies, num_experts, num_sub,
                        HAS_MAP: tl.constexpr, SUB: tl.constexpr, B_PAD: tl.constexpr):
    p = tl.program_id(0)
    cols = tl.arange(0, B_PAD)
    counts = tl.zeros([B_PAD], dtype=tl.int32)
    for s in range(num_sub):
        offs = (p * num_sub + s) * SUB + tl.arange(0, SUB)
        bucket = _bucket_of(ids_ptr, map_ptr, offs, num_copies, num_experts, HAS_MAP)
        counts += tl.sum((bucket[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + p * (num_experts + 1) + cols, counts, mask=cols <= num_experts)


@triton.jit
def _align_plan_kernel(hist_ptr, start_ptr, sorted_ids_ptr, block_bucket_ptr, num_padded_ptr,
                       num_copies, num_experts, num_programs, num_blocks,
                       BLOCK_M: tl.constexpr, B_PAD: tl.constexpr, P_TILE: tl.constexpr,
                       J_TILE: tl.constexpr, BB_TILE: tl.constexpr):
    cols = tl.arange(0, B_PAD)
    col_ok = cols <= num_experts
    width = num_experts + 1
    counts = tl.zeros([B_PAD], dtype=tl.int32)
    for p0 in range(0, num_programs, P_TILE):
        prow = p0 + tl.arange(0, P_TILE)
        tile_ptrs = hist_ptr + prow[:, None] * width + cols[None, :]
        counts += tl.sum(tl.load(tile_ptrs, mask=(prow[:, None] < num_programs) & col_ok[None, :], other=0), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    tl.store(num_padded_ptr + 1, tl.sum(tl.where(cols < num_experts, padded, 0), axis=0))

    # Where each chunk's copies of each bucket begin: the bucket's start plus earlier chunks' counts.
    carry = starts
    for p0 in range(0, num_programs, P_TILE):
        prow = p0 + tl.arange(0, P_TILE)
        mask = (prow[:, None] < num_programs) & col_ok[None, :]
        tile = tl.load(hist_ptr + prow[:, None] * width + cols[None, :], mask=mask, other=0)
        before = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(start_ptr + prow[:, None] * width + cols[None, :], before, mask=mask)
        carry += tl.sum(tile, axis=0)

    # Padding rows of each bucket read as "no copy".
    sentinel = tl.zeros([B_PAD, J_TILE], dtype=tl.int32) + num_copies
    for j0 in tl.static_range(0, BLOCK_M, J_TILE):
        j = j0 + tl.arange(0, J_TILE)
        pad_ok = col_ok[:, None] & (j[None, :] < (padded - counts)[:, None])
        tl.store(sorted_ids_ptr + (starts + counts)[:, None] + j[None, :], sentinel, mask=pad_ok)

    # Bucket of each block: how many buckets end at or before its first row.
    for b0 in range(0, num_blocks, BB_TILE):
        b = b0 + tl.arange(0, BB_TILE)
        ended = (ends[None, :] <= (b * BLOCK_M)[:, None]) & col_ok[None, :]
        tl.store(block_bucket_ptr + b, tl.sum(ended.to(tl.int32), axis=1), mask=b < num_blocks)


@triton.jit
def _align_scatter_kernel(ids_ptr, map_ptr, start_ptr, sorted_ids_ptr, num_copies, num_experts, num_sub,
                          HAS_MAP: tl.constexpr, SUB: tl.constexpr, B_PAD: tl.constexpr):
    p = tl.program_id(0)
    cols = tl.arange(0, B_PAD)
    carry = tl.load(start_ptr + p * (num_experts + 1) + cols, mask=cols <= num_experts, other=0)
    for s in range(num_sub):
        offs = (p * num_sub + s) * SUB + tl.arange(0, SUB)
        bucket = _bucket_of(ids_ptr, map_ptr, offs, num_copies, num_experts, HAS_MAP)
        onehot = (bucket[:, None] == cols[None, :]).to(tl.int32)
        row = tl.sum((tl.cumsum(onehot, axis=0) - onehot + carry[None, :]) * onehot, axis=1)
        tl.store(sorted_ids_ptr + row, offs, mask=offs < num_copies)
        carry += tl.sum(onehot, axis=0)


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def align_blocks(ids_N: torch.Tensor, num_experts: int, block_m: int,
                 expert_to_local_E: torch.Tensor | None = None) -> AlignedBlocks:
    """ids_N: int32/int64 [N], the expert of each copy (global ids when expert_to_local_E maps them
    to local slots, -1 for experts not on this rank). Sizes depend only on N, E and BM."""
    ids_N = ids_N.reshape(-1)
    N, E, device = ids_N.numel(), num_experts, ids_N.device
    if block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M must be a power of two, got {block_m}")
    B_PAD = triton.next_power_of_2(E + 1)
    sub = max(16, min(128, _pow2_at_most(TILE_ELEMENTS // B_PAD)))
    num_sub = triton.cdiv(triton.cdiv(max(N, 1), sub), MAX_PROGRAMS)
    P = triton.cdiv(max(N, 1), sub * num_sub)
    B = max_blocks(N, E, block_m)
    hist = torch.empty(P, E + 1, dtype=torch.int32, device=device)
    starts = torch.empty_like(hist)
    sorted_ids = torch.empty(B * block_m, dtype=torch.int32, device=device)
    block_bucket = torch.empty(B, dtype=torch.int32, device=device)
    num_padded = torch.empty(2, dtype=torch.int32, device=device)
    mapping = expert_to_local_E if expert_to_local_E is not None else ids_N
    has_map = expert_to_local_E is not None
    _align_count_kernel[(P,)](ids_N, mapping, hist, N, E, num_sub, HAS_MAP=has_map, SUB=sub, B_PAD=B_PAD)
    tile = max(1, _pow2_at_most(TILE_ELEMENTS // B_PAD))
    _align_plan_kernel[(1,)](hist, starts, sorted_ids, block_bucket, num_padded, N, E, P, B,
                             BLOCK_M=block_m, B_PAD=B_PAD, P_TILE=min(64, tile), J_TILE=min(block_m, tile),
                             BB_TILE=max(16, min(256, tile)))
    _align_scatter_kernel[(P,)](ids_N, mapping, starts, sorted_ids, N, E, num_sub,
                                HAS_MAP=has_map, SUB=sub, B_PAD=B_PAD)
    return AlignedBlocks(sorted_ids, block_bucket, num_padded, block_m, N)
