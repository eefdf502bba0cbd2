"""The persistent, TMA-fed expert GEMMs and the combine (experts/triton_persistent.py) held to the
references of tests/test_fused_moe.py, and to the pointer kernels they stand in for.

Without CUDA the kernels run in Triton's interpreter (float16: the interpreter of Triton 3.9
multiplies bfloat16 dots wrongly); the `gpu` tests run them compiled, in bf16, at the real shapes.
A spy on the launches asserts that the persistent kernels, not the pointer kernels they fall back
to, ran. Outputs are poisoned (NaN) before every run so an unwritten element fails the comparison.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_fused_moe import (
    SHAPES,
    TOLERANCE,
    assert_bf16_close,
    gpu_tokens,
    gpu_weights,
    interpreter,
    placed_experts,
    poisoned,
    random_weights,
    reference_experts,
    reference_moe,
    routing,
)

from expertmesh.experts import triton_moe, triton_persistent
from expertmesh.experts.moe_config import KernelConfig, MoeConfig
from expertmesh.experts.triton_moe import gemm_down, gemm_gate_up
from expertmesh.experts.triton_persistent import combine_copies
from expertmesh.router.fused_moe import fused_moe, grouped_experts
from expertmesh.router.triton_align import align_blocks

TMA16 = MoeConfig(KernelConfig(32, 32, GROUP_M=2, tma=True), KernelConfig(32, 32, GROUP_M=2, tma=True), block_m=16)
"""The persistent TMA kernels (16-bit weights; 32-wide tiles divide the shapes below, and the
interpreter's INTERPRETER_PROGRAMS programs each walk several tiles)."""


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """Names of the expert kernels launched (the pointer kernels' and the persistent ones') while
    the test runs."""
    names: list[str] = []
    for module in (triton_moe, triton_persistent):
        def spy(kernel, *args, real=module.launch, **kwargs):
            names.append(kernel.fn.__name__)
            return real(kernel, *args, **kwargs)

        monkeypatch.setattr(module, "launch", spy)
    return names


TMA_KERNELS = ["_gemm_gate_up_tma_kernel", "_gemm_down_tma_kernel"]


@interpreter
@pytest.mark.parametrize("kind", ["uniform", "uneven", "one_expert", "placement"])
def test_tma_kernels_equal_the_reference(kind, launched):
    """Uneven loads leave experts empty; a placement table sends copies to the zero bucket, whose
    tiles the down kernel's second loop fills with zeros. float16: the interpreter of Triton 3.9
    multiplies bfloat16 dots wrongly (the pointer kernels too); the GPU tests cover bf16."""
    dtype = torch.float16
    G, E, D, F, K, T = 16, 16, 64, 96, 3, 29
    table = None
    if kind == "placement":
        E = 7
        table = torch.full((G,), -1, dtype=torch.int64)
        table[torch.tensor([14, 2, 9, 5, 11, 0, 7])] = torch.arange(E)
    w13, w2 = random_weights(E, D, F, dtype, seed=T)
    weights, ids = routing("uniform" if kind == "placement" else kind, T, K, G, seed=len(kind))
    x = torch.randn(T, D).to(dtype)
    out = fused_moe(x, weights, ids, w13, w2, expert_to_local_E=table, config=TMA16,
                    out=poisoned(T, D, dtype=dtype))
    assert launched == TMA_KERNELS and not out.isnan().any()
    want = reference_moe(x, weights, ids, w13, w2, table)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    pointer = MoeConfig(*(KernelConfig(c.BLOCK_N, c.BLOCK_K, c.GROUP_M) for c in (TMA16.first, TMA16.second)),
                        block_m=16)
    torch.testing.assert_close(out, fused_moe(x, weights, ids, w13, w2, expert_to_local_E=table, config=pointer),
                               rtol=1e-2, atol=1e-2)


@interpreter
def test_tma_down_writes_every_copy_and_zeros_for_the_zero_bucket(launched):
    G, E, D, F, K, T = 16, 5, 64, 64, 2, 21
    table = torch.full((G,), -1, dtype=torch.int64)
    table[torch.tensor([3, 8, 1, 12, 6])] = torch.arange(E)
    w13, w2 = random_weights(E, D, F, torch.float16, seed=4)
    weights, ids = routing("uniform", T, K, G, seed=4)
    x = torch.randn(T, D).to(torch.float16)
    blocks = align_blocks(ids.reshape(-1), E, 16, table)
    act = poisoned(blocks.sorted_ids_M.shape[0], F, dtype=torch.float16)
    y = poisoned(T * K, D, dtype=torch.float16)
    gemm_gate_up(x, w13, act, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded, num_copies=T * K,
                 top_k=K, block_m=16, config=TMA16.first)
    gemm_down(act, w2, y, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded, num_copies=T * K,
              block_m=16, config=TMA16.second, weights_N=weights.reshape(-1).float())
    assert launched == TMA_KERNELS
    local_N = table[ids.reshape(-1)] >= 0
    assert (~local_N).any() and local_N.any()
    assert not y.isnan().any() and (y[~local_N] == 0).all()
    want = reference_moe(x, weights, ids, w13, w2, table)
    torch.testing.assert_close(y.float().view(T, K, D).sum(1), want, **TOLERANCE[torch.float16])


@interpreter
def test_tma_grouped_experts_give_padding_rows_zeros(launched):
    E, D, F = 5, 64, 64
    counts = torch.tensor([20, 0, 6, 17, 0])
    padding = 23
    expert_N = torch.cat([torch.repeat_interleave(torch.arange(E), counts), torch.full((padding,), E)])
    N = expert_N.numel()
    w13, w2 = random_weights(E, D, F, torch.float16, seed=2)
    x = torch.randn(N, D).to(torch.float16)
    out = grouped_experts(x, expert_N, w13, w2, out=poisoned(N, D, dtype=x.dtype), config=TMA16)
    assert launched == TMA_KERNELS
    real = int(counts.sum())
    torch.testing.assert_close(out[:real].float(), reference_experts(w13, w2)(x[:real].float(), counts),
                               **TOLERANCE[torch.float16])
    assert (out[real:] == 0).all()


@interpreter
def test_tma_configs_fall_back_where_tma_cannot_take_the_launch():
    """float32 weights, FP8 scales, tiles that do not divide the shape, rows of a width TMA cannot
    address: the pointer kernels take the launch, and the result is still right."""
    w13, w2 = random_weights(4, 64, 48, torch.float16)
    x = torch.randn(5, 64).to(torch.float16)
    first = TMA16.first
    assert triton_persistent.tma_programs(first, x.float(), w13.float(), None, n_ok=True, k_ok=True) is None
    assert triton_persistent.tma_programs(first, x, w13, None, n_ok=False, k_ok=True) is None
    assert triton_persistent.tma_programs(first, x, w13, None, n_ok=True, k_ok=False) is None
    assert triton_persistent.tma_programs(first, x, w13, object(), n_ok=True, k_ok=True) is None
    assert triton_persistent.tma_programs(first, x.float(), w13, None, n_ok=True, k_ok=True) is None
    odd = torch.randn(4, 96, 36, dtype=torch.float16)  # 72-byte rows: not 16-byte aligned
    assert triton_persistent.tma_programs(first, x, odd, None, n_ok=True, k_ok=True) is None
    shifted = torch.empty(w13.numel() + 1, dtype=torch.float16)[1:].view(w13.shape)  # contiguous, base off by 2 bytes
    assert shifted.is_contiguous()
    assert triton_persistent.tma_programs(first, x, shifted, None, n_ok=True, k_ok=True) is None
    assert triton_persistent.tma_programs(KernelConfig(32, 32), x, w13, None, n_ok=True, k_ok=True) is None
    act = torch.randn(16, 48 + 4, dtype=torch.float16)  # the down GEMM reads act through TMA too
    assert triton_persistent.tma_programs(first, act[:, :48], w2, None, n_ok=True, k_ok=True, act_tma=True) is None
    assert triton_persistent.tma_programs(first, torch.empty(16 * 48 + 1, dtype=torch.float16)[1:].view(16, 48), w2,
                                    None, n_ok=True, k_ok=True, act_tma=True) is None
    assert triton_persistent.tma_programs(first, act[:, :48].contiguous(), w2, None, n_ok=True, k_ok=True,
                                    act_tma=True) is not None
    weights, ids = routing("uniform", 5, 2, 4)
    out = fused_moe(x, weights, ids, w13, w2, config=TMA16)  # F = 48: 32-wide tiles do not divide it
    torch.testing.assert_close(out.float(), reference_moe(x, weights, ids, w13, w2), **TOLERANCE[torch.float16])


def sequential_sum(y_ND: torch.Tensor, K: int) -> torch.Tensor:
    """sum over k of y[t*K + k] in float32, k in order, rounded once to y's dtype."""
    y = y_ND.view(-1, K, y_ND.shape[1]).float()
    acc = y[:, 0].clone()
    for k in range(1, K):
        acc += y[:, k]
    return acc.to(y_ND.dtype)


@interpreter
@pytest.mark.parametrize(("T", "K", "D"), [(1, 8, 4096), (37, 3, 100), (600, 2, 64)])
def test_combine_copies_equals_torch_sum(T, K, D):
    y = torch.randn(T * K, D).to(torch.bfloat16)
    out = combine_copies(y, poisoned(T, D, dtype=torch.bfloat16), K)
    # float32 accumulation in the kernel's order, one rounding; the interpreter rounds float32 ->
    # bfloat16 toward zero where the GPU rounds to nearest (test_gpu_...: equal): one bf16 unit here
    torch.testing.assert_close(out.float(), sequential_sum(y, K).float(), rtol=2 ** -7, atol=1e-30)
    with pytest.raises(ValueError, match="combine_copies takes"):
        combine_copies(y[:-1], torch.empty(T, D, dtype=torch.bfloat16), K)
    with pytest.raises(ValueError, match="combine_copies takes"):
        combine_copies(torch.randn(D, T * K).t(), torch.empty(T, D), K)


# ---------------------------------------------------------------- GPU (compiled kernels, bf16)

TMA_LARGE = {bm: MoeConfig(KernelConfig(128, 64, 8, 8, 3, tma=True), KernelConfig(256, 64, 8, 8, 3, tma=True),
                           block_m=bm) for bm in (64, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize(("kind", "T"), [("uniform", 4096), ("uneven", 1000), ("placement", 1000),
                                         ("one_expert", 300)])
@pytest.mark.parametrize("shape", ["235b", "30b"])
def test_gpu_tma_kernels_match_the_float32_reference(shape, kind, T, block_m, launched):
    """The persistent TMA GEMMs (the large-T configs) on uneven loads, empty experts and a
    placement table whose other experts' copies fill the zero bucket."""
    w13, w2, experts = gpu_weights(shape)
    s = SHAPES[shape]
    E, K = s["E"], s["K"]
    weights, ids = routing("uniform" if kind == "placement" else kind, T, K, E, seed=T + len(kind), device="cuda")
    table = None
    if kind == "placement":
        E, table, w13, w2, experts = placed_experts(shape, seed=9)
    x = gpu_tokens(T, s["D"], seed=T)
    out = fused_moe(x, weights, ids, w13, w2, expert_to_local_E=table, config=TMA_LARGE[block_m],
                    out=poisoned(T, s["D"], dtype=torch.bfloat16, device="cuda"))
    assert launched == TMA_KERNELS
    assert_bf16_close(out, reference_moe(x, weights, ids, w13, w2, table, experts=experts))


@pytest.mark.gpu
def test_gpu_tma_grouped_experts_with_padding_rows(launched):
    w13, w2, experts = gpu_weights("30b")
    s = SHAPES["30b"]
    real, capacity = 5000, 8192
    g = torch.Generator().manual_seed(real)
    expert_real = torch.sort(torch.randint(0, s["E"] // 2, (real,), generator=g) * 2).values  # odd experts empty
    expert_N = torch.cat([expert_real, torch.full((capacity - real,), s["E"])]).cuda()
    x = gpu_tokens(capacity, s["D"], seed=real)
    out = grouped_experts(x, expert_N, w13, w2, config=TMA_LARGE[128],
                          out=poisoned(capacity, s["D"], dtype=torch.bfloat16, device="cuda"))
    assert launched == TMA_KERNELS
    counts = torch.bincount(expert_real, minlength=s["E"]).cuda()
    assert_bf16_close(out[:real], experts(x[:real].float(), counts))
    assert (out[real:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "K", "D"), [(1, 8, 4096), (16384, 8, 4096), (333, 3, 2048)])
def test_gpu_combine_copies_equals_torch_sum(T, K, D):
    y = torch.randn(T * K, D, device="cuda").to(torch.bfloat16)
    out = combine_copies(y, poisoned(T, D, dtype=torch.bfloat16, device="cuda"), K)
    assert torch.equal(out, sequential_sum(y, K))  # same float32 additions, one rounding to nearest
