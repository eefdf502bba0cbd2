"""Triton paged attention: decode and chunked prefill read K/V through the block table where they lie.

Legend as in model/paged_attention.py (T rows, H/G heads, QPK = H/G, d, N blocks of S slots, I items,
J merge groups, R partial rows). Imported only where CUDA is present (tests import it with
TRITON_INTERPRET=1 on the CPU); the plan, the device copy and the reference live in
model/paged_attention.py, which imports no Triton.

Kernel rows: a program takes one work item (a tile of BLOCK_Q queries of one sequence) and one KV
head g; its BLOCK_M rows are (query r // QPK, query head g*QPK + r % QPK), so the K/V tile is read
once for the QPK query heads that share it. Per program:
  1. keys [lo, hi) any row may see (causal, window, the item's split range), and the inner range
     [lo_all, hi_all) every row sees in full;
  2. an unmasked loop over the BLOCK_N-key tiles inside [lo_all, hi_all) (the bulk of a long
     context), then one masked loop over the tiles at the edges (the causal diagonal, the window's
     start, a ragged end), online softmax in float32 with exp2, accumulation by tl.dot in float32;
  3. the normalised output and log-sum-exp to `out`/`lse`, or, for a piece of a split tile, to the
     workspace; the tile's last piece to finish (a counter per tile and KV head, which it resets)
     then folds all of them by log-sum-exp (`_merge_tile`) into `out`/`lse`.
Empty ranges give lse = -inf and output 0 (never NaN), in the kernel and in the merge.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from expertmesh.experts.triton_pdl import pdl, pdl_wait
from expertmesh.model.paged_attention import AttentionConfig, AttentionPlanTensors, attention_config

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionWorkspace:
    """Partial results of split tiles: normalised outputs [R, d] and their log2-sum-exp [R], float32;
    and the pieces-done counters of the split tiles (int32 [R], zero between launches: one per
    tile and KV head, at the row of its first piece). Allocate once from the largest plan's
    `partial_rows` (a capacity plan's is fixed)."""

    part_out_Rd: torch.Tensor
    part_lse_R: torch.Tensor
    pieces_done_R: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, head_dim: int, device: torch.device | str) -> AttentionWorkspace:
        rows = max(int(rows), 1)
        return cls(torch.empty(rows, head_dim, dtype=torch.float32, device=device),
                   torch.empty(rows, dtype=torch.float32, device=device),
                   torch.zeros(rows, dtype=torch.int32, device=device))


