"""The small-batch GEMV (model/triton_linear.py `linear_small`) against its plain-torch reference
(model/layers.py `linear_reference`, float64), its configs table, and `fast_linear`'s choice.

On the CPU the kernel runs in Triton's interpreter (float32, float16; small ragged shapes, both
inner-product forms forced by config); the `gpu` tests run bf16 at the Qwen3-30B-A3B and
Qwen3-235B-A22B decode shapes (qkv, o_proj, router gate) for T = 1, 2, 4, 8, every config the
benchmark sweeps, and a CUDA-graph replay. Outputs start as NaN so an unwritten element fails.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from expertmesh.model import triton_linear
from expertmesh.model.layers import fast_linear, linear_reference
from expertmesh.model.triton_linear import LinearConfig, heuristic_config, linear_small, select_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter shapes; the gpu tests run real ones")

FMA_1ROW = LinearConfig(block_n=1, block_k=128, num_warps=4, num_stages=1)
FMA_WIDE = LinearConfig(block_n=8, block_k=32, num_warps=2, num_stages=2)
FMA_WHOLE_K = LinearConfig(block_n=4, block_k=256, num_warps=4, num_stages=1)
DOT = LinearConfig(block_n=16, block_k=32, num_warps=4, num_stages=3, dot=True)
CONFIGS = {"fma_1row": FMA_1ROW, "fma_wide": FMA_WIDE, "fma_whole_k": FMA_WHOLE_K, "dot": DOT}


def operands(T, N, K, dtype, seed, bias=False, device=DEV):
    """x ~ N(0, 1), W ~ N(0, 1/K): outputs of order one whatever K."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    return x.to(device, dtype), w.to(device, dtype), None if b is None else b.to(device, dtype)


def check(x, w, b, config, tol=None):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    got = linear_small(x, w, b, out=out, config=config)
    assert got is out
    torch.testing.assert_close(got, linear_reference(x, w, b), **(tol or TOL[x.dtype]))


# ---- CPU: the kernel in Triton's interpreter ------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("T", "N", "K"), [(1, 96, 80), (2, 37, 200), (3, 128, 64), (5, 50, 256), (8, 19, 40)])
def test_kernel_equals_reference(dtype, config, T, N, K):
    """Ragged N and K (masked tails), T from 1 to 8 (T_PAD 1, 2, 4, 8, and 16 for the dot form)."""
    x, w, b = operands(T, N, K, dtype, seed=T * N + K, bias=T % 2 == 1)
    check(x, w, b, CONFIGS[config])


@interpreter
@pytest.mark.parametrize("T", [1, 4, 16])
def test_heuristic_config_and_strided_rows(T):
    """No config: the heuristic's; x a column slice of a wider tensor (rows strided)."""
    wide, w, b = operands(T, 40, 96, torch.float32, seed=T, bias=True)
    x = wide[:, 16:80]
    w = w[:, :64].contiguous()
    assert x.stride(0) == 96
    check(x, w, b, None)
    assert linear_small(x, w).shape == (T, 40)


