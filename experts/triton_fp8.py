"""FP8 weights in the expert and linear kernels: the scale grids (`ExpertScales`), how K tiles
fit the scale blocks, and the Triton helpers that quantize an activation tile to e4m3 (W8A8) or
scale a row into fp16's range (the W8A16 dot form). experts/triton_moe.py and
model/triton_linear.py build their FP8 paths on these; model/quantization.py holds the torch
reference (`fake_quantize_activations`) they answer to."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def round_e4m3(v):
    """v rounded to the nearest e4m3 value (ties to even), in float32: the interpreter's own
    float32 -> e4m3 cast mis-rounds values whose mantissa carries into the exponent (127.4 -> 64),
    so on the CPU the cast below only ever sees values it represents exactly."""
    e = tl.maximum(tl.floor(tl.log2(tl.abs(v) + 1e-30)), -6.0)  # e4m3: 3 mantissa bits, subnormal below 2^-6
    step = tl.exp2(e - 3.0)
    return ((v / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: float32's round-to-nearest-even


@triton.jit
def quantize_rows(a, EXACT_CVT: tl.constexpr):
    """A [rows, BLOCK_K] activation tile -> (e4m3 tile, float32 [rows] scales): each row's group of
    BLOCK_K values divided by amax/448 (e4m3's largest value), as model/quantization.py's
    quantize_activation_groups does for the reference."""
    a = a.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0
    v = a / scale[:, None]
    if EXACT_CVT:
        v = round_e4m3(v)
    return v.to(tl.float8e4nv), scale


@triton.jit
def fp16_shift(amax):
    """Per row, the power of two that brings a largest |x| of `amax` into [2^13, 2^14] (fp16's
    range, exactly: only the exponent changes): x * 2^-shift is multiplied, the sum times 2^shift."""
    return tl.ceil(tl.log2(amax + 1e-30)) - 14.0


@dataclass(frozen=True)
class ExpertScales:
    """FP8 expert weights' scales: float32 grids [E, 2F/SBN, D/SBK] (w13, gate rows then up rows)
    and [E, D/SBN', F/SBK'] (w2), one per block of `block13` = (SBN, SBK) and `block2` = (SBN',
    SBK') weight elements (SBN dividing F, so no block straddles gate and up; a per-channel scale
    is a block of one row and the whole row). The GEMVs read FP8 weights, multiply each element by
    its block's scale in float32 and go on as with bf16 weights (W8A16: half the bytes read); the
    blocked GEMMs, with 16-bit activations, quantize each row's K tile of activations to e4m3 and
    multiply on the FP8 tensor cores, scaling each tile's product by both scales (W8A8)."""

    w13: torch.Tensor
    w2: torch.Tensor
    block13: tuple[int, int]
    block2: tuple[int, int]


def fp8_block_k(block_k: int, scale_k: int) -> int:
    """The K tile for FP8 weights: `block_k` halved until it divides the scale blocks' width (a
    power of two), so each tile reads one scale per row (and, in W8A8, quantizes one activation
    group per row). Widths that are not powers of two keep `block_k` (per-element scales)."""
    if scale_k & (scale_k - 1):
        return block_k
    return max(16, min(block_k, scale_k)) if scale_k >= 16 else block_k


A8_MIN_BLOCK_K = 32
"""Narrowest K tile the W8A8 path takes (tl.dot on e4m3 needs K >= 32); narrower scale blocks
(test checkpoints) keep W8A16."""


def activations_fp8(scales: ExpertScales | None, act: torch.Tensor) -> bool:
    """W8A8 (the blocked GEMMs quantize activations per row and K tile, FP8 tensor cores) where
    the weights are FP8 and the activations 16-bit; float32 activations (the CPU reference runs)
    keep W8A16, whose result is the dequantized model's exactly."""
    return scales is not None and act.dtype in (torch.bfloat16, torch.float16)


def scale_args(scales: ExpertScales | None, which: str, dummy: torch.Tensor, block_k: int,
                a8: bool | None = None):
    """(scale pointer, its expert and row strides, the kernel's constexprs) for a launcher whose
    K tiles are `block_k` wide: SCALE_VEC when every tile lies within one block column. `a8`
    (the blocked kernels, which take A8 and EXACT_CVT): W8A8 asked for, taken where SCALE_VEC and
    the tile is at least A8_MIN_BLOCK_K wide."""
    blocked = {} if a8 is None else dict(A8=False, EXACT_CVT=dummy.device.type != "cuda")
    if scales is None:
        return dummy, 0, 0, dict(HAS_WS=False, SBN=1, SBK=1, SCALE_VEC=False, **blocked)
    grid, block = (scales.w13, scales.block13) if which == "w13" else (scales.w2, scales.block2)
    vec = block[1] % block_k == 0
    if a8 is not None:  # the FP8 tensor cores multiply K in steps of 32
        blocked["A8"] = bool(a8) and vec and block_k >= A8_MIN_BLOCK_K
    return grid, grid.stride(0), grid.stride(1), dict(HAS_WS=True, SBN=block[0], SBK=block[1], SCALE_VEC=vec,
                                                      **blocked)


def scale_k_of(scales: ExpertScales | None, which: str) -> int:
    if scales is None:
        return 0
    return (scales.block13 if which == "w13" else scales.block2)[1]


def check_scales(w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, scales: ExpertScales | None) -> None:
    """FP8 expert weights come with their scales and only they do; the grids fit the blocks."""
    fp8 = [w.dtype == torch.float8_e4m3fn for w in (w13_EFD, w2_EDF)]
    if fp8[0] != fp8[1] or fp8[0] != (scales is not None):
        raise ValueError(f"expert weights {w13_EFD.dtype}/{w2_EDF.dtype} with scales {scales is not None}: FP8 "
                         "(float8 e4m3) weights need their ExpertScales, and other weights take none")
    if scales is None:
        return
    E, F2, D = w13_EFD.shape
    F = F2 // 2
    (bn, bk), (bn2, bk2) = scales.block13, scales.block2
    if F % bn:
        raise ValueError(f"w13 scale blocks of {bn} rows straddle gate and up ({F} rows each)")
    want = {"w13": (E, F2 // bn, -(-D // bk)), "w2": (E, -(-D // bn2), -(-F // bk2))}
    for name, grid in (("w13", scales.w13), ("w2", scales.w2)):
        if tuple(grid.shape) != want[name] or grid.dtype != torch.float32 or grid.stride(-1) != 1:
            raise ValueError(f"{name} scales must be float32 {want[name]} with unit stride along the last "
                             f"dimension, got {grid.dtype} {tuple(grid.shape)}")
