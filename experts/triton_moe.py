"""Triton kernels of the two expert GEMMs, beside grouped.py's torch paths (their oracle).

Legend: T tokens, K experts per token, N = T*K token copies (copy c = t*K + k is token t's k-th
expert), E local experts, D hidden, F expert FFN width, M padded rows (blocks of BM rows).

    w13_EFD = [E, 2F, D]  gate rows [0:F], up rows [F:2F]      w2_EDF = [E, D, F]

Two shapes of the same math, chosen by the number of copies (experts/moe_config.py):

GEMV path (decode: few copies, no alignment step; each weight slice is read once per copy):
    1. gemv_gate_up: program (c, n-block): act[c] = silu(x[c//K] . w13[e_c, gate]) * (x[c//K] . w13[e_c, up])
    2. gemv_down:    program (t, d-block): out[t] = sum_k weight[t,k] * act[t*K+k] . w2[e_tk]
       (the weighted combine is fused: all K copies of a token in one program, no atomics)
    The expert of each copy is read on the device, through the placement table where there is one.

Blocked path (copies aligned to BM-row blocks of one expert each, router/align.py):
    1. gemm_gate_up: program (block, n-block): rows gathered through sorted_ids (x row = copy//K),
       gate and up tiles in two accumulators, SiLU-and-mul in the epilogue -> act[padded row]
    2. gemm_down:    program (block, d-block): act rows of the block times w2[e]^T, times the copy's
       routing weight -> y[copy]; blocks of the zero bucket (experts not on this rank, padding)
       write zeros and read no weights
    Blocks past the real count (num_padded, on the device) exit at once; the grid is the static
    bound on blocks, so a call launches the same grid for every routing of the same T.
    At large T (config `tma`, 16-bit weights) both run as persistent kernels fed through TMA
    instead (experts/triton_persistent.py, which also holds combine_copies, the sum over K).

FP8 weights (ExpertScales): the K tiles shrink to fit the scale blocks (one scale per row and
tile). With bf16/fp16 activations the blocked GEMMs quantize each row's K tile on the fly
(amax/448, e4m3) and run e4m3 x e4m3 dots on the tensor cores, each tile's product times the
row's and the weight block's scales (W8A8, as the FP8 checkpoints' dynamic activation scheme asks; reference:
model/quantization.py's fake_quantize_activations with the dequantized weights). The GEMVs
(decode, bandwidth-bound) take the form GEMV_FORM picks by measurement: gate/up a dot form with
the row padded to 16 and e4m3 -> fp16 weights (W8A16, _gemv_gate_up_dot_kernel), down the
elementwise form that scales each weight as it is read (W8A16); a W8A8 dot form of each exists
for measurement. float32 activations, and tiles too narrow for a dot, keep the elementwise form.

All accumulation is in float32; act and y are stored in the activations' dtype (as the torch path
rounds its intermediate). Every launcher takes its outputs from the caller (CUDA-graph buffers);
none synchronises with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh.experts.moe_config import KernelConfig
from expertmesh.experts.triton_fp8 import (
    A8_MIN_BLOCK_K,
    ExpertScales,
    activations_fp8,
    fp8_block_k,
    fp16_shift,
    quantize_rows,
    scale_args,
    scale_k_of,
)
from expertmesh.experts.triton_pdl import pdl, pdl_wait
from expertmesh.experts.triton_persistent import gemm_down_tma, gemm_gate_up_tma, tma_programs
from expertmesh.experts.triton_tiles import launch, silu_mul, swizzle


@triton.jit
def _expert_of(ids_ptr, map_ptr, index, mask, num_experts, HAS_MAP: tl.constexpr):
    """Local expert of copies `index` (-1 where masked, not on this rank, or past the last expert)."""
    expert = tl.load(ids_ptr + index, mask=mask, other=-1).to(tl.int32)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=mask & (expert >= 0), other=-1).to(tl.int32)
    return tl.where(mask & (expert >= 0) & (expert < num_experts), expert, -1)


@triton.jit
def _load_gate_up(gate_ptrs, up_ptrs, k0, n_ok, k_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """The gate and up [BLOCK_N, BLOCK_K] weight tiles at K offset k0 (k_ok: the tile's columns
    inside D, read only where EVEN_K is false)."""
    if EVEN_K:
        if EVEN_N:
            g = tl.load(gate_ptrs + k0)
            u = tl.load(up_ptrs + k0)
        else:
            g = tl.load(gate_ptrs + k0, mask=n_ok[:, None], other=0.0)
            u = tl.load(up_ptrs + k0, mask=n_ok[:, None], other=0.0)
    else:
        g = tl.load(gate_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.load(up_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return g, u


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, w_ptr, act_ptr, ids_ptr, map_ptr, ws_ptr,
    F, D, num_experts,
    stride_xt, stride_we, stride_wn, stride_ac, stride_se, stride_sn,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_WS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_VEC: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    copy = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = _expert_of(ids_ptr, map_ptr, copy, copy >= 0, num_experts, HAS_MAP)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < F
    x_row = x_ptr + (copy // TOP_K).to(tl.int64) * stride_xt
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + F * stride_wn
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        if EVEN_K:
            xv = tl.load(x_row + k0 + offs_k).to(tl.float32)
        else:
            xv = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        g, u = _load_gate_up(gate_ptrs, up_ptrs, k0, n_ok, k_ok, EVEN_K, EVEN_N)
        g = g.to(tl.float32)
        u = u.to(tl.float32)
        if HAS_WS:  # FP8 weights: one float32 scale per SBN x SBK block (gate rows, then up rows)
            if SCALE_VEC:  # the tile lies in one block column: one scale per row
                s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn + k0 // SBK
                g = g * tl.load(s_ptrs, mask=n_ok, other=0.0)[:, None]
                u = u * tl.load(s_ptrs + (F // SBN) * stride_sn, mask=n_ok, other=0.0)[:, None]
            else:
                s_ptrs = (ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN)[:, None] * stride_sn
                          + ((k0 + offs_k) // SBK)[None, :])
                s_ok = n_ok[:, None] & (offs_k < D - k0)[None, :]
                g = g * tl.load(s_ptrs, mask=s_ok, other=0.0)
                u = u * tl.load(s_ptrs + (F // SBN) * stride_sn, mask=s_ok, other=0.0)
        acc_gate += g * xv[None, :]
        acc_up += u * xv[None, :]
    h = silu_mul(tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1))
    tl.store(act_ptr + copy.to(tl.int64) * stride_ac + offs_n, h.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_down_kernel(
    act_ptr, w_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, ws_ptr,
    D, F, num_experts,
    stride_ac, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_MAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_WS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_VEC: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_c = tl.arange(0, K_PAD)
    copies = token * TOP_K + offs_c
    expert = _expert_of(ids_ptr, map_ptr, copies, offs_c < TOP_K, num_experts, HAS_MAP)
    valid = expert >= 0
    if HAS_WEIGHTS:
        scale = tl.load(weights_ptr + copies, mask=valid, other=0.0).to(tl.float32)
    else:
        scale = tl.where(valid, 1.0, 0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < D
    a_ptrs = act_ptr + copies.to(tl.int64)[:, None] * stride_ac + offs_k[None, :]
    w_ptrs = (w_ptr + tl.where(valid, expert, 0).to(tl.int64)[:, None, None] * stride_we
              + offs_n.to(tl.int64)[None, :, None] * stride_wn + offs_k[None, None, :])
    # One [K, BLOCK_N, BLOCK_K] tile per step: the K experts' loads are in flight together.
    acc = tl.zeros([K_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_ptrs + k0, mask=valid[:, None, None], other=0.0)
            else:
                w = tl.load(w_ptrs + k0, mask=valid[:, None, None] & n_ok[None, :, None], other=0.0)
        else:
            k_ok = offs_k < F - k0
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=valid[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :],
                        other=0.0)
        w = w.to(tl.float32)
        if HAS_WS:
            e_off = tl.where(valid, expert, 0).to(tl.int64) * stride_se
            if SCALE_VEC:
                s_ptrs = ws_ptr + e_off[:, None] + (offs_n // SBN)[None, :] * stride_sn + k0 // SBK
                w = w * tl.load(s_ptrs, mask=valid[:, None] & n_ok[None, :], other=0.0)[:, :, None]
            else:
                s_ptrs = (ws_ptr + e_off[:, None, None] + (offs_n // SBN)[None, :, None] * stride_sn
                          + ((k0 + offs_k) // SBK)[None, None, :])
                w = w * tl.load(s_ptrs, mask=valid[:, None, None] & n_ok[None, :, None]
                                & (offs_k < F - k0)[None, None, :], other=0.0)
        acc += w * (a.to(tl.float32) * scale[:, None])[:, None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_gate_up_dot_kernel(
    x_ptr, w_ptr, act_ptr, ids_ptr, map_ptr, ws_ptr,
    F, D, num_experts,
    stride_xt, stride_we, stride_wn, stride_ac, stride_se, stride_sn,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    SBN: tl.constexpr, SBK: tl.constexpr, A8: tl.constexpr, EXACT_CVT: tl.constexpr, PDL: tl.constexpr,
):
    """The gate/up GEMV with FP8 weights on the tensor cores: the copy's row, padded to 16 with
    zeros, times the e4m3 tiles, each tile's product times its block scales. A8: the row is
    quantized per K tile (W8A8: no weight converted); else the weights become fp16 exactly, one
    packed conversion per two, and the row is scaled into fp16's range by a power of two (W8A16)."""
    pdl_wait(PDL)
    copy = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = _expert_of(ids_ptr, map_ptr, copy, copy >= 0, num_experts, HAS_MAP)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    first = (tl.arange(0, 16) == 0)[:, None]
    n_ok = offs_n < F
    x_ptrs = x_ptr + (copy // TOP_K).to(tl.int64) * stride_xt + offs_k[None, :] + tl.zeros([16, 1], tl.int32)
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + F * stride_wn
    s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn
    if not A8:
        amax = tl.zeros([16], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            xa = tl.load(x_ptrs + k0, mask=first & (offs_k < D - k0)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
        x_shift = fp16_shift(amax)
        x_inv = tl.exp2(-x_shift)
    acc_gate = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=first, other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=first & k_ok[None, :], other=0.0)
        g, u = _load_gate_up(gate_ptrs, up_ptrs, k0, n_ok, k_ok, EVEN_K, EVEN_N)
        s_g = tl.load(s_ptrs + k0 // SBK, mask=n_ok, other=0.0)
        s_u = tl.load(s_ptrs + (F // SBN) * stride_sn + k0 // SBK, mask=n_ok, other=0.0)
        if A8:
            q, a_s = quantize_rows(x, EXACT_CVT)
            acc_gate += tl.dot(q, tl.trans(g)) * (a_s[:, None] * s_g[None, :])
            acc_up += tl.dot(q, tl.trans(u)) * (a_s[:, None] * s_u[None, :])
        else:
            x16 = (x.to(tl.float32) * x_inv[:, None]).to(tl.float16)
            acc_gate += tl.dot(x16, tl.trans(g.to(tl.float16))) * s_g[None, :]
            acc_up += tl.dot(x16, tl.trans(u.to(tl.float16))) * s_u[None, :]
    if not A8:
        back = tl.exp2(x_shift)[:, None]
        acc_gate = acc_gate * back
        acc_up = acc_up * back
    h = silu_mul(tl.sum(acc_gate, axis=0), tl.sum(acc_up, axis=0))  # rows past the first are zeros
    tl.store(act_ptr + copy.to(tl.int64) * stride_ac + offs_n, h.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_down_a8_kernel(
    act_ptr, w_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, ws_ptr,
    D, F, num_experts,
    stride_ac, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    SBN: tl.constexpr, SBK: tl.constexpr, EXACT_CVT: tl.constexpr, PDL: tl.constexpr,
):
    """The down GEMV and weighted combine with FP8 weights (W8A8): the token's copies one after
    another, each act row quantized per K tile and multiplied on the tensor cores."""
    pdl_wait(PDL)
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    first = (tl.arange(0, 16) == 0)[:, None]
    n_ok = offs_n < D
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for c in tl.static_range(TOP_K):
        copy = token * TOP_K + c
        expert = _expert_of(ids_ptr, map_ptr, copy, copy >= 0, num_experts, HAS_MAP)
        if expert >= 0:
            if HAS_WEIGHTS:
                weight = tl.load(weights_ptr + copy).to(tl.float32)
            else:
                weight = 1.0
            a_ptrs = act_ptr + copy.to(tl.int64) * stride_ac + offs_k[None, :] + tl.zeros([16, 1], tl.int32)
            w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
                      + offs_k[None, :])
            s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn
            for k0 in range(0, F, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs + k0, mask=first, other=0.0)
                    if EVEN_N:
                        w = tl.load(w_ptrs + k0)
                    else:
                        w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
                else:
                    k_ok = offs_k < F - k0
                    a = tl.load(a_ptrs + k0, mask=first & k_ok[None, :], other=0.0)
                    w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                q, a_s = quantize_rows(a, EXACT_CVT)
                s = tl.load(s_ptrs + k0 // SBK, mask=n_ok, other=0.0) * weight
                acc += tl.dot(q, tl.trans(w)) * (a_s[:, None] * s[None, :])
    y = tl.sum(acc, axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, ws_ptr,
    num_copies, F, D, num_experts, num_blocks,
    stride_xt, stride_we, stride_wn, stride_am, stride_se, stride_sn,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_VEC: tl.constexpr,
    A8: tl.constexpr, EXACT_CVT: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), num_blocks, tl.cdiv(F, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # the zero bucket: gemm_down writes its zeros
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copies = tl.load(sorted_ids_ptr + rows)
    row_ok = copies < num_copies
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < F
    a_ptrs = x_ptr + (copies // TOP_K).to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    up_ptrs = gate_ptrs + F * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                g = tl.load(gate_ptrs)
                u = tl.load(up_ptrs)
            else:
                g = tl.load(gate_ptrs, mask=n_ok[None, :], other=0.0)
                u = tl.load(up_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < D - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(gate_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A8:  # W8A8: the rows' K tile quantized on the fly, e4m3 x e4m3 on the tensor cores
            q, a_s = quantize_rows(a, EXACT_CVT)
            s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn + k0 // SBK
            s_g = tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
            s_u = tl.load(s_ptrs + (F // SBN) * stride_sn, mask=n_ok, other=0.0)[None, :]
            acc_gate += tl.dot(q, g) * (a_s[:, None] * s_g)
            acc_up += tl.dot(q, u) * (a_s[:, None] * s_u)
        elif HAS_WS:  # W8A16: FP8 weights scaled into the activations' dtype, bf16 tensor cores
            if SCALE_VEC:
                s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn + k0 // SBK
                s_g = tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
                s_u = tl.load(s_ptrs + (F // SBN) * stride_sn, mask=n_ok, other=0.0)[None, :]
            else:
                s_ptrs = (ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN)[None, :] * stride_sn
                          + ((k0 + offs_k) // SBK)[:, None])
                s_ok = (offs_k < D - k0)[:, None] & n_ok[None, :]
                s_g = tl.load(s_ptrs, mask=s_ok, other=0.0)
                s_u = tl.load(s_ptrs + (F // SBN) * stride_sn, mask=s_ok, other=0.0)
            g = (g.to(tl.float32) * s_g).to(a.dtype)
            u = (u.to(tl.float32) * s_u).to(a.dtype)
        if not A8:
            acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    h = silu_mul(acc_gate, acc_up).to(act_ptr.dtype.element_ty)
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :]
    tl.store(act_ptrs, h, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_down_kernel(
    act_ptr, w_ptr, y_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, ws_ptr,
    num_copies, D, F, num_experts, num_blocks,
    stride_am, stride_we, stride_wn, stride_yc, stride_se, stride_sn,
    HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_VEC: tl.constexpr,
    A8: tl.constexpr, EXACT_CVT: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), num_blocks, tl.cdiv(D, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copies = tl.load(sorted_ids_ptr + rows)
    row_ok = copies < num_copies
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    y_ptrs = y_ptr + copies.to(tl.int64)[:, None] * stride_yc + offs_n[None, :]
    y_mask = row_ok[:, None] & n_ok[None, :]
    if expert >= num_experts:
        tl.store(y_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty), mask=y_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < F - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A8:
            q, a_s = quantize_rows(a, EXACT_CVT)
            s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn + k0 // SBK
            acc += tl.dot(q, b) * (a_s[:, None] * tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :])
        else:
            if HAS_WS:
                if SCALE_VEC:
                    s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN) * stride_sn + k0 // SBK
                    s_b = tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
                else:
                    s_ptrs = (ws_ptr + expert.to(tl.int64) * stride_se + (offs_n // SBN)[None, :] * stride_sn
                              + ((k0 + offs_k) // SBK)[:, None])
                    s_b = tl.load(s_ptrs, mask=(offs_k < F - k0)[:, None] & n_ok[None, :], other=0.0)
                b = (b.to(tl.float32) * s_b).to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_WEIGHTS:
        acc = acc * tl.load(weights_ptr + copies, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _block(size: int, dim: int, low: int) -> int:
    """A power-of-two block no larger than the dimension needs (small test shapes), at least `low`."""
    return max(low, min(size, triton.next_power_of_2(max(dim, 1))))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


GEMV_FORMS = ("fma", "f16", "a8")
GEMV_FORM = {"first": "f16", "second": "fma"}
"""How each GEMV (gate/up "first", down "second") multiplies FP8 weights with 16-bit activations
by default (a launcher's `form` overrides it): "fma" scales each weight into float32 and
accumulates elementwise (W8A16); "f16" multiplies on the tensor cores in fp16 with the block
scale after each tile's product (W8A16; gate/up only); "a8" quantizes the row per K tile and
multiplies e4m3 x e4m3 (W8A8). Measured on the H200 from HBM (weights cycled past the L2), best
config of each form at one token: 30B gate/up 12.5 us f16, 13.7 fma, 14.4 a8; down 7.5 fma, 29.2
a8 (the dot form walks a token's copies one after another); 235B gate/up 34.6 f16, 33.5 a8,
down 17.2 fma. The a8 form pays a row reduction every K step, which f16 does not. (The same fp16
dot form for the dense GEMV measured slower than its W8A16 dot form, 9.8+ against 8.7 us on the
30B qkv, and was not kept.)"""


def _gemv_form(which: str, form: str | None, scales: ExpertScales | None, act: torch.Tensor, block_n: int,
               block_k: int, vec: bool) -> str:
    """The form a GEMV launch takes: the asked-for (or default) one where the tiles allow a dot
    form (FP8 weights, 16-bit activations, one scale per row of a K tile, K >= 32, 16 or more
    output rows), else "fma"."""
    form = GEMV_FORM[which] if form is None else form
    if form not in GEMV_FORMS:
        raise ValueError(f"form must be one of {GEMV_FORMS}, got {form!r}")
    if form == "fma" or not (activations_fp8(scales, act) and vec and block_k >= A8_MIN_BLOCK_K and block_n >= 16):
        return "fma"
    return form


def check_operands(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, out: torch.Tensor) -> None:
    """The kernels index rows by stride and read the last dimension contiguously."""
    D = x_TD.shape[1]
    if w13_EFD.shape[2] != D or w2_EDF.shape[:2] != (w13_EFD.shape[0], D) or w13_EFD.shape[1] != 2 * w2_EDF.shape[2]:
        raise ValueError(f"expert weights {tuple(w13_EFD.shape)}, {tuple(w2_EDF.shape)} do not fit hidden size {D}")
    if any(t.stride(-1) != 1 for t in (x_TD, w13_EFD, w2_EDF, out)):
        raise ValueError("activations, expert weights and outputs must be contiguous in their last dimension")
    if out.shape != x_TD.shape or out.dtype != x_TD.dtype:
        raise ValueError(f"out must be {tuple(x_TD.shape)} {x_TD.dtype}, got {tuple(out.shape)} {out.dtype}")


def gemv_gate_up(x_TD: torch.Tensor, w13_EFD: torch.Tensor, ids_N: torch.Tensor, act_NF: torch.Tensor, *,
                 top_k: int, config: KernelConfig, expert_to_local_E: torch.Tensor | None = None,
                 scales: ExpertScales | None = None, form: str | None = None) -> None:
    """act_NF[c] = silu(gate) * up of copy c = t*top_k + k (ids_N: its expert, global where a
    placement table maps it). Rows of copies whose expert is not local are left unwritten.
    `form`: how FP8 weights multiply (GEMV_FORM)."""
    N, F = act_NF.shape
    E, _, D = w13_EFD.shape
    bn, bk = _block(config.BLOCK_N, F, 1), _block(config.BLOCK_K, D, 16)
    if scales is not None:
        bk = fp8_block_k(bk, scale_k_of(scales, "w13"))
        if (GEMV_FORM["first"] if form is None else form) != "fma" and activations_fp8(scales, x_TD):
            bn = _block(max(bn, 16), F, 1)  # the dot forms' tiles: 16 output rows or more
    grid = (N, triton.cdiv(F, bn))
    mapping = expert_to_local_E if expert_to_local_E is not None else ids_N
    ws, se, sn, ws_args = scale_args(scales, "w13", act_NF, bk)
    form = _gemv_form("first", form, scales, x_TD, bn, bk, ws_args["SCALE_VEC"])
    if form != "fma":
        launch(_gemv_gate_up_dot_kernel, grid,
                (x_TD, w13_EFD, act_NF, ids_N, mapping, ws, F, D, E,
                 x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1), act_NF.stride(0), se, sn),
                num_warps=config.num_warps, num_stages=config.num_stages, pdl_on=pdl(x_TD.device),
                TOP_K=top_k, HAS_MAP=expert_to_local_E is not None, BLOCK_N=bn, BLOCK_K=bk,
                EVEN_K=D % bk == 0, EVEN_N=F % bn == 0, SBN=ws_args["SBN"], SBK=ws_args["SBK"],
                A8=form == "a8", EXACT_CVT=x_TD.device.type != "cuda")
        return
    launch(_gemv_gate_up_kernel, grid,
            (x_TD, w13_EFD, act_NF, ids_N, mapping, ws, F, D, E,
             x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1), act_NF.stride(0), se, sn),
            num_warps=config.num_warps, num_stages=config.num_stages, pdl_on=pdl(x_TD.device),
            TOP_K=top_k, HAS_MAP=expert_to_local_E is not None, BLOCK_N=bn, BLOCK_K=bk,
            EVEN_K=D % bk == 0, EVEN_N=F % bn == 0, **ws_args)


def gemv_down(act_NF: torch.Tensor, w2_EDF: torch.Tensor, ids_N: torch.Tensor, out_TD: torch.Tensor, *,
              top_k: int, config: KernelConfig, weights_N: torch.Tensor | None = None,
              expert_to_local_E: torch.Tensor | None = None, scales: ExpertScales | None = None,
              form: str | None = None) -> None:
    """out_TD[t] = sum_k weights_N[t*top_k+k] * act_NF[t*top_k+k] @ w2[e]^T (weight 1 without
    weights_N); copies whose expert is not local add nothing. Writes every element of out_TD."""
    if form == "f16":
        raise ValueError('the down GEMV has no "f16" form (its dot form quantizes: "a8")')
    T, D = out_TD.shape
    E, _, F = w2_EDF.shape
    bn, bk = _block(config.BLOCK_N, D, 1), _block(config.BLOCK_K, F, 16)
    if scales is not None:
        bk = fp8_block_k(bk, scale_k_of(scales, "w2"))
        if (GEMV_FORM["second"] if form is None else form) != "fma" and activations_fp8(scales, act_NF):
            bn = _block(max(bn, 16), D, 1)
    grid = (T, triton.cdiv(D, bn))
    mapping = expert_to_local_E if expert_to_local_E is not None else ids_N
    ws, se, sn, ws_args = scale_args(scales, "w2", act_NF, bk)
    form = _gemv_form("second", form, scales, act_NF, bn, bk, ws_args["SCALE_VEC"])
    if form == "a8":
        launch(_gemv_down_a8_kernel, grid,
                (act_NF, w2_EDF, out_TD, ids_N, mapping, weights_N if weights_N is not None else act_NF, ws, D, F,
                 E, act_NF.stride(0), w2_EDF.stride(0), w2_EDF.stride(1), out_TD.stride(0), se, sn),
                num_warps=config.num_warps, num_stages=config.num_stages, pdl_on=pdl(act_NF.device),
                TOP_K=top_k, HAS_MAP=expert_to_local_E is not None, HAS_WEIGHTS=weights_N is not None,
                BLOCK_N=bn, BLOCK_K=bk, EVEN_K=F % bk == 0, EVEN_N=D % bn == 0, SBN=ws_args["SBN"],
                SBK=ws_args["SBK"], EXACT_CVT=act_NF.device.type != "cuda")
        return
    launch(_gemv_down_kernel, grid,
            (act_NF, w2_EDF, out_TD, ids_N, mapping, weights_N if weights_N is not None else act_NF, ws, D, F, E,
             act_NF.stride(0), w2_EDF.stride(0), w2_EDF.stride(1), out_TD.stride(0), se, sn),
            num_warps=config.num_warps, num_stages=config.num_stages, pdl_on=pdl(act_NF.device),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), HAS_MAP=expert_to_local_E is not None,
            HAS_WEIGHTS=weights_N is not None, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=F % bk == 0, EVEN_N=D % bn == 0,
            **ws_args)


def gemm_gate_up(x_TD: torch.Tensor, w13_EFD: torch.Tensor, act_MF: torch.Tensor, sorted_ids_M: torch.Tensor,
                 block_expert_B: torch.Tensor, num_padded: torch.Tensor, *, num_copies: int, top_k: int,
                 block_m: int, config: KernelConfig, scales: ExpertScales | None = None) -> None:
    """act_MF[m] = silu(gate) * up of the copy at padded row m (sorted_ids_M[m] < num_copies);
    rows of padding and of the zero bucket are left unwritten."""
    F = act_MF.shape[1]
    E, F2, D = w13_EFD.shape
    if F2 != 2 * F:
        raise ValueError(f"act_MF {tuple(act_MF.shape)} must be [M, F] for w13 {tuple(w13_EFD.shape)} ([E, 2F, D])")
    num_blocks = block_expert_B.shape[0]
    bn, bk = _block(config.BLOCK_N, F, 16), _block(config.BLOCK_K, D, 16)
    if scales is not None:
        bk = fp8_block_k(bk, scale_k_of(scales, "w13"))
    programs = tma_programs(config, x_TD, w13_EFD, scales, n_ok=F % bn == 0, k_ok=D % bk == 0)
    if programs:
        gemm_gate_up_tma(x_TD, w13_EFD, act_MF, sorted_ids_M, block_expert_B, num_padded, num_copies=num_copies,
                         top_k=top_k, block_m=block_m, block_n=bn, block_k=bk, config=config, programs=programs)
        return
    grid = (num_blocks * triton.cdiv(F, bn),)
    ws, se, sn, ws_args = scale_args(scales, "w13", act_MF, bk, a8=activations_fp8(scales, x_TD))
    launch(_gemm_gate_up_kernel, grid,
            (x_TD, w13_EFD, act_MF, sorted_ids_M, block_expert_B, num_padded, ws, num_copies, F, D, E, num_blocks,
             x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1), act_MF.stride(0), se, sn),
            num_warps=config.num_warps, num_stages=config.num_stages,
            TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.GROUP_M,
            EVEN_K=D % bk == 0, EVEN_N=F % bn == 0, DOT_PRECISION=_dot_precision(x_TD.dtype), **ws_args)


def gemm_down(act_MF: torch.Tensor, w2_EDF: torch.Tensor, y_ND: torch.Tensor, sorted_ids_M: torch.Tensor,
              block_expert_B: torch.Tensor, num_padded: torch.Tensor, *, num_copies: int, block_m: int,
              config: KernelConfig, weights_N: torch.Tensor | None = None,
              scales: ExpertScales | None = None) -> None:
    """y_ND[c] = weights_N[c] * act_MF[m] @ w2[e]^T for the copy c at padded row m, zeros for
    copies of the zero bucket: every row c < num_copies is written."""
    D = y_ND.shape[1]
    E, _, F = w2_EDF.shape
    if act_MF.shape[1] != F or w2_EDF.shape[1] != D:
        raise ValueError(f"act_MF {tuple(act_MF.shape)} and y {tuple(y_ND.shape)} must be [M, F] and [N, D] for "
                         f"w2 {tuple(w2_EDF.shape)} ([E, D, F])")
    num_blocks = block_expert_B.shape[0]
    bn, bk = _block(config.BLOCK_N, D, 16), _block(config.BLOCK_K, F, 16)
    if scales is not None:
        bk = fp8_block_k(bk, scale_k_of(scales, "w2"))
    programs = tma_programs(config, act_MF, w2_EDF, scales, n_ok=D % bn == 0, k_ok=F % bk == 0, act_tma=True)
    if programs:
        gemm_down_tma(act_MF, w2_EDF, y_ND, sorted_ids_M, block_expert_B, num_padded, num_copies=num_copies,
                      block_m=block_m, block_n=bn, block_k=bk, config=config, weights_N=weights_N, programs=programs)
        return
    grid = (num_blocks * triton.cdiv(D, bn),)
    ws, se, sn, ws_args = scale_args(scales, "w2", act_MF, bk, a8=activations_fp8(scales, act_MF))
    launch(_gemm_down_kernel, grid,
            (act_MF, w2_EDF, y_ND, weights_N if weights_N is not None else act_MF, sorted_ids_M, block_expert_B,
             num_padded, ws, num_copies, D, F, E, num_blocks,
             act_MF.stride(0), w2_EDF.stride(0), w2_EDF.stride(1), y_ND.stride(0), se, sn),
            num_warps=config.num_warps, num_stages=config.num_stages,
            HAS_WEIGHTS=weights_N is not None, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.GROUP_M,
            EVEN_K=F % bk == 0, EVEN_N=D % bn == 0, DOT_PRECISION=_dot_precision(act_MF.dtype), **ws_args)