@interpreter
def test_bias_is_added_once():
    x, w, b = operands(2, 24, 64, torch.float32, seed=1, bias=True)
    without = linear_small(x, w, config=FMA_WIDE)
    torch.testing.assert_close(linear_small(x, w, b, config=FMA_WIDE) - without, b.expand(2, -1), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(linear_small(x, w, b, config=DOT) - without, b.expand(2, -1), atol=1e-5, rtol=1e-5)


def test_bad_operands_are_refused():
    x, w, _ = operands(2, 24, 64, torch.float32, seed=2)
    with pytest.raises(ValueError, match="multiply"):
        linear_small(x, w[:, :32].contiguous())
    with pytest.raises(ValueError, match="at most"):
        linear_small(torch.randn(17, 64, device=DEV), w)
    with pytest.raises(ValueError, match="float16"):
        linear_small(x.half(), w)
    with pytest.raises(ValueError, match="contiguous"):
        linear_small(x, torch.randn(64, 24, device=DEV).T)
    with pytest.raises(ValueError, match="out must be"):
        linear_small(x, w, out=torch.empty(2, 23, device=DEV))
    with pytest.raises(ValueError, match="does not fit"):
        linear_small(x, w, config=LinearConfig(block_n=8, block_k=32, dot=True))  # dot tiles need 16 rows
    assert linear_small(x[:0], w).shape == (0, 24)


def test_config_table_buckets_max_t_and_fallbacks():
    entry = triton_linear.config_entry({1: FMA_1ROW, 2: FMA_WIDE, 4: DOT, 8: DOT}, max_t=4)
    table = {"NVIDIA H200": {"5120,2048": entry}}
    assert select_config(5120, 2048, 1, "NVIDIA H200", table) == FMA_1ROW
    assert select_config(5120, 2048, 2, "NVIDIA H200", table) == FMA_WIDE
    assert select_config(5120, 2048, 3, "NVIDIA H200", table) == DOT  # bucket 4
    assert select_config(5120, 2048, 5, "NVIDIA H200", table) is None  # above the measured max_t: cuBLAS
    assert select_config(2048, 4096, 8, "NVIDIA H200", table) == heuristic_config(2048, 4096, 8)  # no entry
    assert select_config(2048, 4096, 9, "NVIDIA H200", table) is None
    assert select_config(5120, 2048, 1, "other GPU", table) == heuristic_config(5120, 2048, 1)
    never = {"NVIDIA H200": {"128,2048": triton_linear.config_entry({1: FMA_1ROW}, max_t=0)}}
    assert select_config(128, 2048, 1, "NVIDIA H200", never) is None  # cuBLAS won even at one row


@pytest.mark.parametrize(("N", "K"), [(5120, 2048), (2048, 4096), (128, 2048), (9216, 4096), (4096, 8192),
                                      (128, 4096), (96, 80), (1, 64)])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 8, 16])
def test_heuristic_configs_fit_and_fill_the_gpu(N, K, T):
    config = heuristic_config(N, K, T)
    assert config.fits(N, K, T)
    assert config.block_k <= max(16, triton_linear.triton.next_power_of_2(K))
    assert -(-N // config.block_n) >= min(N, 128)  # the gate: a row a program; wide outputs: >= 128 programs


def test_shipped_config_tables_hold_valid_entries():
    for device, entries in triton_linear.load_config_table().items():
        for key, entry in entries.items():
            N, K = map(int, key.split(","))
            for t in triton_linear.T_BUCKETS:
                if str(t) in entry:
                    assert LinearConfig(**entry[str(t)]).fits(N, K, t), (device, key, t)
            assert 0 <= int(entry["max_t"]) <= triton_linear.MAX_T


@interpreter
@pytest.mark.parametrize("bias", [False, True])
def test_fast_linear_takes_the_kernel_for_few_rows_only(monkeypatch, bias):
    module = nn.Linear(64, 40, bias=bias)
    calls = []
    inner = triton_linear.linear_small
    monkeypatch.setattr(triton_linear, "linear_small", lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k))
    for T in (1, 3, 8, 9, 40):
        x = torch.randn(T, 64)
        with torch.no_grad():
            torch.testing.assert_close(fast_linear(module, x), module(x), atol=1e-5, rtol=1e-5)
    assert calls == [1, 3, 8]  # MAX_T_DEFAULT rows at most without a measured entry


# ---- GPU: bf16 at the decode shapes ----------------------------------------------------------------------------

