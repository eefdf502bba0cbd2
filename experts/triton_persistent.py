"""The persistent expert GEMMs for large T, fed through the tensor memory accelerator, and the
combine over a token's K copies; experts/triton_moe.py's launchers take them where a config asks
(`KernelConfig.tma`) and `tma_programs` allows, its pointer kernels (same math) everywhere else.

Legend as in experts/triton_moe.py (N copies, E local experts, D hidden, F expert FFN width, M
padded rows in BM-row blocks). min(SMs, static tiles) programs walk the tiles of the local experts'
rows (num_padded[1], router/align.py) with a stride of the grid:

    gate/up: weight tiles of w13 as [E*2F, D] through TMA, the copies' rows of x gathered by pointer
             (padding rows read copy 0's row and are not stored), SiLU-and-mul -> act[padded row]
    down:    act [M, F] and w2 as [E*D, F] tiles through TMA, its tile and K loops flattened (as
             Triton's persistent-matmul tutorial does), times the routing weight -> y[copy]; then
             the zero bucket's tiles (rows num_padded[1] .. num_padded[0]) store zeros, reading nothing

Measured on the H200 at 16,384 tokens of the 235B shape (DESIGN.md, "Fused MoE"): gate/up 5,190-
5,670 us against the pointer kernel's 6,397, down 2,470-2,640 against 4,025, combine 277 against
torch.sum's 436. Host-side descriptors: a CUDA graph bakes them with the buffers it captured.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from expertmesh.experts.moe_config import KernelConfig
from expertmesh.experts.triton_fp8 import ExpertScales
from expertmesh.experts.triton_tiles import launch, silu_mul, swizzle


@triton.jit
def _gemm_gate_up_tma_kernel(
    x_ptr, w_desc, act_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_copies, F, D, stride_xt, stride_am, num_programs,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_gemm_gate_up_kernel for 16-bit weights, persistent: num_programs programs walk the tiles of
    the local experts' rows (num_padded[1]; the zero bucket has nothing to compute here), weight
    tiles through TMA (w_desc: w13 as [E*2F, D]), activation rows gathered by pointer. Padding rows
    load copy 0's row, unmasked, and are not stored."""
    num_pid_n = F // BLOCK_N
    num_pid_m = tl.load(num_padded_ptr + 1) // BLOCK_M
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        copies = tl.load(sorted_ids_ptr + rows)
        row_ok = copies < num_copies
        a_ptrs = x_ptr + (tl.where(row_ok, copies, 0) // TOP_K).to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
        gate_row = expert * 2 * F + pid_n * BLOCK_N
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = tl.load(a_ptrs)
            acc_gate = tl.dot(a, w_desc.load([gate_row, k0]).T, acc_gate)
            acc_up = tl.dot(a, w_desc.load([gate_row + F, k0]).T, acc_up)
            a_ptrs += BLOCK_K
        h = silu_mul(acc_gate, acc_up).to(act_ptr.dtype.element_ty)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :], h, mask=row_ok[:, None])


