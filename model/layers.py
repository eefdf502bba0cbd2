"""Small building blocks: RMSNorm, rotary embeddings (default, linear, YaRN) and the dense SiLU MLP.

Shapes: T tokens (flat over all sequences of a step), D hidden, H query heads, d head dim.
RoPE follows transformers' formulas exactly (inverse frequencies and the YaRN attention factor),
so logits agree with it to float32 rounding.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import RopeConfig


@functools.cache
def fast_ops():
    """model/triton_layers.py, imported on first use by a module built for the CUDA fast path
    (`fast=True`), so the CPU path never imports triton."""
    from expertmesh.model import triton_layers

    return triton_layers


@functools.cache
def linear_ops():
    """model/triton_linear.py (the small-batch GEMV), imported on first use by the fast path."""
    from expertmesh.model import triton_linear

    return triton_linear


def fast_linear(module: nn.Linear, x_TD: torch.Tensor) -> torch.Tensor:
    """module(x_TD) on the fast path: the Triton GEMV (`triton_linear.linear_small`) for the few
    rows of a decode step, where its configs table (or heuristic) says it beats cuBLAS, else the
    module itself (prefill, and any shape the table keeps on cuBLAS). Call it only from modules
    built with `fast=True`: the plain path stays nn.Linear."""
    T, weight = x_TD.shape[0], module.weight
    ops = linear_ops()
    scale = getattr(module, "weight_scale", None)
    if scale is not None:  # an Fp8Linear: FP8 weights scaled as the kernels read them
        if x_TD.dim() == 2 and 0 < T <= ops.MAX_T_DEFAULT:  # the GEMV
            return ops.linear_small(x_TD, weight, module.bias, weight_scale=scale, scale_block=module.block)
        return ops.linear_fp8(x_TD, weight, scale, module.block, module.bias)  # the blocked GEMM
    if x_TD.dim() == 2 and 0 < T <= ops.MAX_T and ops.use_kernel(weight.shape[0], weight.shape[1], T, x_TD.device):
        return ops.linear_small(x_TD, weight, module.bias)
    return module(x_TD)


def linear_reference(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float64, rounded once to x's dtype: what linear_small is held to."""
    y = x_TD.double() @ weight_ND.double().T
    if bias_N is not None:
        y = y + bias_N.double()
    return y.to(x_TD.dtype)


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it (vLLM's convention):

        norm(x)            -> y
        norm(x, residual)  -> (y, x + residual), y = weight * normalize(x + residual)

    With `fast` (CUDA) one Triton kernel does both and updates `residual` in place."""

    def __init__(self, dim: int, eps: float, fast: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fast = fast

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fast:
            y = fast_ops().rms_norm(x, self.weight, self.eps, residual_TD=residual)
            return y if residual is None else (y, residual)
        if residual is None:
            return self.weight * rms_normalize(x, self.eps)
        residual = x + residual
        return self.weight * rms_normalize(residual, self.eps), residual


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in float32 and cast back (transformers' order)."""
    x32 = x if x.dtype == torch.float32 else x.float()
    normed = F.rms_norm(x32, (x32.shape[-1],), eps=eps)  # one fused op: x * rsqrt(mean(x^2) + eps)
    return normed if x.dtype == torch.float32 else normed.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] and the attention factor that scales cos and sin."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base_inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "default":
        return base_inv_freq, 1.0
    if rope.rope_type == "linear":
        return base_inv_freq / rope.factor, 1.0
    return _yarn_inv_freq(rope, head_dim, max_position_embeddings)


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor else max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin for the positions of a step, computed from float32 inverse frequencies."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(rope, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [T, 1, d]: broadcast over heads, computed once per step for all layers."""
        freqs_Td = positions_T[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs_Td, freqs_Td), dim=-1)[:, None, :]
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rope(x_THd: torch.Tensor, cos_T1d: torch.Tensor, sin_T1d: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin as RotaryEmbedding returns them ([T, 1, d])."""
    x1, x2 = x_THd.chunk(2, dim=-1)
    return x_THd * cos_T1d + torch.cat((-x2, x1), dim=-1) * sin_T1d


class DenseMLP(nn.Module):
    """SiLU-gated FFN with gate and up fused into one GEMM: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, fast: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.fast = fast
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fast:
            h_T2F = fast_linear(self.gate_up_proj, x_TD)
            return fast_linear(self.down_proj, fast_ops().silu_and_mul(h_T2F))
        h_T2F = self.gate_up_proj(x_TD)
        gate_TF, up_TF = h_T2F.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate_TF) * up_TF)