GPU_SHAPES = {"30b_qkv": (5120, 2048), "30b_o_proj": (2048, 4096), "30b_gate": (128, 2048),
              "235b_qkv": (9216, 4096), "235b_o_proj": (4096, 8192), "235b_gate": (128, 4096)}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_bf16_every_swept_config_equals_reference(shape, T):
    """The table's (or heuristic's) config and every candidate the benchmark sweeps, so whatever
    the sweep writes into the table has been held to the reference."""
    from expertmesh.bench.linear import candidates

    N, K = GPU_SHAPES[shape]
    x, w, b = operands(T, N, K, torch.bfloat16, seed=N + K + T, bias=True)
    check(x, w, b, None)  # Qwen2's qkv has a bias
    for config in candidates(N, K, T):  # without: the kernels the benchmark compiles (Triton caches them)
        check(x, w, None, config)


@pytest.mark.gpu
def test_gpu_fp32_and_fp16_weights():
    for dtype in (torch.float32, torch.float16):
        x, w, b = operands(3, 2048, 1024, dtype, seed=5, bias=True)
        check(x, w, b, None, tol=dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-3, rtol=1e-3))


@pytest.mark.gpu
def test_gpu_graph_replay_takes_new_inputs_without_host_sync():
    N, K, T = 5120, 2048, 4
    x, w, b = operands(T, N, K, torch.bfloat16, seed=7, bias=True)
    out = torch.empty(T, N, dtype=torch.bfloat16, device="cuda")
    linear_small(x, w, b, out=out)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_small(x, w, b, out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear_small(x, w, b, out=out)
    new_x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
    x.copy_(new_x)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, linear_small(new_x, w, b))
    torch.testing.assert_close(out, linear_reference(new_x, w, b), **TOL[torch.bfloat16])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", ["fma_1row", "fma_wide", "dot"])
