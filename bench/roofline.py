"""Rooflines: the fastest a step could possibly run on this device, from measured rates.

`measure_rates` times a large device copy (bytes moved = read + write), a large matmul in the
model's dtype and, on GPUs with FP8 tensor cores, the same matmul in e4m3; `step_ceiling` holds
one forward step of a model against them (FP8 weights: one byte a weight, the FP8 rate):

  bytes  = dense weights + lm_head + the experts the step's tokens touch + KV read
  FLOPs  = 2 * active parameters * tokens + attention (QK and PV over the context)
  time  >= max(bytes / bandwidth, FLOPs / matmul rate)

Experts touched per layer, with T tokens each picking k of E experts at random:
E * (1 - (1 - k/E)^T) (all E once T is large).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from expertmesh.model.config import ModelConfig


@dataclass(frozen=True)
class DeviceRates:
    copy_gb_s: float
    matmul_tflop_s: float
    fp8_matmul_tflop_s: float = 0.0
    """e4m3 x e4m3 -> bf16 (torch._scaled_mm, per-tensor scales) where the device has FP8 tensor
    cores, else 0 (the FP8 ceilings then count the bf16 rate)."""

    @property
    def fp8_or_bf16_tflop_s(self) -> float:
        return self.fp8_matmul_tflop_s or self.matmul_tflop_s


def _timed(fn, device, repeats: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_rates(device: torch.device, dtype: torch.dtype) -> DeviceRates:
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), device)
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    mm_s = _timed(lambda: a @ b, device)
    fp8_tflop_s = 0.0
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()  # cuBLASLt: B column-major
        one = torch.ones((), device=device)
        fp8_s = _timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
        fp8_tflop_s = 2 * size ** 3 / fp8_s / 1e12
    return DeviceRates(copy_gb_s=2 * n_bytes / copy_s / 1e9, matmul_tflop_s=2 * size ** 3 / mm_s / 1e12,
                       fp8_matmul_tflop_s=fp8_tflop_s)


def step_ceiling(config: ModelConfig, rates: DeviceRates, dtype: torch.dtype, num_tokens: int,
                 num_seqs: int, context_len: int, ep_size: int = 1, fp8_weights: bool = False) -> float:
    """Lower bound, in seconds, of one step computing `num_tokens` tokens of `num_seqs` sequences
    whose context is about `context_len` tokens, on each of `ep_size` expert-parallel ranks with
    data-parallel attention (each rank: all dense weights, 1/ep_size of the sequences and of the
    experts). Communication is not counted: this is the compute-side ceiling. `fp8_weights`:
    the attention projections, FFNs and experts are read as one byte a weight (their scales,
    1/16,384 of it with 128x128 blocks, are left out); the embedding and lm_head stay `dtype`."""
    c = config
    itemsize = torch.empty((), dtype=dtype).element_size()
    linear_itemsize = 1 if fp8_weights else itemsize
    tokens, seqs = num_tokens / ep_size, num_seqs / ep_size
    attn_params = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    expert_params = 3 * c.hidden_size * c.moe_intermediate_size
    dense_ffn = 3 * c.hidden_size * c.intermediate_size
    shared = 3 * c.hidden_size * c.shared_expert_intermediate_size
    num_moe = len(c.moe_layers)
    num_dense = c.num_layers - num_moe
    lm_head = c.vocab_size * c.hidden_size
    # Experts of this rank that the step's copies (from every rank's tokens) touch.
    touched = (c.num_experts / ep_size) * (1 - (1 - c.top_k / c.num_experts) ** num_tokens) if c.is_moe else 0.0
    weight_bytes = (linear_itemsize * (c.num_layers * attn_params + num_dense * dense_ffn
                                       + num_moe * (touched * expert_params + shared)) + itemsize * lm_head)
    kv_bytes = itemsize * 2 * c.kv_size * c.num_layers * seqs * context_len
    dense_flops = 2 * tokens * (c.num_layers * attn_params + num_dense * dense_ffn + num_moe * shared)
    expert_flops = 2 * num_moe * expert_params * c.top_k * num_tokens / ep_size
    attn_flops = 4 * c.q_size * c.num_layers * tokens * context_len
    flops = dense_flops + expert_flops + attn_flops + 2 * lm_head * seqs
    rate = rates.fp8_or_bf16_tflop_s if fp8_weights else rates.matmul_tflop_s
    return max((weight_bytes + kv_bytes) / (rates.copy_gb_s * 1e9), flops / (rate * 1e12))
