"""Token copies aligned to expert blocks: the permutation the blocked grouped GEMM reads.

Legend: T tokens, K experts per token, N = T*K token copies (copy c = t*K + k), E local experts,
BM rows per block (BLOCK_M), B blocks (static bound), M = B*BM padded rows.

Every copy falls in a bucket: its local expert, or bucket E, the zero bucket, when its expert is
not on this rank (placement-table entry -1) or its id is past the last local expert (the padding
rows of the fixed-capacity all-to-all). The GEMM kernels write zeros for the zero bucket's copies
and never read weights for it, so the combine can sum all K copies of a token without a mask.

    bucket_N ─1. count per bucket────────────────────────▶ counts_E1          (E+1 buckets)
             ─2. pad each count to a multiple of BM, prefix sum ─▶ starts, num_padded
             ─3. place copies by bucket, in copy order within a bucket ─▶ sorted_ids_M
    sorted_ids_M[m]   = copy at padded row m, or N for a padding row
    block_bucket_B[b] = bucket of rows b*BM .. b*BM+BM-1; E+1 for blocks at or past num_padded/BM
    num_padded[0]     = padded rows in use (a multiple of BM)
    num_padded[1]     = padded rows of the local experts: the zero bucket's rows start here

The grid of the GEMMs must not depend on the data, so B is a static bound: a bucket with c copies
needs ceil(c/BM) blocks, which is at most c and at most (c + BM - 1)/BM, so over the E+1 buckets
B <= min(N, (N + (E+1)(BM-1)) // BM). Blocks past num_padded exit at once.

Worked example: E = 2, BM = 4, buckets of copies 0..4 = [1, 0, 1, 2, 1] (copy 3 not local), N = 5:
counts [1, 3, 1] -> padded [4, 4, 4], starts [0, 4, 8], num_padded [12, 8];
sorted_ids = [1, 5, 5, 5 | 0, 2, 4, 5 | 3, 5, 5, 5]; block_bucket = [0, 1, 2] (B = min(5, 14 // 4) = 3).

`align_blocks_reference` below is the plain-torch oracle of this arithmetic (it syncs, sorts and
loops freely); `router/triton_align.py` computes the same tensors in three kernels without a
host sync, and tests hold the two equal element for element.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedBlocks:
    sorted_ids_M: torch.Tensor
    """int32 [B*BM]: copy index at each padded row; N marks padding. Rows at or past num_padded
    are unspecified in the kernel's output."""
    block_bucket_B: torch.Tensor
    """int32 [B]: local expert of each block; E for the zero bucket; E+1 past the rows in use."""
    num_padded: torch.Tensor
    """int32 [2]: padded rows in use, and of those the local experts' (the zero bucket's rows
    follow them); on the device: the GEMMs read it, the host never does."""
    block_m: int
    num_copies: int


def max_blocks(num_copies: int, num_experts: int, block_m: int) -> int:
    """Static bound on blocks for N copies over E experts plus the zero bucket."""
    return min(num_copies, (num_copies + (num_experts + 1) * (block_m - 1)) // block_m)


def copy_buckets(ids_N: torch.Tensor, num_experts: int, expert_to_local_E: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket of each copy: its local expert, or num_experts (the zero bucket)."""
    expert_N = ids_N.long()
    if expert_to_local_E is not None:
        expert_N = expert_to_local_E.long()[expert_N]
    return torch.where((expert_N >= 0) & (expert_N < num_experts), expert_N, num_experts)


def align_blocks_reference(ids_N: torch.Tensor, num_experts: int, block_m: int,
                           expert_to_local_E: torch.Tensor | None = None) -> AlignedBlocks:
    """ids_N: expert of each copy (global ids where expert_to_local_E maps them to local slots)."""
    N, E = ids_N.numel(), num_experts
    bucket_N = copy_buckets(ids_N.reshape(-1), E, expert_to_local_E)
    counts = torch.bincount(bucket_N, minlength=E + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order_N = torch.sort(bucket_N, stable=True).indices
    sorted_bucket_N = bucket_N[order_N]
    rank_N = torch.arange(N, device=ids_N.device) - (torch.cumsum(counts, 0) - counts)[sorted_bucket_N]
    B = max_blocks(N, E, block_m)
    sorted_ids = torch.full((B * block_m,), N, dtype=torch.int32, device=ids_N.device)
    sorted_ids[starts[sorted_bucket_N] + rank_N] = order_N.to(torch.int32)
    block_rows = torch.arange(B, device=ids_N.device) * block_m
    block_bucket = ((starts + padded)[None, :] <= block_rows[:, None]).sum(1).to(torch.int32)
    num_padded = torch.stack([padded.sum(), padded[:E].sum()]).to(torch.int32)
    return AlignedBlocks(sorted_ids, block_bucket, num_padded, block_m, N)
