"""Top-k gating in one Triton kernel, beside gating.py (its oracle: `gate()`).

Legend: T tokens, E experts (global), K experts per token.

One program takes BLOCK_T tokens' E logits into registers (float32) and, for "softmax_topk",
turns them into probabilities over all E (Qwen: softmax, then top-k, optionally renormalised);
it then picks K times the largest remaining score (the lowest index among equal ones, never an
expert already taken, so ids are distinct even with ties or -inf logits), and for "topk_softmax"
(Mixtral's order) takes the softmax over the K chosen logits. Weights are float32; ids int64 as
torch.topk's, or int32 on request. No host sync; the grid depends only on T.

Expert-load counting rides along (`counts_E`): each chosen expert's counter gains one per copy
(or the copy's weight from `copy_weights_N`: a CUDA graph's padding rows weigh 0) by integer
atomics, so the totals are exact and the same whatever the programs' order, and the MoE block
needs no separate `index_add_` per layer (router/stats.py `ExpertLoadStats.record` is the
reference the tests hold it to).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh.experts.triton_pdl import pdl, pdl_wait

SCORINGS = ("softmax_topk", "topk_softmax")


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, copy_weights_ptr, T, E, stride_lt,
                         TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                         SOFTMAX_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
                         COUNT: tl.constexpr, COPY_WEIGHTS: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
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
    if COUNT:
        if COPY_WEIGHTS:
            add = tl.load(copy_weights_ptr + out, mask=out_ok, other=0).to(counts_ptr.dtype.element_ty)
        else:
            add = tl.full([BLOCK_T, K_PAD], 1, dtype=counts_ptr.dtype.element_ty)
        tl.atomic_add(counts_ptr + chosen, add, mask=out_ok & (add != 0), sem="relaxed")


def topk_softmax_triton(logits_TE: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax_topk", *,
                        ids_dtype: torch.dtype = torch.int64, counts_E: torch.Tensor | None = None,
                        copy_weights_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE (any float dtype, last dim contiguous) -> (topk_weights_TK float32, topk_ids_TK),
    with `gate()`'s semantics: "softmax_topk" (softmax over E, top-k, renormalised when asked) or
    "topk_softmax" (top-k logits, softmax over them; `renormalize` is implied).

    counts_E: int64 or int32 [E] on the logits' device (e.g. one layer's row of
    `ExpertLoadStats.counts_LE`): every chosen expert's counter is incremented in place, by 1 per
    copy, or by `copy_weights_N[t*K + k]` (int [T*K]) when given."""
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
    if counts_E is not None:
        if counts_E.shape != (E,) or counts_E.dtype not in (torch.int64, torch.int32) or counts_E.stride(0) != 1:
            raise ValueError(f"counts_E must be a contiguous int64/int32 [{E}], got {tuple(counts_E.shape)} "
                             f"{counts_E.dtype}")
        if copy_weights_N is not None and (copy_weights_N.shape != (T * top_k,) or copy_weights_N.is_floating_point()):
            raise ValueError(f"copy_weights_N must be an integer [{T * top_k}] (T*K), got "
                             f"{tuple(copy_weights_N.shape)} {copy_weights_N.dtype}")
    elif copy_weights_N is not None:
        raise ValueError("copy_weights_N weighs the counts of counts_E: give counts_E too")
    E_PAD = triton.next_power_of_2(E)
    # Up to 1,024 experts a program is one warp on one row: its reductions over E are warp shuffles,
    # with no shared-memory round trips (H200, 128 experts: 1.8 us a call at T = 1; one warp on 8
    # rows took 6.6, 4 warps on one row 2.9 in the eager profile).
    block_t = 1 if E_PAD <= 1024 else max(1, min(16, 4096 // E_PAD, triton.next_power_of_2(T)))
    count, weigh, on = counts_E is not None, copy_weights_N is not None, pdl(logits_TE.device)
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, weights, ids, counts_E if count else ids, copy_weights_N.contiguous() if weigh else ids,
        T, E, logits_TE.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=E_PAD, BLOCK_T=block_t,
        SOFTMAX_FIRST=scoring == "softmax_topk", RENORMALIZE=renormalize, COUNT=count, COPY_WEIGHTS=weigh,
        PDL=on, num_warps=1 if block_t * E_PAD <= 1024 else 4, launch_pdl=bool(on))
    return weights, ids
