"""Top-k gating in one Triton kernel, beside gating.py (its oracle: `gate()`).

Legend: T tokens, E experts (global), K experts per token.

One program takes BLOCK_T tokens' E logits into registers (float32) and, for "softmax_topk",
turns them into probabilities over all E (Qwen: softmax, then top-k, optionally renormalised);
it then picks K times the largest remaining score (the lowest index among equal ones, never an
expert already taken, so ids are distinct even with ties or -inf logits), and for "topk_softmax"
(Mixtral's order) takes the softmax over the K chosen logits. Weights are float32; ids int64 as
torch.topk's, or int32 on request. No host sync; the grid depends only on T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORINGS = ("softmax_topk", "topk_softmax")


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_lt,
                         TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                         SOFTMAX_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    safe_rows = tl.minimum(rows, T - 1)  # rows past T repeat the last one: no -inf rows, no NaN
    logits = tl.load(logits_ptr + safe_rows.to(tl.int64)[:, None] * stride_lt + cols[None, :],
                     mask=col_ok[None, :], other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
    else:
        scores = logits
    taken = (cols[None, :] >= E) | (safe_rows[:, None] < 0)
    kcols = tl.arange(0, K_PAD)
    values = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32) + float("-inf")
    chosen = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(tl.where(taken, float("-inf"), scores), axis=1)
        candidate = (scores == best[:, None]) & ~taken
        index = tl.min(tl.where(candidate, cols[None, :], E_PAD), axis=1)
        taken = taken | (cols[None, :] == index[:, None])
        values = tl.where(kcols[None, :] == k, best[:, None], values)
        chosen = tl.where(kcols[None, :] == k, index[:, None], chosen)
    k_ok = kcols[None, :] < TOP_K
    if SOFTMAX_FIRST:
        if RENORMALIZE:
            values = values / tl.sum(tl.where(k_ok, values, 0.0), axis=1)[:, None]
    else:
        exps = tl.where(k_ok, tl.exp(values - tl.max(values, axis=1)[:, None]), 0.0)
        values = exps / tl.sum(exps, axis=1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & k_ok
    tl.store(weights_ptr + out, values, mask=out_ok)
    tl.store(ids_ptr + out, chosen.to(ids_ptr.dtype.element_ty), mask=out_ok)


def topk_softmax_triton(logits_TE: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax_topk", *,
                        ids_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE (any float dtype, last dim contiguous) -> (topk_weights_TK float32, topk_ids_TK),
    with `gate()`'s semantics: "softmax_topk" (softmax over E, top-k, renormalised when asked) or
    "topk_softmax" (top-k logits, softmax over them; `renormalize` is implied)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    T, E = logits_TE.shape
    if not 0 < top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if logits_TE.stride(-1) != 1:
        logits_TE = logits_TE.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    ids = torch.empty(T, top_k, dtype=ids_dtype, device=logits_TE.device)
    if T == 0:
        return weights, ids
    E_PAD = triton.next_power_of_2(E)
    block_t = max(1, min(16, 4096 // E_PAD, triton.next_power_of_2(T)))
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, weights, ids, T, E, logits_TE.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=E_PAD, BLOCK_T=block_t,
        SOFTMAX_FIRST=scoring == "softmax_topk", RENORMALIZE=renormalize, num_warps=4)
    return weights, ids