@pytest.mark.parametrize("block", [(16, 16), (1, None)], ids=["block16", "channel"])
def test_fp8_weights_equal_their_dequantized_reference(dtype, config, block):
    """FP8 e4m3 weights with float32 scales per block (ragged: N = 50, K = 72 leave partial edge
    blocks) or per row: the kernel equals the float64 reference on the dequantized weights."""
    from expertmesh.model.quantization import dequantize_blocks, quantize_blocks

    T, N, K = 3, 50, 72
    x, w, _ = operands(T, N, K, torch.float32, seed=9)
    block = (block[0], block[1] or K)
    q, scale = quantize_blocks(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (-(-N // block[0]), -(-K // block[1]))
    w_deq = dequantize_blocks(q, scale, block)
    x = x.to(dtype)
    out = torch.full((T, N), float("nan"), dtype=dtype)
    got = linear_small(x, q, out=out, config=CONFIGS[config], weight_scale=scale, scale_block=block)
    torch.testing.assert_close(got, (x.double() @ w_deq.double().T).to(dtype), **TOL[dtype])
    with pytest.raises(ValueError, match="block grid"):
        linear_small(x, q, weight_scale=scale[:-1], scale_block=block, config=CONFIGS[config])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_fp8_weights_at_decode_shapes(shape, T):
    """FP8 e4m3 weights with 128x128 block scales (Qwen's layout) at the decode shapes, bf16
    activations, through the config fast_linear picks: W8A16 (the default) equals the float64
    reference on the dequantized weights within bf16 tolerance; W8A8 (x quantized per 128-group,
    FP8 tensor cores) equals it with x quantized the same way, and the plain one within FP8
    tolerance."""
    from expertmesh.model.quantization import dequantize_blocks, fake_quantize_activations, quantize_blocks

    N, K = GPU_SHAPES[shape]
    x, w, _ = operands(T, N, K, torch.bfloat16, seed=N + T)
    q, scale = quantize_blocks(w.float(), (128, 128))
    w_deq = dequantize_blocks(q, scale, (128, 128)).double()
    got = linear_small(x, q, weight_scale=scale, scale_block=(128, 128))  # the default: W8A16
    torch.testing.assert_close(got, (x.double() @ w_deq.T).to(torch.bfloat16), **TOL[torch.bfloat16])
    got = linear_small(x, q, weight_scale=scale, scale_block=(128, 128), a8=True)
    want = (fake_quantize_activations(x, 128).double() @ w_deq.T).to(torch.bfloat16)  # W8A8, groups of 128
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    plain = x.double() @ w_deq.T
    assert ((got.double() - plain).norm() / plain.norm()).item() < 6e-2  # e4m3 activations: 3 mantissa bits


@interpreter
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("block", [(16, 32), (1, 64)], ids=["block32", "channel"])
def test_fp8_gemv_with_16bit_rows_quantizes_them_per_k_tile(T, block):
    """fp16 rows and FP8 weights (K tiles of 32 or more inside the scale blocks) in the W8A8 dot
    form (asked for: W8A16 measured faster and is the default): the float64 reference with x
    quantized per row and K tile as the kernel does (ragged N), clearly not the unquantized x's."""
    from expertmesh.model.quantization import dequantize_blocks, fake_quantize_activations, quantize_blocks
    from expertmesh.model.triton_linear import fp8_gemv_config

    N, K = 50, 64
    x, w, b = operands(T, N, K, torch.float32, seed=T, bias=True)
    q, scale = quantize_blocks(w, block)
    x, b = x.to(torch.float16), b.to(torch.float16)
    got = linear_small(x, q, b, out=torch.full((T, N), float("nan"), dtype=torch.float16), weight_scale=scale,
                       scale_block=block, a8=True)
    group = min(fp8_gemv_config(N, K).block_k, block[1])
    w_deq = dequantize_blocks(q, scale, block).double()
    want = fake_quantize_activations(x, group).double() @ w_deq.T + b.double()
    torch.testing.assert_close(got, want.to(torch.float16), rtol=2e-3, atol=2e-3)
    assert (got.double() - (x.double() @ w_deq.T + b.double())).abs().max() > 8e-3


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("T", "block"), [(9, (16, 16)), (40, (16, 64)), (70, (1, None))])
def test_fp8_blocked_gemm_for_many_rows_equals_the_reference(dtype, T, block):
    """linear_fp8 (the expert GEMM with one expert): rows past a BLOCK_M multiple, ragged N, K,
    per-element and per-row scale tiles, a bias: the float64 reference on the dequantized weights;
    16-bit activations whose K tiles (32 or wider) fit the scale blocks go through the FP8 tensor cores (W8A8),
    and the reference quantizes them as the kernel does (per row and K tile)."""
    from expertmesh.experts.triton_fp8 import A8_MIN_BLOCK_K, fp8_block_k
    from expertmesh.model.quantization import dequantize_blocks, fake_quantize_activations, quantize_blocks
    from expertmesh.model.triton_linear import fp8_gemm_config, linear_fp8

    N, K = 50, 72 if block[1] != 64 else 128
    x, w, b = operands(T, N, K, torch.float32, seed=T, bias=True)
    block = (block[0], block[1] or K)
    q, scale = quantize_blocks(w, block)
    x, b = x.to(dtype), b.to(dtype)
    got = linear_fp8(x, q, scale, block, b)
    w_deq = dequantize_blocks(q, scale, block).double()
    group = fp8_block_k(fp8_gemm_config(T, N, K)[1].BLOCK_K, block[1])
    if dtype != torch.float32 and block[1] % group == 0 and group >= A8_MIN_BLOCK_K:
        want = (fake_quantize_activations(x, group).double() @ w_deq.T + b.double()).to(dtype)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # fp16 output: one ulp is 1e-3
        assert (got.double() - (x.double() @ w_deq.T + b.double())).abs().max() > 8e-3  # quantized
    else:
        torch.testing.assert_close(got, (x.double() @ w_deq.T + b.double()).to(dtype), **TOL[dtype])
    with pytest.raises(ValueError, match="float8 e4m3 weights"):
        linear_fp8(x, w.to(dtype), scale, block)
