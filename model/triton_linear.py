"""y = x @ W^T for a few rows of x (decode): a Triton GEMV that streams the weight once at the
memory's rate, beside its plain-torch reference `model.layers.linear_reference`
(tests/test_triton_linear.py holds it to it). `model.layers.fast_linear` picks it on the fast path.

Legend: T rows of x (T <= MAX_T), K input features, N output features; W is [N, K] row-major
(nn.Linear's weight), bf16/fp16/fp32 like x.

At decode the projections of a layer are matrix-vector products: cuBLAS runs them at 60-70% of
the HBM bandwidth and takes ~5 us for the router gate's 0.5 MB, where one round trip to memory
would do. Here one program takes BLOCK_N rows of W and walks K in BLOCK_K chunks (16-byte vector
loads: BLOCK_K a multiple of 8 halves), all T rows of x at once, float32 accumulation, and
writes its [T, BLOCK_N] outputs (bias added in float32, then rounded once, as cuBLAS's epilogue).
Two inner products, chosen per shape by the configs table:

  - "fma": elementwise products in registers. T = 1 accumulates [BLOCK_N, BLOCK_K] partial sums
    and reduces once at the end; T > 1 reduces each chunk over K. Any BLOCK_N, down to 1 row per
    program, so even the gate's 128 rows spread over 128 SMs, each reading its row in one go.
  - "dot": tl.dot on x padded to 16 rows ([16, BLOCK_K] x [BLOCK_K, BLOCK_N], BLOCK_N >= 16): the
    tensor cores do the (wasted, cheap) multiply and Triton's pipeliner keeps num_stages weight
    tiles in flight through asynchronous copies; one compiled kernel serves every T <= 16.

No split-K: the grid is cdiv(N, BLOCK_N) programs, which for the decode shapes fills the GPU at
BLOCK_N <= 16 (and the gate runs at 1-2 rows a program). No host sync, no atomics (the result is
deterministic); the grid depends only on N and the config, so a CUDA graph captures it.

Configs: `select_config(N, K, T, device_name)` reads model/configs/linear_*.json
({device name: {"N,K": {"1": config, "2": ..., "4": ..., "8": ..., "max_t": m}}}, written by
`python -m expertmesh.bench.linear`), where max_t is the largest T at which this kernel beat
F.linear in the measurement (None is returned above it: the caller keeps cuBLAS); shapes not in
the table take `heuristic_config` up to MAX_T_DEFAULT. Imports triton: only the fast path loads it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from expertmesh.experts.triton_fp8 import A8_MIN_BLOCK_K, ExpertScales, fp8_block_k, quantize_rows
from expertmesh.experts.triton_moe import gemm_down
from expertmesh.experts.triton_pdl import pdl, pdl_wait

MAX_T = 16
"""Most rows the kernel takes (the dot form pads x to 16 rows)."""
MAX_T_DEFAULT = 8
"""Rows up to which shapes without a measured entry use the kernel (CUDA-graph batch sizes 1-8)."""
T_BUCKETS = (1, 2, 4, 8, 16)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SMS_DEFAULT = 132  # H200; the heuristic sizes grids for this many SMs off CUDA (the interpreter)
FMA_LIVE_PER_THREAD = 64
"""float32 products a thread holds at once in the FMA form (T_PAD x BLOCK_N x BLOCK_K over the
threads): beyond this the accumulator and the weight tile crowd out the registers."""


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = False

    def t_pad(self, T: int) -> int:
        return 16 if self.dot else triton.next_power_of_2(max(T, 1))

    def fits(self, N: int, K: int, T: int) -> bool:
        """Tile shapes the kernel takes, and an FMA accumulator that stays in registers."""
        if any(v & (v - 1) or v < 1 for v in (self.block_n, self.block_k, self.num_warps)) or T > MAX_T:
            return False
        if self.dot:
            return self.block_n >= 16 and self.block_k >= 16
        return self.t_pad(T) * self.block_n * self.block_k <= FMA_LIVE_PER_THREAD * 32 * self.num_warps


@triton.jit
def _linear_small_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, T, N, K, stride_xt, stride_wn, stride_yt, stride_sn,
    T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_VEC: tl.constexpr,
    A8: tl.constexpr, EXACT_CVT: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, T_PAD)
    n_ok = offs_n < N
    t_ok = offs_t < T
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    if PREFETCH:  # one row, FMA: the first weight tile is read while the kernel before still runs
        if EVEN_K and EVEN_N:
            w_first = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w_first = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0,
                              eviction_policy="evict_first")
    pdl_wait(PDL)  # the weights never change: only x (an earlier kernel's output) must wait
    if USE_DOT:
        acc = tl.zeros([T_PAD, BLOCK_N], dtype=tl.float32)
    elif T_PAD == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([T_PAD, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        x_first = tl.load(x_ptrs, mask=t_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        acc += w_first.to(tl.float32) * x_first.to(tl.float32)
    for k0 in range(BLOCK_K if PREFETCH else 0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=t_ok[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_ptrs + k0, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if A8:  # FP8 weights, x's rows quantized per K tile: e4m3 x e4m3 on the tensor cores
            q, a_s = quantize_rows(x, EXACT_CVT)
            s = tl.load(ws_ptr + (offs_n // SBN) * stride_sn + k0 // SBK, mask=n_ok, other=0.0)
            acc += tl.dot(q, tl.trans(w)) * (a_s[:, None] * s[None, :])
        elif HAS_WS:  # FP8 weights: each element times its (SBN x SBK) block's float32 scale
            if SCALE_VEC:  # the tile lies in one block column: one scale per row
                s = tl.load(ws_ptr + (offs_n // SBN) * stride_sn + k0 // SBK, mask=n_ok, other=0.0)[:, None]
            else:
                s = tl.load(ws_ptr + (offs_n // SBN)[:, None] * stride_sn + ((k0 + offs_k) // SBK)[None, :],
                            mask=n_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            w = (w.to(tl.float32) * s).to(x.dtype)
        if A8:
            pass
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        elif T_PAD == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
    if USE_DOT:
        y = acc
    elif T_PAD == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def heuristic_config(N: int, K: int, T: int, num_sms: int = SMS_DEFAULT) -> LinearConfig:
    """Untuned fallback. Few rows: FMA with BLOCK_N small enough for ~2 programs per SM (1 row a
    program for the gate) and BLOCK_K as long as the accumulator allows; more rows on wide
    outputs: the dot form with 16-row tiles and 4 weight tiles in flight."""
    k_cap = triton.next_power_of_2(max(K, 16))
    if T > 2 and 16 * num_sms // 2 <= N:
        return LinearConfig(block_n=16, block_k=min(256, k_cap), num_warps=4, num_stages=4, dot=True)
    block_n = 16
    while block_n > 1 and triton.cdiv(N, block_n) < 2 * num_sms:
        block_n //= 2
    t_pad = triton.next_power_of_2(max(T, 1))
    block_k = min(k_cap, 4096)
    while block_k > 64 and t_pad * block_n * block_k > FMA_LIVE_PER_THREAD * 32 * 4:
        block_k //= 2
    while t_pad * block_n * block_k > FMA_LIVE_PER_THREAD * 32 * 4:
        block_n //= 2
    return LinearConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2 if block_k < K else 1)


def load_config_table() -> dict:
    """Every model/configs/linear_*.json merged: {device name: {"N,K": {bucket: config, "max_t": m}}}."""
    table: dict = {}
    for path in sorted(CONFIG_DIR.glob("linear_*.json")):
        for device, entries in json.loads(path.read_text()).items():
            table.setdefault(device, {}).update(entries)
    return table


@functools.cache
def _default_table() -> dict:
    return load_config_table()


def t_bucket(T: int) -> int:
    return next(b for b in T_BUCKETS if b >= T)


def select_config(N: int, K: int, T: int, device_name: str | None, table: dict | None = None,
                  num_sms: int = SMS_DEFAULT) -> LinearConfig | None:
    """The config for T rows of an [N, K] weight on this device, or None where F.linear should run
    (T above the entry's measured max_t, or above MAX_T_DEFAULT for a shape without an entry)."""
    if not 0 < T <= MAX_T:
        return None
    entry = (_default_table() if table is None else table).get(device_name or "", {}).get(f"{N},{K}")
    if entry is None:
        return heuristic_config(N, K, T, num_sms) if T <= MAX_T_DEFAULT else None
    if int(entry.get("max_t", 0)) < T:
        return None
    spec = entry.get(str(t_bucket(T)))
    config = LinearConfig(**spec) if spec is not None else heuristic_config(N, K, T, num_sms)
    return config if config.fits(N, K, T) else heuristic_config(N, K, T, num_sms)


def config_entry(configs_by_t: dict[int, LinearConfig], max_t: int) -> dict:
    """A table entry in the file's format (what bench/linear.py writes)."""
    return {**{str(t): asdict(c) for t, c in sorted(configs_by_t.items())}, "max_t": int(max_t)}


def linear_small(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, config: LinearConfig | None = None,
                 weight_scale: torch.Tensor | None = None, scale_block: tuple[int, int] = (1, 1),
                 a8: bool | None = None) -> torch.Tensor:
    """F.linear(x_TD, weight_ND, bias) for T <= MAX_T rows: [T, N] in x's dtype (into `out`, a
    [T, N] buffer of that dtype with unit stride along N, when given). x needs unit stride along K
    (rows may be strided); the weight must be contiguous. `config`: force one (tests, the sweep);
    by default the table's or the heuristic's for this shape, even where select_config would
    return None (the caller decides whether to come here). FP8 weights (float8 e4m3) come with
    `weight_scale`, float32 [ceil(N/bn), ceil(K/bk)] for blocks of `scale_block` = (bn, bk)."""
    if x_TD.dim() != 2 or weight_ND.dim() != 2 or x_TD.shape[1] != weight_ND.shape[1]:
        raise ValueError(f"x {tuple(x_TD.shape)} and weight {tuple(weight_ND.shape)} do not multiply")
    T, K = x_TD.shape
    N = weight_ND.shape[0]
    if T > MAX_T:
        raise ValueError(f"linear_small takes at most {MAX_T} rows, got {T}")
    fp8 = weight_ND.dtype == torch.float8_e4m3fn
    if fp8 != (weight_scale is not None):
        raise ValueError(f"a {weight_ND.dtype} weight with weight_scale {weight_scale is not None}: FP8 (float8 e4m3) "
                         "weights need their scales, and other weights take none")
    if fp8 and (weight_scale.dtype != torch.float32 or weight_scale.stride(-1) != 1):
        raise ValueError("weight_scale must be float32 with unit stride along K")
    if (x_TD.dtype != weight_ND.dtype and not fp8) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"x is {x_TD.dtype}, the weight {weight_ND.dtype}"
                         + ("" if bias is None else f", bias {tuple(bias.shape)} for N={N}"))
    if not weight_ND.is_contiguous():
        raise ValueError("the weight must be contiguous ([N, K] row-major)")
    if x_TD.stride(1) != 1:
        x_TD = x_TD.contiguous()
    if out is None:
        out = x_TD.new_empty(T, N)
    elif out.shape != (T, N) or out.dtype != x_TD.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{T}, {N}] {x_TD.dtype} with unit stride along N")
    if T == 0 or N == 0:
        return out
    sixteen_bit = x_TD.dtype in (torch.bfloat16, torch.float16)
    a8 = fp8 and sixteen_bit and (FP8_GEMV_A8 if a8 is None else a8)
    if config is None:
        config = fp8_gemv_config(N, K) if fp8 and sixteen_bit else _auto_config(N, K, T, x_TD.device)
    elif not config.fits(N, K, T):
        raise ValueError(f"config {config} does not fit T={T}")
    if fp8 and weight_scale.shape != (-(-N // scale_block[0]), -(-K // scale_block[1])):
        raise ValueError(f"weight_scale {tuple(weight_scale.shape)} is not the {scale_block} block grid of [{N}, {K}]")
    if fp8 and scale_block[1] % config.block_k:  # K tiles inside one scale column: one scale per row
        config = replace(config, block_k=fp8_block_k(config.block_k, scale_block[1]))
    if a8:  # W8A8 in the dot form, where the tiles take it
        a8 = (config.dot and scale_block[1] % config.block_k == 0 and config.block_k >= A8_MIN_BLOCK_K
              and config.block_n >= 16)
    on = pdl(x_TD.device)
    _linear_small_kernel[(triton.cdiv(N, config.block_n),)](
        x_TD, weight_ND, weight_ND if bias is None else bias, out, weight_scale if fp8 else out, T, N, K,
        x_TD.stride(0), weight_ND.stride(0), out.stride(0), weight_scale.stride(0) if fp8 else 0,
        T_PAD=config.t_pad(T), BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.dot,
        HAS_BIAS=bias is not None, EVEN_K=K % config.block_k == 0, EVEN_N=N % config.block_n == 0,
        PRECISION="ieee" if x_TD.dtype == torch.float32 else "tf32",
        HAS_WS=fp8, SBN=scale_block[0], SBK=scale_block[1], SCALE_VEC=scale_block[1] % config.block_k == 0,
        A8=a8, EXACT_CVT=x_TD.device.type != "cuda", PDL=on,
        PREFETCH=PREFETCH_WEIGHTS and config.t_pad(T) == 1 and not config.dot and not fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages, launch_pdl=bool(on))
    return out


PREFETCH_WEIGHTS = True
"""The one-row FMA GEMV loads its first weight tile before it waits for the kernel before it
(under PDL, experts/triton_pdl.py; the same sums without): the weights never change, only the
input row must wait."""

FP8_GEMV_A8 = False
"""Whether FP8 weights with 16-bit rows take the W8A8 dot form by default (`linear_small(a8=...)`
overrides it). Measured on the H200 from HBM at one row, best of each form: 30B qkv 8.7 us W8A16
against 11.8 W8A8, o_proj 9.9 against 16.5, 235B qkv 19.9 against 26.8, o_proj 21.7 against 31.2
(the dot form quantizes x's tile with a row reduction every K step). W8A16 stays the default."""

FP8_GEMV_CONFIG = LinearConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, dot=True)
"""The FP8 GEMV's tiles: 32 output rows a program, K tiles of one 128-wide scale block (one scale
per row), on the tensor cores with the weights scaled into x's dtype (W8A16) or x quantized (W8A8);
the best of 36 configs on three of the four decode shapes measured from HBM on the H200."""


def fp8_gemv_config(N: int, K: int) -> LinearConfig:
    """FP8_GEMV_CONFIG cut to small test shapes (power-of-two tiles no larger than needed)."""
    return replace(FP8_GEMV_CONFIG, block_n=max(16, min(FP8_GEMV_CONFIG.block_n, triton.next_power_of_2(N))),
                   block_k=max(16, min(FP8_GEMV_CONFIG.block_k, triton.next_power_of_2(K))))


@functools.cache
def device_name(device: torch.device) -> str:
    """The name configs are keyed by: torch's CUDA device name ("NVIDIA H200"), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SMS_DEFAULT


@functools.lru_cache(maxsize=1024)
def use_kernel(N: int, K: int, T: int, device: torch.device) -> bool:
    """Whether fast_linear takes the kernel for this call (T within the shape's measured max_t)."""
    return select_config(N, K, T, device_name(device), num_sms=num_sms(device)) is not None


@functools.lru_cache(maxsize=1024)
def _auto_config(N: int, K: int, T: int, device: torch.device) -> LinearConfig:
    config = select_config(N, K, T, device_name(device), num_sms=num_sms(device))
    return config if config is not None else heuristic_config(N, K, T, num_sms(device))


__all__ = [
    "MAX_T",
    "LinearConfig",
    "config_entry",
    "heuristic_config",
    "linear_small",
    "load_config_table",
    "select_config",
    "use_kernel",
]


def fp8_gemm_config(T: int, N: int, K: int) -> tuple[int, object]:
    """(BLOCK_M, KernelConfig) of `linear_fp8`: row tiles sized to T (the weight is read once per
    tile of rows), 128-wide K tiles that match Qwen's 128x128 scale blocks (one scale per row of
    a tile), power-of-two tiles no larger than the small test shapes need."""
    from expertmesh.experts.moe_config import KernelConfig

    block_m = 16 if T <= 16 else 32 if T <= 32 else 64 if T <= 1024 else 128
    block_n = min(128 if T <= 1024 else 256, triton.next_power_of_2(max(N, 16)))
    block_k = min(128, triton.next_power_of_2(max(K, 16)))
    return block_m, KernelConfig(block_n, block_k, GROUP_M=8, num_warps=8 if block_m >= 128 else 4, num_stages=3)


def linear_fp8(x_TD: torch.Tensor, weight_ND: torch.Tensor, weight_scale: torch.Tensor, scale_block: tuple[int, int],
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantized(W)^T (+ bias) for any number of rows, W float8 e4m3 [N, K] with float32
    scales per `scale_block`: the blocked expert kernel (experts/triton_moe.py `gemm_down`) with
    one expert and every row routed to it, so each weight tile is read once per BLOCK_M rows. 16-bit
    x is quantized per row and 128-wide K tile and multiplied e4m3 x e4m3 on the tensor cores
    (W8A8); float32 x (the CPU runs) meets each weight tile scaled into its dtype (W8A16). Where
    `linear_small` takes over at few rows, this is the FP8 path of prefill and large decode
    batches. No host sync: the row map is made on the device."""
    T, K = x_TD.shape
    N = weight_ND.shape[0]
    if weight_ND.dtype != torch.float8_e4m3fn or weight_scale.shape != (-(-N // scale_block[0]),
                                                                        -(-K // scale_block[1])):
        raise ValueError(f"linear_fp8 takes float8 e4m3 weights and their {scale_block} block grid, got "
                         f"{weight_ND.dtype} {tuple(weight_ND.shape)} and scales {tuple(weight_scale.shape)}")
    if x_TD.stride(1) != 1:
        x_TD = x_TD.contiguous()
    if out is None:
        out = x_TD.new_empty(T, N)
    if T == 0:
        return out
    block_m, config = fp8_gemm_config(T, N, K)
    rows = triton.cdiv(T, block_m) * block_m
    sorted_ids = torch.arange(rows, device=x_TD.device, dtype=torch.int32)  # rows >= T are masked (>= num_copies)
    block_expert = torch.zeros(rows // block_m, device=x_TD.device, dtype=torch.int32)
    num_padded = torch.full((2,), rows, device=x_TD.device, dtype=torch.int32)
    grid = weight_scale[None]
    gemm_down(x_TD, weight_ND[None], out, sorted_ids, block_expert, num_padded, num_copies=T, block_m=block_m,
              config=config, scales=ExpertScales(grid, grid, scale_block, scale_block))
    if bias is not None:
        out += bias
    return out