@triton.jit
def _tile(items_ptr, item_cap, item, query_start_ptr, seq_lens_ptr, window,
          HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, VOLATILE: tl.constexpr):
    """A work item's sequence, queries and key ranges: any row sees keys [lo, hi); tiles
    [t_lo, t_hi) hold them, of which [u0, u1) every row sees whole (tiles aligned to BLOCK_N)."""
    seq = tl.load(items_ptr + item, volatile=VOLATILE)
    qoff = tl.load(items_ptr + item_cap + item, volatile=VOLATILE)
    nq = tl.load(items_ptr + 2 * item_cap + item, volatile=VOLATILE)
    kv0 = tl.load(items_ptr + 3 * item_cap + item, volatile=VOLATILE)
    kv1 = tl.load(items_ptr + 4 * item_cap + item, volatile=VOLATILE)
    q_start = tl.load(query_start_ptr + seq, volatile=VOLATILE)
    q_len = tl.load(query_start_ptr + seq + 1, volatile=VOLATILE) - q_start
    pos0 = tl.load(seq_lens_ptr + seq, volatile=VOLATILE) - q_len + qoff  # position of the tile's first query
    lo = kv0
    lo_all = kv0
    if HAS_WINDOW:
        lo = tl.maximum(kv0, pos0 - window + 1)
        lo_all = tl.maximum(kv0, pos0 + nq - window)
    hi = tl.minimum(kv1, pos0 + nq)
    hi_all = tl.minimum(kv1, pos0 + 1)
    t_lo = lo // BLOCK_N
    t_hi = tl.where(hi > lo, tl.cdiv(hi, BLOCK_N), t_lo)
    u0 = tl.minimum(tl.maximum(tl.cdiv(lo_all, BLOCK_N), t_lo), t_hi)
    u1 = tl.maximum(tl.minimum(hi_all // BLOCK_N, t_hi), u0)
    return seq, qoff, nq, q_start, pos0, lo, hi, t_lo, t_hi, u0, u1


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, done_ptr,
    block_table_ptr, seq_lens_ptr, query_start_ptr, items_ptr, count_ptr, groups_ptr,
    item_cap, group_cap, qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_bt, stride_kv_c, stride_kv_n, stride_kv_s, stride_kv_g,
    G: tl.constexpr, QPK: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    PREFILL: tl.constexpr,
):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    item = pid // G
    g = pid % G
    if item >= tl.load(count_ptr):
        return
    seq, qoff, nq, q_start, pos0, lo, hi, t_lo, t_hi, u0, u1 = _tile(
        items_ptr, item_cap, item, query_start_ptr, seq_lens_ptr, window, HAS_WINDOW, BLOCK_N, False)
    prow = tl.load(items_ptr + 5 * item_cap + item)  # >= 0: a piece of a split tile (its partial rows)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    qi = offs_m // QPK
    head = g * QPK + offs_m % QPK
    t_rows = (q_start + qoff + qi).to(tl.int64)
    q = tl.load(q_ptr + t_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=(qi < nq)[:, None], other=0.0)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_base = kv_ptr + g.to(tl.int64) * stride_kv_g
    v_base = k_base + stride_kv_c

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # 2a. tiles every row sees whole: no mask at all.
    for j in range(u0, u1):
        k_pos = j * BLOCK_N + offs_n
        if BLOCK_N >= S and PREFILL:  # the tile's BLOCK_N // S block numbers, each spread over its S slots
            tile_blk = tl.load(bt_row + j * (BLOCK_N // S) + tl.arange(0, BLOCK_N // S)).to(tl.int64)
            blk = tl.reshape(tl.broadcast_to(tile_blk[:, None], (BLOCK_N // S, S)), (BLOCK_N,))
        else:
            blk = tl.load(bt_row + k_pos // S).to(tl.int64)
        kv_off = blk[:, None] * stride_kv_n + (k_pos % S)[:, None] * stride_kv_s + offs_d[None, :]
        k = tl.load(k_base + kv_off)
        v = tl.load(v_base + kv_off)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    if PREFILL:
        # A prefill tile's loop above holds nearly every register it has (at 4 warps: S, P and the
        # accumulator): the item is read again rather than kept live through it (volatile: not
        # merged with the first read; only `prow`, one scalar, stays). A decode tile keeps it all:
        # reading it again, or the block numbers by tile, measured slower there.
        seq, qoff, nq, q_start, pos0, lo, hi, t_lo, t_hi, u0, u1 = _tile(
            items_ptr, item_cap, item, query_start_ptr, seq_lens_ptr, window, HAS_WINDOW, BLOCK_N, True)
        offs_m = tl.arange(0, BLOCK_M)
        qi = offs_m // QPK
        bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    qpos = pos0 + qi

    # 2b. edge tiles [t_lo, u0) and [u1, t_hi): keys outside the range are neither loaded nor seen.
    n_front = u0 - t_lo
    for t in range(0, n_front + t_hi - u1):
        j = tl.where(t < n_front, t_lo + t, u1 + t - n_front)
        k_pos = j * BLOCK_N + offs_n
        k_ok = (k_pos >= lo) & (k_pos < hi)
        blk = tl.load(bt_row + k_pos // S, mask=k_ok, other=0).to(tl.int64)
        kv_off = blk[:, None] * stride_kv_n + (k_pos % S)[:, None] * stride_kv_s + offs_d[None, :]
        k = tl.load(k_base + kv_off, mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_off, mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = k_ok[None, :] & (k_pos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok = ok & (k_pos[None, :] > qpos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet stays at 0
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    # 3. normalise; log2-sum-exp, -inf for an empty row.
    head = g * QPK + offs_m % QPK
    row_ok = qi < nq
    t_rows = (q_start + qoff + qi).to(tl.int64)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    if prow < 0:
        tl.store(out_ptr + t_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            tl.store(lse_ptr + t_rows * stride_lt + head * stride_lh, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        rows = (prow + g * BLOCK_M + offs_m).to(tl.int64)
        tl.store(part_out_ptr + rows[:, None] * D + offs_d[None, :], o)
        tl.store(part_lse_ptr + rows, lse2)
        # The tile's last piece to finish merges them all (no merge kernel to launch and wait for).
        grp = tl.load(items_ptr + 6 * item_cap + item)
        prow0 = tl.load(groups_ptr + 3 * group_cap + grp)
        nsplit = tl.load(groups_ptr + 4 * group_cap + grp)
        counter = done_ptr + prow0 + g * BLOCK_M
        tl.debug_barrier()  # every thread's partial rows are written before the piece counts itself done
        if tl.atomic_add(counter, 1, sem="acq_rel") == nsplit - 1:  # acquire: the other pieces' rows
            _merge_tile(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, t_rows, head, row_ok, prow0, nsplit, g,
                        stride_ot, stride_oh, stride_lt, stride_lh, G, D, BLOCK_M, STORE_LSE)
            tl.atomic_xchg(counter, 0, sem="relaxed")  # zero again for the next launch


@triton.jit
def _merge_tile(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, t_rows, head, row_ok, prow0, nsplit, g,
                stride_ot, stride_oh, stride_lt, stride_lh,
                G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, STORE_LSE: tl.constexpr):
    """One split tile x one KV head: fold its pieces' outputs by their log-sum-exp."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for s in range(0, nsplit):
        rows = (prow0 + (s * G + g) * BLOCK_M + offs_m).to(tl.int64)
        lse_s = tl.load(part_lse_ptr + rows)
        o_s = tl.load(part_out_ptr + rows[:, None] * D + offs_d[None, :])
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_use)
        w = tl.exp2(lse_s - m_use)
        acc = acc * a[:, None] + o_s * w[:, None]
        l_sum = l_sum * a + w
        m = m_new
    seen = l_sum > 0.0
    l_safe = tl.where(seen, l_sum, 1.0)
    tl.store(out_ptr + t_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        lse2 = tl.where(seen, m + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + t_rows * stride_lt + head * stride_lh, lse2 * 0.6931471805599453, mask=row_ok)


@functools.lru_cache(maxsize=64)
def _config(kind: str, head_dim: int, qpk: int, device_name: str | None) -> AttentionConfig:
    return attention_config(kind, head_dim, qpk, device_name)


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def paged_attention(
    q_THd: torch.Tensor, kv_2NSGd: torch.Tensor, block_table_BM: torch.Tensor, seq_lens_B: torch.Tensor,
    query_start_B1: torch.Tensor, plan_tensors: AttentionPlanTensors, *, scale: float,
    sliding_window: int | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    workspace: AttentionWorkspace | None = None, return_lse: bool = True,
    configs: dict[str, AttentionConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of the step's query rows over their sequences' cached keys.

    q_THd [T, H, d] (any float dtype equal to the cache's; rows contiguous in d); kv_2NSGd
    [2, N, S, G, d] contiguous, this step's K/V already written; block_table_BM int32 [B, M];
    seq_lens_B int32 [B] (context after this step); query_start_B1 int32 [B+1]; plan_tensors the
    step's plan on the device (`AttentionPlanBuffers.upload`), planned with the same window.
    Returns out_THd (q's dtype; `out` if given) and lse_TH (float32, natural log; `lse` if given;
    None when return_lse is False). workspace: partial results of split tiles, required when the
    plan splits and it is captured in a CUDA graph (allocated here otherwise). configs: per kind
    ("decode", "prefill") tile settings; default from the configs table for this device.
    No host sync; the grid depends only on the plan's caps, so a capacity plan's launch captures.
    """
    plan = plan_tensors.plan
    T, H, d = q_THd.shape
    _, _, S, G, d_kv = kv_2NSGd.shape
    if plan.num_q_heads != H or plan.num_kv_heads != G or d != d_kv:
        raise ValueError(f"q {tuple(q_THd.shape)} and cache {tuple(kv_2NSGd.shape)} do not match the plan's "
                         f"{plan.num_q_heads}/{plan.num_kv_heads} heads")
    if q_THd.dtype != kv_2NSGd.dtype:
        raise ValueError(f"q is {q_THd.dtype} but the cache is {kv_2NSGd.dtype}")
    if out is not None and (out.dtype != q_THd.dtype or out.shape != q_THd.shape):
        # a float32 `out` beside bf16 q measured wrong outputs at 64/4 heads on the H200 (LSE right)
        raise ValueError(f"out must be q's shape and dtype ({tuple(q_THd.shape)}, {q_THd.dtype})")
    if d & (d - 1) or S & (S - 1) or d < 16:
        raise ValueError(f"head dim {d} and block size {S} must be powers of two (head dim >= 16)")
    if q_THd.stride(2) != 1 or not kv_2NSGd.is_contiguous():
        raise ValueError("q needs contiguous head dims and the cache must be contiguous")
    if block_table_BM.dtype != torch.int32 or seq_lens_B.dtype != torch.int32 or query_start_B1.dtype != torch.int32:
        raise ValueError("block_table_BM, seq_lens_B and query_start_B1 must be int32")
    qpk = H // G
    if out is None:
        out = torch.empty_like(q_THd)
    if lse is None and return_lse:
        lse = torch.empty(T, H, dtype=torch.float32, device=q_THd.device)
    if workspace is None:
        workspace = AttentionWorkspace.allocate(plan.partial_rows, d, q_THd.device)
    elif workspace.part_lse_R.numel() < plan.partial_rows:
        raise ValueError(f"workspace holds {workspace.part_lse_R.numel()} rows, the plan needs {plan.partial_rows}")
    lse_arg = lse if lse is not None else out  # never written when STORE_LSE is off
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    device_name = _device_name(q_THd.device)
    precision = "ieee" if q_THd.dtype == torch.float32 else "tf32"
    on = pdl(q_THd.device)
    common = dict(G=G, QPK=qpk, D=d, STORE_LSE=lse is not None, PDL=on, launch_pdl=bool(on))
    for index, kind in enumerate(("decode", "prefill")):
        work = getattr(plan, kind)
        if work.item_cap == 0:
            continue
        cfg = (configs or {}).get(kind) or _config(kind, d, qpk, device_name)
        _paged_attention_kernel[(work.item_cap * G,)](
            q_THd, kv_2NSGd, out, lse_arg, workspace.part_out_Rd, workspace.part_lse_R, workspace.pieces_done_R,
            block_table_BM, seq_lens_B, query_start_B1, getattr(plan_tensors, f"{kind}_items"),
            plan_tensors.counts_4[index:], getattr(plan_tensors, f"{kind}_groups"), work.item_cap,
            max(work.group_cap, 1), scale * LOG2E, sliding_window or 0,
            q_THd.stride(0), q_THd.stride(1), out.stride(0), out.stride(1), *lse_strides,
            block_table_BM.stride(0), kv_2NSGd.stride(0), kv_2NSGd.stride(1), kv_2NSGd.stride(2),
            kv_2NSGd.stride(3), S=S, BLOCK_M=work.block_m, BLOCK_N=cfg.block_n, HAS_WINDOW=sliding_window is not None,
            PRECISION=precision, PREFILL=kind == "prefill", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **common)
    return out, lse


__all__ = ["AttentionWorkspace", "paged_attention"]
