"""Fused small ops of the decoder layer for CUDA, in Triton, beside their plain-torch references
in `model/layers.py` and `model/attention.py` (tests/test_triton_layers.py holds each to them).

Shapes: T tokens, D hidden, H query heads, G KV heads, d head dim, N KV blocks, S block size.

- `rms_norm`: RMSNorm, optionally fused with the residual add that precedes it:
      residual_TD <- x_TD + residual_TD  (in place, rounded to the dtype, as transformers adds)
      y_TD         = weight * normalize(residual_TD)
  One read of each input and one write of each output instead of five kernels.
- `qk_norm_rope_kv`: per-head RMSNorm of q and k (Qwen3's QK-norm), rotary embedding of q and k
  (rotate-half convention, cos/sin from the inverse frequencies and the attention factor, so
  default, linear and YaRN scaling are one formula), q written out, k and v written into their
  KV-cache slots. Rows whose slot is negative write no k/v (padding rows of a CUDA graph).
- `silu_and_mul`: silu(gate) * up over the [gate | up] halves of one GEMM's output.

Rounding follows the references where it is cheap (the normalised value is rounded to the dtype
before the weight multiplies it, as transformers does); rope runs in float32 and rounds once.
This module imports triton: only code that has chosen the CUDA fast path imports it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh.experts.triton_pdl import pdl, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * D + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / D + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (normed * w).to(x.dtype), mask=mask)


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
             residual_TD: torch.Tensor | None = None) -> torch.Tensor:
    """weight * normalize(x) (or of x + residual, with residual_TD updated in place to the sum)."""
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    y_TD = torch.empty_like(x_TD)
    if T:
        block, on = triton.next_power_of_2(D), pdl(x_TD.device)
        _rms_norm_kernel[(T,)](x_TD, x_TD if residual_TD is None else residual_TD, weight_D, y_TD, D, eps,
                               HAS_RESIDUAL=residual_TD is not None, BLOCK_D=block, PDL=on,
                               num_warps=min(max(block // 256, 1), 8), launch_pdl=bool(on))
    return y_TD


@triton.jit
def _qk_norm_rope_kv_kernel(qkv_ptr, q_out_ptr, kv_ptr, slot_ptr, pos_ptr, inv_freq_ptr, qk_w_ptr,
                            attention_factor, eps, kv_stride_kv, H, G,
                            HEAD_DIM: tl.constexpr, HAS_QK_NORM: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, head) of the fused qkv output [T, H + 2G, d]."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    lo = tl.arange(0, HALF)
    row_ptr = qkv_ptr + (t * (H + 2 * G) + head) * HEAD_DIM
    x1 = tl.load(row_ptr + lo)
    x2 = tl.load(row_ptr + HALF + lo)
    dtype = x1.dtype
    if head >= H + G:  # v: straight into the cache
        slot = tl.load(slot_ptr + t).to(tl.int64)  # slot * G * d overflows int32 in a large cache
        if slot >= 0:
            dst = kv_ptr + kv_stride_kv + (slot * G + (head - H - G)) * HEAD_DIM
            tl.store(dst + lo, x1)
            tl.store(dst + HALF + lo, x2)
    else:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if HAS_QK_NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / HEAD_DIM + eps)
            w_ptr = qk_w_ptr + (head >= H).to(tl.int32) * HEAD_DIM  # [2, d]: q's weight, then k's
            a = (a * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + lo).to(tl.float32)
            b = (b * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + lo).to(tl.float32)
            a = a.to(dtype).to(tl.float32)
            b = b.to(dtype).to(tl.float32)
        pos = tl.load(pos_ptr + t).to(tl.float32)
        freqs = pos * tl.load(inv_freq_ptr + lo)
        cos = tl.cos(freqs) * attention_factor
        sin = tl.sin(freqs) * attention_factor
        out1 = (a * cos - b * sin).to(dtype)
        out2 = (b * cos + a * sin).to(dtype)
        if head < H:
            dst = q_out_ptr + (t * H + head) * HEAD_DIM  # t is int64
            tl.store(dst + lo, out1)
            tl.store(dst + HALF + lo, out2)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                dst = kv_ptr + (slot * G + (head - H)) * HEAD_DIM
                tl.store(dst + lo, out1)
                tl.store(dst + HALF + lo, out2)


def qk_norm_rope_kv(qkv_T3d: torch.Tensor, num_heads: int, num_kv_heads: int, positions_T: torch.Tensor,
                    inv_freq: torch.Tensor, attention_factor: float, kv_2NSGd: torch.Tensor,
                    slot_mapping_T: torch.Tensor, qk_norm_weight_2d: torch.Tensor | None, eps: float) -> torch.Tensor:
    """q [T, H, d] after QK-norm (weights [2, d]: q_norm's, then k_norm's; None: no QK-norm) and
    rope; k and v written into the cache at their slots (none where the slot is negative)."""
    T, heads, d = qkv_T3d.shape
    H, G = num_heads, num_kv_heads
    assert heads == H + 2 * G and kv_2NSGd.is_contiguous() and qkv_T3d.is_contiguous()
    q_THd = qkv_T3d.new_empty(T, H, d)
    if T:
        has_norm, on = qk_norm_weight_2d is not None, pdl(qkv_T3d.device)
        _qk_norm_rope_kv_kernel[(T, heads)](
            qkv_T3d, q_THd, kv_2NSGd, slot_mapping_T, positions_T, inv_freq,
            qk_norm_weight_2d if has_norm else inv_freq,
            float(attention_factor), eps, kv_2NSGd.stride(0), H, G, HEAD_DIM=d, HAS_QK_NORM=has_norm, PDL=on,
            num_warps=1, launch_pdl=bool(on))
    return q_THd


@triton.jit
def _silu_and_mul_kernel(h_ptr, out_ptr, F, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(h_ptr + t * 2 * F + cols, mask=mask, other=0.0)
    up = tl.load(h_ptr + t * 2 * F + F + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    tl.store(out_ptr + t * F + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(h_T2F: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] (each op rounded to the dtype, as F.silu(gate) * up)."""
    h_T2F = h_T2F.contiguous()
    T, F2 = h_T2F.shape
    out = h_T2F.new_empty(T, F2 // 2)
    if T:
        block = min(triton.next_power_of_2(F2 // 2), 1024)
        _silu_and_mul_kernel[(T, triton.cdiv(F2 // 2, block))](h_T2F, out, F2 // 2, BLOCK=block, num_warps=4)
    return out