@triton.jit
def _gemm_down_tma_kernel(
    a_desc, w_desc, y_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_copies, D, F, stride_yc, num_programs,
    HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_gemm_down_kernel for 16-bit weights, persistent: one flattened loop over the local experts'
    tiles and their K steps (act tiles through a_desc [M, F], weight tiles through w_desc: w2 as
    [E*D, F]), then the zero bucket's tiles, which store zeros and read nothing."""
    num_pid_n = D // BLOCK_N
    expert_m = tl.load(num_padded_ptr + 1) // BLOCK_M
    for tile in tl.range(tl.program_id(0), expert_m * num_pid_n, num_programs, flatten=True):
        pid_m, pid_n = swizzle(tile, expert_m, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        w_row = expert * D + pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k0]), w_desc.load([w_row, k0]).T, acc)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        copies = tl.load(sorted_ids_ptr + rows)
        row_ok = copies < num_copies
        if HAS_WEIGHTS:
            acc = acc * tl.load(weights_ptr + copies, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + copies.to(tl.int64)[:, None] * stride_yc + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    num_m = tl.load(num_padded_ptr) // BLOCK_M
    for tile in range(tl.program_id(0) + expert_m * num_pid_n, num_m * num_pid_n, num_programs):
        rows = (tile // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        copies = tl.load(sorted_ids_ptr + rows)
        offs_n = (tile % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + copies.to(tl.int64)[:, None] * stride_yc + offs_n[None, :],
                 tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty), mask=(copies < num_copies)[:, None])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, T, D, stride_yc, stride_ot,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_k y[t*K + k], added in float32 in k order and rounded once."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    y_ptrs = y_ptr + (offs_t * TOP_K).to(tl.int64)[:, None] * stride_yc + offs_d[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptrs + k * stride_yc, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETER_PROGRAMS = 3
"""Programs of a persistent kernel in Triton's interpreter (the CPU tests): a few, so that each
walks several tiles."""


@functools.cache
def _multiprocessors(index: int) -> int | None:
    """SMs of CUDA device `index`, None where it has no tensor memory accelerator (NVIDIA before
    sm_90; ROCm builds take the pointer kernels)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count if props.major >= 9 and torch.version.hip is None else None


def _tma_addressable(t: torch.Tensor) -> bool:
    """What a TMA descriptor over t's rows needs: unit stride along the last dim, 16-byte aligned
    base and row stride."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def tma_programs(config: KernelConfig, act: torch.Tensor, weight: torch.Tensor, scales: ExpertScales | None, *,
                  n_ok: bool, k_ok: bool, act_tma: bool = False) -> int | None:
    """Programs of the persistent TMA kernel for this launch, or None for the pointer kernel: the
    config asks for TMA, the weights are 16-bit without scales in the activations' dtype, contiguous
    and TMA-addressable (as are the activations where `act_tma`: the down GEMM reads them through
    TMA too), the tiles divide the shape, and the device has TMA (or the interpreter runs the
    kernels)."""
    if not (config.tma and scales is None and n_ok and k_ok and weight.dtype in (torch.bfloat16, torch.float16)
            and act.dtype == weight.dtype and weight.is_contiguous() and act.stride(-1) == 1
            and _tma_addressable(weight) and (not act_tma or _tma_addressable(act))):
        return None
    if weight.device.type == "cuda":
        return _multiprocessors(weight.device.index if weight.device.index is not None
                                else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS if os.environ.get("TRITON_INTERPRET") == "1" else None


def combine_copies(y_ND: torch.Tensor, out_TD: torch.Tensor, top_k: int) -> torch.Tensor:
    """out_TD[t] = sum over k of y_ND[t*K + k]: float32 additions in k order, one rounding (torch.sum
    up to the order of its float32 additions), in one pass over y; torch's reduction over the middle
    dim of [T, K, D] took 436 us for 16,384 tokens of the 235B shape on the H200, this 277."""
    T, D = out_TD.shape
    if T == 0:
        return out_TD
    if y_ND.stride(-1) != 1 or out_TD.stride(-1) != 1 or y_ND.shape != (T * top_k, D):
        raise ValueError(f"combine_copies takes row-major y [{T * top_k}, {D}] and out [{T}, {D}], got "
                         f"{tuple(y_ND.shape)} and {tuple(out_TD.shape)}")
    block_d = min(triton.next_power_of_2(D), 512)
    block_t = max(1, 2048 // block_d)
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
        y_ND, out_TD, T, D, y_ND.stride(0), out_TD.stride(0), TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4)
    return out_TD


def gemm_gate_up_tma(x_TD: torch.Tensor, w13_EFD: torch.Tensor, act_MF: torch.Tensor, sorted_ids_M: torch.Tensor,
                     block_expert_B: torch.Tensor, num_padded: torch.Tensor, *, num_copies: int, top_k: int,
                     block_m: int, block_n: int, block_k: int, config: KernelConfig, programs: int) -> None:
    """experts/triton_moe.gemm_gate_up on the persistent kernel (its caller checked `tma_programs`)."""
    E, F2, D = w13_EFD.shape
    grid_n = min(programs, block_expert_B.shape[0] * (F2 // 2 // block_n))
    launch(_gemm_gate_up_tma_kernel, (grid_n,),
           (x_TD, TensorDescriptor.from_tensor(w13_EFD.view(E * F2, D), [block_n, block_k]), act_MF, sorted_ids_M,
            block_expert_B, num_padded, num_copies, F2 // 2, D, x_TD.stride(0), act_MF.stride(0), grid_n),
           num_warps=config.num_warps, num_stages=config.num_stages,
           TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config.GROUP_M)


def gemm_down_tma(act_MF: torch.Tensor, w2_EDF: torch.Tensor, y_ND: torch.Tensor, sorted_ids_M: torch.Tensor,
                  block_expert_B: torch.Tensor, num_padded: torch.Tensor, *, num_copies: int, block_m: int,
                  block_n: int, block_k: int, config: KernelConfig, weights_N: torch.Tensor | None,
                  programs: int) -> None:
    """experts/triton_moe.gemm_down on the persistent kernel (its caller checked `tma_programs`)."""
    E, D, F = w2_EDF.shape
    grid_n = min(programs, block_expert_B.shape[0] * (D // block_n))
    launch(_gemm_down_tma_kernel, (grid_n,),
           (TensorDescriptor.from_tensor(act_MF, [block_m, block_k]),
            TensorDescriptor.from_tensor(w2_EDF.view(E * D, F), [block_n, block_k]), y_ND,
            weights_N if weights_N is not None else act_MF, sorted_ids_M, block_expert_B, num_padded,
            num_copies, D, F, y_ND.stride(0), grid_n),
           num_warps=config.num_warps, num_stages=config.num_stages,
           HAS_WEIGHTS=weights_N is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
           GROUP_M=config.GROUP_M)
