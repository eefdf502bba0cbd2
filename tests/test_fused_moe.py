"""The fused MoE kernels held to their references.

top-k kernel (router/triton_gating.py)      vs router.gate
alignment kernels (router/triton_align.py)  vs router/align.py's reference, element for element
fused_moe, grouped_experts (router/fused_moe.py over experts/triton_moe.py)
                                            vs LocalDispatcher + Experts' reference loop

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py turns it on before Triton
is imported) on small ragged shapes in float32 and float16, both paths of each call forced by
config; the `gpu` tests (tests/test_fused_moe_gpu.py) run them compiled at the real shapes in bf16.
Outputs are poisoned (NaN) before every run so an unwritten element fails the comparison.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from expertmesh.experts import Experts
from expertmesh.experts.moe_config import (
    GEMV_MAX_COPIES,
    ConfigTable,
    KernelConfig,
    MoeConfig,
    config_file_name,
    heuristic_config,
    load_table,
    select_config,
)
from expertmesh.router import GateConfig, LocalDispatcher, gate, triton_align
from expertmesh.router.align import align_blocks_reference, max_blocks
from expertmesh.router.fused_moe import fused_moe, grouped_experts, moe_config
from expertmesh.router.triton_align import align_blocks
from expertmesh.router.triton_gating import topk_softmax_triton

interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="interpreter tests; the gpu tests run the compiled kernels")

GEMV = MoeConfig(KernelConfig(64, 64), KernelConfig(128, 32))
BLOCKED16 = MoeConfig(KernelConfig(32, 64, GROUP_M=2), KernelConfig(64, 32, GROUP_M=2), block_m=16)
BLOCKED32 = MoeConfig(KernelConfig(16, 32, GROUP_M=3), KernelConfig(32, 64), block_m=32)
PATHS = {"gemv": GEMV, "blocked16": BLOCKED16, "blocked32": BLOCKED32}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=3e-3, atol=3e-3)}


def random_weights(E: int, D: int, F: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """w13_EFD, w2_EDF scaled so every activation is of order one."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(E, 2 * F, D, generator=g, device=device).div_(D ** 0.5)
    w2 = torch.randn(E, D, F, generator=g, device=device).div_(F ** 0.5)
    return w13.to(dtype), w2.to(dtype)


def routing(kind: str, T: int, K: int, G: int, seed: int = 0, device="cpu"):
    """(topk_weights_TK, topk_ids_TK) over G experts: "uniform", "uneven" (a few experts take most
    copies and the last ones none) or "one_expert" (every token picks experts 3 and 5 first)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, G, generator=g)
    if kind == "uneven":
        logits += torch.linspace(4, -4, G)
    elif kind == "one_expert":
        logits[:, 3] += 100
        logits[:, 5] += 50
    weights, ids = gate(logits, GateConfig(K, True, "topk_softmax"))
    return weights.to(device), ids.to(device)


def reference_experts(w13_EFD, w2_EDF) -> Experts:
    E, F2, D = w13_EFD.shape
    experts = Experts(E, D, F2 // 2, impl="reference", device=w13_EFD.device, dtype=torch.float32)
    experts.w13_EFD.data.copy_(w13_EFD.float())
    experts.w2_EDF.data.copy_(w2_EDF.float())
    return experts


def reference_moe(x_TD, weights_TK, ids_TK, w13_EFD, w2_EDF, expert_to_local_E=None, experts=None):
    """LocalDispatcher + the reference experts in float32; with a placement table, only the local
    experts (copies of the others weigh nothing)."""
    if expert_to_local_E is not None:
        local_TK = expert_to_local_E[ids_TK]
        weights_TK = torch.where(local_TK >= 0, weights_TK, 0.0)
        ids_TK = local_TK.clamp(min=0)
    experts = experts or reference_experts(w13_EFD, w2_EDF)
    dispatcher = LocalDispatcher.identity(w13_EFD.shape[0], x_TD.device)
    routed = dispatcher.dispatch(x_TD.float(), ids_TK, weights_TK.float())
    return dispatcher.combine(experts(routed.x_ND, routed.counts_E), routed.handle)


def poisoned(*shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---------------------------------------------------------------- top-k


@interpreter
@pytest.mark.parametrize(("scoring", "renormalize"),
                         [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", True)])
@pytest.mark.parametrize(("T", "E", "K"), [(1, 8, 2), (37, 60, 4), (5, 128, 8), (3, 16, 1)])
def test_topk_kernel_equals_gate(scoring, renormalize, T, E, K):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + K))
    weights, ids = topk_softmax_triton(logits, K, renormalize, scoring)
    ref_weights, ref_ids = gate(logits, GateConfig(K, renormalize, scoring))
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


@interpreter
def test_topk_kernel_ids_stay_distinct_under_ties_and_infinities():
    logits = torch.zeros(4, 16)
    logits[1, :] = float("-inf")
    logits[1, 7] = 1.0
    logits[2, ::2] = 3.0
    logits[3, :] = float("-inf")
    logits[3, 2] = logits[3, 9] = 0.5
    for scoring in ("softmax_topk", "topk_softmax"):
        weights, ids = topk_softmax_triton(logits, 4, True, scoring, ids_dtype=torch.int32)
        ref_weights, _ = gate(logits, GateConfig(4, True, scoring))
        assert ids.dtype == torch.int32
        assert all(len(set(row)) == 4 for row in ids.tolist())
        assert ids[1, 0] == 7 and set(ids[3, :2].tolist()) == {2, 9}
        picked = torch.gather(logits, 1, ids.long())
        assert torch.equal(picked.sort(1, descending=True).values, logits.topk(4, 1).values)
        torch.testing.assert_close(weights.sort(1).values, ref_weights.sort(1).values)


# ---------------------------------------------------------------- alignment


def assert_aligned_equal(got, want):
    rows = int(want.num_padded[0])
    assert torch.equal(got.num_padded, want.num_padded)
    assert torch.equal(got.sorted_ids_M[:rows], want.sorted_ids_M[:rows])
    assert torch.equal(got.block_bucket_B, want.block_bucket_B)
    assert got.sorted_ids_M.shape == want.sorted_ids_M.shape


@interpreter
def test_alignment_worked_example_of_the_docstring():
    ids = torch.tensor([1, 0, 1, -1, 1])
    want = align_blocks_reference(ids, 2, 4)
    assert want.sorted_ids_M.tolist() == [1, 5, 5, 5, 0, 2, 4, 5, 3, 5, 5, 5]
    assert want.block_bucket_B.tolist() == [0, 1, 2] and want.num_padded.tolist() == [12, 8]
    assert_aligned_equal(align_blocks(ids, 2, 4), want)


@interpreter
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("kind", ["uniform", "uneven", "one_expert", "placement", "padding"])
def test_alignment_kernels_equal_the_reference(kind, block_m, monkeypatch):
    # Few programs, so each walks several SUB-row steps and the planner several tiles.
    monkeypatch.setattr(triton_align, "MAX_PROGRAMS", 3)
    T, K, G = 173, 3, 12
    _, ids = routing("uniform" if kind in ("placement", "padding") else kind, T, K, G, seed=block_m)
    table, E = None, G
    if kind == "placement":
        table = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1, -1, 4, -1, 5])
        E = 6
    if kind == "padding":
        E = 9  # copies of experts 9..11 are padding rows of the zero bucket
    if kind in ("placement", "padding"):
        local = table[ids] if table is not None else ids
        assert ((local < 0) | (local >= E)).any(), "some copies fall in the zero bucket"
    want = align_blocks_reference(ids.reshape(-1), E, block_m, table)
    assert want.sorted_ids_M.shape[0] == max_blocks(T * K, E, block_m) * block_m
    assert_aligned_equal(align_blocks(ids, E, block_m, table), want)


# ---------------------------------------------------------------- fused_moe


@interpreter
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("kind", "E", "D", "F", "K", "T", "dtype"), [
    ("uniform", 8, 64, 32, 2, 9, torch.float32),
    ("uneven", 12, 96, 48, 3, 11, torch.float32),   # D, F not multiples of the blocks: masked tails
    ("one_expert", 16, 128, 96, 4, 7, torch.float16),
    ("uneven", 16, 64, 64, 2, 1, torch.float16),     # one token
])
def test_fused_moe_equals_dispatcher_and_reference_experts(path, kind, E, D, F, K, T, dtype):
    w13, w2 = random_weights(E, D, F, dtype, seed=E + T)
    weights, ids = routing(kind, T, K, E, seed=T)
    if kind == "uneven" and T > 1:
        assert (torch.bincount(ids.reshape(-1), minlength=E) == 0).any(), "some experts get no token"
    x = torch.randn(T, D).to(dtype)
    out = fused_moe(x, weights, ids, w13, w2, out=poisoned(T, D, dtype=dtype), config=PATHS[path])
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), reference_moe(x, weights, ids, w13, w2), **TOLERANCE[dtype])


@interpreter
@pytest.mark.parametrize("num_copies", [GEMV_MAX_COPIES, GEMV_MAX_COPIES + 4])
def test_copies_just_below_and_above_the_gemv_threshold(num_copies):
    E, D, F, K = 8, 64, 32, 4
    T = num_copies // K
    w13, w2 = random_weights(E, D, F)
    assert moe_config(T * K, w13).gemv == (T * K <= GEMV_MAX_COPIES)
    weights, ids = routing("uniform", T, K, E, seed=num_copies)
    x = torch.randn(T, D)
    out = fused_moe(x, weights, ids, w13, w2, out=poisoned(T, D, dtype=x.dtype))
    torch.testing.assert_close(out, reference_moe(x, weights, ids, w13, w2), **TOLERANCE[torch.float32])


@interpreter
@pytest.mark.parametrize("path", ["gemv", "blocked16"])
def test_placement_table_keeps_only_local_experts(path):
    """EP: 16 global experts, 6 on this rank; the others' copies add nothing, as in the reference
    (the local dispatcher over the local experts alone)."""
    G, E, D, F, K, T = 16, 6, 64, 48, 4, 10
    table = torch.full((G,), -1, dtype=torch.int64)
    table[torch.tensor([14, 2, 9, 5, 11, 0])] = torch.arange(E)
    w13, w2 = random_weights(E, D, F, seed=3)
    weights, ids = routing("uniform", T, K, G, seed=5)
    assert (table[ids] < 0).any() and (table[ids] >= 0).any()
    x = torch.randn(T, D)
    out = fused_moe(x, weights, ids, w13, w2, expert_to_local_E=table, out=poisoned(T, D, dtype=x.dtype),
                    config=PATHS[path])
    torch.testing.assert_close(out, reference_moe(x, weights, ids, w13, w2, table), **TOLERANCE[torch.float32])
    nobody_local = (table[ids] < 0).all(1)
    if nobody_local.any():
        assert (out[nobody_local] == 0).all()


@interpreter
@pytest.mark.parametrize("path", ["gemv", "blocked16"])
def test_grouped_experts_with_padding_rows(path):
    """The all-to-all path: rows sorted by local expert (some experts empty), then padding rows
    (expert id past the last local expert) whose outputs are zeros."""
    E, D, F = 5, 64, 40
    counts = torch.tensor([3, 0, 6, 1, 0])
    padding = 7
    expert_N = torch.cat([torch.repeat_interleave(torch.arange(E), counts), torch.full((padding,), E)])
    N = expert_N.numel()
    w13, w2 = random_weights(E, D, F, seed=11)
    x = torch.randn(N, D)
    out = grouped_experts(x, expert_N, w13, w2, out=poisoned(N, D, dtype=x.dtype), config=PATHS[path])
    real = int(counts.sum())
    want = reference_experts(w13, w2)(x[:real], counts)
    torch.testing.assert_close(out[:real], want, **TOLERANCE[torch.float32])
    assert (out[real:] == 0).all()


@interpreter
def test_strided_activations_and_bad_operands():
    E, D, F, K, T = 4, 32, 16, 2, 3
    w13, w2 = random_weights(E, D, F)
    weights, ids = routing("uniform", T, K, E)
    wide = torch.randn(T, 2 * D)
    column_major = torch.randn(D, T).t()  # last dimension not contiguous: copied first
    want = reference_moe(wide[:, :D], weights, ids, w13, w2)
    torch.testing.assert_close(fused_moe(wide[:, :D], weights, ids, w13, w2, config=GEMV), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_moe(column_major, weights, ids, w13, w2, config=GEMV),
                               reference_moe(column_major, weights, ids, w13, w2), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        fused_moe(wide[:, :D], weights, ids, w13, w2, out=torch.empty(T, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(torch.randn(T, D + 1), weights, ids, w13, w2)
    with pytest.raises(ValueError, match="must both be"):
        fused_moe(wide[:, :D], weights[:, :1], ids, w13, w2)


@interpreter
def test_no_tokens_is_a_no_op():
    w13, w2 = random_weights(4, 32, 16)
    out = fused_moe(torch.empty(0, 32), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int64), w13, w2)
    assert out.shape == (0, 32)


# ---------------------------------------------------------------- configs


def test_config_table_round_trip_and_nearest_bucket(tmp_path):
    small = MoeConfig(KernelConfig(16, 512, num_warps=8), KernelConfig(8, 256))
    mid = MoeConfig(KernelConfig(64, 128, 1, 4, 4), KernelConfig(64, 128, 1, 4, 4), block_m=16)
    big = MoeConfig(KernelConfig(128, 64, 8, 8, 3), KernelConfig(256, 64, 8, 8, 3), block_m=128)
    table = ConfigTable(96, gemv=((8, small),), blocked=((512, mid), (131072, big)))
    name = config_file_name(128, 1536, 4096, "bfloat16", "NVIDIA H200")
    assert name == "E=128,F=1536,D=4096,dtype=bfloat16,device=NVIDIA_H200.json"
    (tmp_path / name).write_text(json.dumps(table.to_json()))
    loaded = load_table(128, 1536, 4096, "bfloat16", "NVIDIA H200", str(tmp_path))
    assert loaded == table
    assert loaded.pick(96, 128, 1536, 4096) == small  # at the threshold: GEMV
    assert loaded.pick(97, 128, 1536, 4096) == mid
    assert loaded.pick(4096, 128, 1536, 4096) == mid  # nearer 512 than 131072 in log scale
    assert loaded.pick(65536, 128, 1536, 4096) == big
    assert load_table(128, 1536, 4096, "bfloat16", "Some Other GPU", str(tmp_path)) is None


def test_heuristic_keeps_one_block_per_expert_while_copies_are_few():
    assert select_config(8, 128, 1536, 4096, "bfloat16", "no such device").gemv
    assert heuristic_config(512, 128, 1536, 4096).block_m == 16  # 64 tokens: 4 copies per expert
    assert heuristic_config(8192, 128, 1536, 4096).block_m == 64  # 1,024 tokens: 64 per expert
    large = heuristic_config(131072, 128, 1536, 4096)
    assert large.block_m == 128 and large.first.num_warps == 8 and large.first.tma and large.second.tma


# ---------------------------------------------------------------- GPU (compiled kernels, bf16)

SHAPES = {"235b": dict(E=128, D=4096, F=1536, K=8), "30b": dict(E=128, D=2048, F=768, K=8)}
_GPU_WEIGHTS: dict = {}


def gpu_weights(shape: str):
    """bf16 weights of one MoE layer on the GPU and their float32 reference experts, made once."""
    if shape not in _GPU_WEIGHTS:
        s = SHAPES[shape]
        w13, w2 = random_weights(s["E"], s["D"], s["F"], torch.bfloat16, "cuda", seed=len(shape))
        _GPU_WEIGHTS[shape] = (w13, w2, reference_experts(w13, w2))
    return _GPU_WEIGHTS[shape]


def assert_bf16_close(out, ref):
    """bf16 tolerance (1e-2), relative to the output's scale: the kernels round the intermediate
    to bf16 as the torch path does, the reference does not."""
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def placed_experts(shape: str, seed: int, local: int = 48):
    """`local` of the shape's experts on this rank, in a scattered order: (local, the placement
    table on the GPU, their weights w13 and w2, None: the reference takes the table instead)."""
    w13, w2, _ = gpu_weights(shape)
    E = SHAPES[shape]["E"]
    table = torch.full((E,), -1, dtype=torch.int64)
    table[torch.randperm(E, generator=torch.Generator().manual_seed(seed))[:local]] = torch.arange(local)
    return local, table.cuda(), w13[:local], w2[:local], None


def gpu_tokens(T: int, D: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(T, D, generator=g, device="cuda").to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 1024, 4096])
@pytest.mark.parametrize("shape", ["235b", "30b"])
def test_gpu_fused_moe_matches_the_float32_reference(shape, T):
    w13, w2, experts = gpu_weights(shape)
    s = SHAPES[shape]
    weights, ids = routing("uniform", T, s["K"], s["E"], seed=T, device="cuda")
    x = gpu_tokens(T, s["D"], seed=T)
    out = fused_moe(x, weights, ids, w13, w2, out=poisoned(T, s["D"], dtype=torch.bfloat16, device="cuda"))
    assert_bf16_close(out, reference_moe(x, weights, ids, w13, w2, experts=experts))


@pytest.mark.gpu
@pytest.mark.parametrize(("path", "T"), [("gemv", 1), ("gemv", 16), ("blocked", 7), ("blocked", 300)])
@pytest.mark.parametrize("kind", ["uneven", "one_expert", "placement"])
def test_gpu_uneven_loads_empty_experts_and_placement_tables(kind, path, T):
    w13, w2, experts = gpu_weights("30b")
    s = SHAPES["30b"]
    E, K = s["E"], s["K"]
    weights, ids = routing("uniform" if kind == "placement" else kind, T, K, E, seed=T + len(kind), device="cuda")
    table = None
    if kind == "placement":
        E, table, w13, w2, experts = placed_experts("30b", seed=7)
    elif kind == "uneven" and T > 1:
        assert (torch.bincount(ids.reshape(-1), minlength=E) == 0).any()
    config = heuristic_config(T * K, E, s["F"], s["D"], gemv=path == "gemv")
    x = gpu_tokens(T, s["D"], seed=T)
    out = fused_moe(x, weights, ids, w13, w2, expert_to_local_E=table, config=config,
                    out=poisoned(T, s["D"], dtype=torch.bfloat16, device="cuda"))
    assert_bf16_close(out, reference_moe(x, weights, ids, w13, w2, table, experts=experts))


@pytest.mark.gpu
@pytest.mark.parametrize(("real", "capacity"), [(37, 48), (700, 1024)])
def test_gpu_grouped_experts_with_padding_rows(real, capacity):
    w13, w2, experts = gpu_weights("30b")
    s = SHAPES["30b"]
    g = torch.Generator().manual_seed(real)
    expert_real = torch.sort(torch.randint(0, s["E"] // 2, (real,), generator=g) * 2).values  # odd experts empty
    expert_N = torch.cat([expert_real, torch.full((capacity - real,), s["E"])]).cuda()
    x = gpu_tokens(capacity, s["D"], seed=real)
    out = grouped_experts(x, expert_N, w13, w2, out=poisoned(capacity, s["D"], dtype=torch.bfloat16, device="cuda"))
    counts = torch.bincount(expert_real, minlength=s["E"]).cuda()
    assert_bf16_close(out[:real], experts(x[:real].float(), counts))
    assert (out[real:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("scoring", "renormalize"),
                         [("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", True)])
def test_gpu_topk_kernel_equals_gate(scoring, renormalize):
    logits = torch.randn(1000, 128, device="cuda").to(torch.bfloat16)
    weights, ids = topk_softmax_triton(logits, 8, renormalize, scoring)
    ref_weights, ref_ids = gate(logits, GateConfig(8, renormalize, scoring))
    assert all(len(set(row)) == 8 for row in ids.tolist())
    # bf16 logits tie often: the chosen values (not necessarily the ids) must be torch.topk's.
    picked = torch.gather(logits, 1, ids)
    assert torch.equal(picked.sort(1, descending=True).values, torch.gather(logits, 1, ref_ids))
    torch.testing.assert_close(weights.sort(1).values, ref_weights.sort(1).values, rtol=2e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])  # 4,096: the data file's persistent TMA down GEMM
def test_gpu_cuda_graph_replay_of_topk_and_fused_moe_equals_eager(T):
    """Capture top-k + fused_moe once on static buffers, copy new logits and tokens in place,
    replay: the output equals an eager call on the new inputs, bit for bit (no atomics)."""
    w13, w2, _ = gpu_weights("30b")
    s = SHAPES["30b"]
    logits = torch.randn(T, s["E"], device="cuda")
    x = gpu_tokens(T, s["D"], seed=1)
    out = torch.empty_like(x)

    def step():
        weights, ids = topk_softmax_triton(logits, s["K"], True, "topk_softmax")
        fused_moe(x, weights, ids, w13, w2, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_logits, new_x = torch.randn_like(logits), gpu_tokens(T, s["D"], seed=2)
    logits.copy_(new_logits)
    x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    weights, ids = topk_softmax_triton(new_logits, s["K"], True, "topk_softmax")
    assert torch.equal(out, fused_moe(new_x, weights, ids, w13, w2))


# ---------------------------------------------------------------- FP8 weights (W8A16 GEMVs, W8A8 blocked GEMMs)


def fp8_experts(w13, w2, block):
    """FP8 copies of the experts and their scale grids (quantize_blocks per expert), and the
    dequantized float32 weights the kernels must equal."""
    from expertmesh.experts.triton_fp8 import ExpertScales
    from expertmesh.model.quantization import dequantize_blocks, quantize_blocks

    def quantize(w_END, blk):
        qs = [quantize_blocks(w, blk) for w in w_END.float()]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    b13 = (block[0], block[1] or w13.shape[2])  # block[1] None: one scale per output row (channel)
    b2 = (block[0], block[1] or w2.shape[2])
    q13, s13 = quantize(w13, b13)
    q2, s2 = quantize(w2, b2)
    scales = ExpertScales(s13, s2, b13, b2)
    return q13, q2, scales, dequantize_blocks(q13, s13, b13), dequantize_blocks(q2, s2, b2), (s13, s2, b13, b2)


A8_ATOL = 5e-3
"""W8A8 against its reference: both quantize the same activations, but an accumulation order that
differs in the last bit may round an element of the intermediate to the neighbouring e4m3 value
(6% of that element); outputs are of order one. Measured over 12 inputs x 4 paths: at most
1.8e-3, where the unquantized reference is 5e-2 to 1e-1 away."""


def a8_groups(config: MoeConfig, scales, D: int, F: int) -> tuple[int | None, int | None]:
    """The activation groups of the two blocked GEMMs: their K tiles, fitted to the scale blocks;
    None for a GEMM whose tiles are too narrow for the FP8 tensor cores (it stays W8A16)."""
    from expertmesh.experts.triton_fp8 import A8_MIN_BLOCK_K, fp8_block_k
    from expertmesh.experts.triton_moe import GEMV_FORM

    def group(block_k, dim, scale_k, which):
        tile = fp8_block_k(max(16, min(block_k, 1 << max(dim - 1, 0).bit_length())), scale_k)
        a8 = tile >= A8_MIN_BLOCK_K and scale_k % tile == 0 and (GEMV_FORM[which] == "a8" or not config.gemv)
        return tile if a8 else None

    return (group(config.first.BLOCK_K, D, scales.block13[1], "first"),
            group(config.second.BLOCK_K, F, scales.block2[1], "second"))


def reference_moe_a8(x_TD, weights_TK, ids_TK, d13, d2, groups):
    """The W8A8 blocked path in float32: x quantized per token and group of groups[0], the
    SiLU-and-mul intermediate rounded to x's dtype (as the kernel stores it) and quantized per
    group of groups[1] (a group None: that GEMM is W8A16), each times the dequantized weights."""
    from expertmesh.model.quantization import fake_quantize_activations

    def fake(x, group):
        return x.float() if group is None else fake_quantize_activations(x, group)

    F = d2.shape[2]
    x_hat = fake(x_TD, groups[0])
    out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in ids_TK.unique().tolist():
        t, k = (ids_TK == e).nonzero(as_tuple=True)
        h13 = x_hat[t] @ d13[e].T
        act = (torch.nn.functional.silu(h13[:, :F]) * h13[:, F:]).to(x_TD.dtype)
        y = fake(act, groups[1]) @ d2[e].T
        out.index_add_(0, t, weights_TK[t, k].float()[:, None] * y)
    return out


@interpreter
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["uniform", "uneven"])
@pytest.mark.parametrize("block", [(16, 16), (16, 64), (16, 32)])
def test_fp8_expert_weights_equal_their_dequantized_reference(path, dtype, kind, block):
    """Block-scaled FP8 experts (D = 80 leaves a ragged block column) through every kernel path,
    16-wide blocks (K tiles cut to 16: W8A16 only) and 32- and 64-wide ones (GEMVs and blocked
    GEMMs take fp16 activations in FP8, W8A8): the float32 reference on the dequantized weights,
    with the activations quantized as the kernels quantize them where they do."""
    E, D, F, K, T = 8, 80, 32, 2, 9
    w13, w2 = random_weights(E, D, F, seed=21)
    q13, q2, scales, d13, d2, _ = fp8_experts(w13, w2, block)
    assert q13.dtype == torch.float8_e4m3fn and scales.w13.shape == (E, 4, -(-D // block[1]))
    weights, ids = routing(kind, T, K, E, seed=T)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    config = PATHS[path]
    out = fused_moe(x, weights, ids, q13, q2, out=poisoned(T, D, dtype=dtype), config=config, scales=scales)
    assert not out.isnan().any()
    plain = reference_moe(x, weights, ids, d13, d2)
    groups = a8_groups(config, scales, D, F)
    if dtype == torch.float16 and any(groups):  # 16-bit activations in FP8
        a8 = reference_moe_a8(x, weights, ids, d13, d2, groups)
        torch.testing.assert_close(out.float(), a8, rtol=0, atol=A8_ATOL)
        assert (out.float() - plain).abs().max() > 2 * A8_ATOL  # the activations were quantized
    else:
        torch.testing.assert_close(out.float(), plain, **TOLERANCE[dtype])
    if dtype == torch.float32:  # the scales matter: without them the same FP8 bits give another result
        unscaled = fused_moe(x, weights, ids, q13.float(), q2.float(), config=PATHS[path])
        assert (unscaled - out).abs().max() > 0.1


@interpreter
@pytest.mark.parametrize("forms", [{"first": "a8", "second": "a8"}, {"first": "a8", "second": "fma"},
                                   {"first": "f16", "second": "a8"}, {"first": "fma", "second": "fma"}],
                         ids=["a8-a8", "a8-fma", "f16-a8", "fma-fma"])
@pytest.mark.parametrize("block", [(16, 32), (16, 64)])
def test_fp8_gemvs_in_each_form_equal_their_reference(forms, block, monkeypatch):
    """The GEMVs' forms for FP8 weights and fp16 rows, either kernel or both: "a8" (rows quantized
    per K tile) against the reference that quantizes the same activations, and farther from the
    plain one; "f16" and "fma" (W8A16) against the dequantized weights; ragged D, uneven routing."""
    from expertmesh.experts import triton_moe

    monkeypatch.setattr(triton_moe, "GEMV_FORM", forms)
    launched = []
    launch = triton_moe.launch
    monkeypatch.setattr(triton_moe, "launch", lambda kernel, *a, **k: launched.append(
        (kernel.fn.__name__, k.get("A8"))) or launch(kernel, *a, **k))
    E, D, F, K, T = 8, 80, 32, 2, 5
    w13, w2 = random_weights(E, D, F, seed=22)
    q13, q2, scales, d13, d2, _ = fp8_experts(w13, w2, block)
    weights, ids = routing("uneven", T, K, E, seed=3)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(8)).to(torch.float16)
    out = fused_moe(x, weights, ids, q13, q2, out=poisoned(T, D, dtype=torch.float16), config=GEMV, scales=scales)
    groups = a8_groups(GEMV, scales, D, F)
    assert [g is not None for g in groups] == [forms[w] == "a8" for w in ("first", "second")]
    first = {"fma": ("_gemv_gate_up_kernel", None), "f16": ("_gemv_gate_up_dot_kernel", False),
             "a8": ("_gemv_gate_up_dot_kernel", True)}[forms["first"]]
    second = ("_gemv_down_a8_kernel" if forms["second"] == "a8" else "_gemv_down_kernel", None)
    assert launched == [first, second]
    plain = reference_moe(x, weights, ids, d13, d2)
    if any(groups):
        torch.testing.assert_close(out.float(), reference_moe_a8(x, weights, ids, d13, d2, groups), rtol=0,
                                   atol=A8_ATOL)
        assert (out.float() - plain).abs().max() > 2 * A8_ATOL
    else:
        torch.testing.assert_close(out.float(), plain, **TOLERANCE[torch.float16])


def test_the_down_gemv_has_no_f16_form():
    from expertmesh.experts.triton_moe import gemv_down

    with pytest.raises(ValueError, match='no "f16" form'):
        gemv_down(torch.zeros(2, 32), torch.zeros(1, 16, 32), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 16),
                  top_k=2, config=GEMV.second, form="f16")


@interpreter
@pytest.mark.parametrize("path", ["gemv", "blocked16"])
def test_fp8_grouped_experts_with_16bit_rows_and_padding(path):
    """The expert-parallel entry (rows already grouped by local expert, padding rows past the last
    expert) with FP8 weights and fp16 rows: the GEMV path's default forms (fp16 tensor-core gate/up,
    elementwise down: W8A16) give the dequantized reference; the blocked path (W8A8) gives the
    reference that quantizes the same activations; padding rows are zeros either way."""
    E, D, F = 5, 64, 32
    w13, w2 = random_weights(E, D, F, seed=13)
    q13, q2, scales, d13, d2, _ = fp8_experts(w13, w2, (16, 32))
    counts = torch.tensor([3, 0, 6, 1, 0])
    expert_N = torch.cat([torch.repeat_interleave(torch.arange(E), counts), torch.full((4,), E)])
    x = torch.randn(expert_N.numel(), D, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    config = PATHS[path]
    out = grouped_experts(x, expert_N, q13, q2, out=poisoned(x.shape[0], D, dtype=torch.float16), config=config,
                          scales=scales)
    real = int(counts.sum())
    assert (out[real:] == 0).all()
    groups = a8_groups(config, scales, D, F)
    assert (groups == (None, None)) == config.gemv
    ids = expert_N[:real, None]
    want = reference_moe_a8(x[:real], torch.ones(real, 1), ids, d13, d2, groups)
    torch.testing.assert_close(out[:real].float(), want, rtol=0, atol=A8_ATOL if any(groups) else 3e-3)


@interpreter
@pytest.mark.parametrize("path", ["gemv", "blocked16"])
def test_fp8_experts_per_channel_with_padding_rows(path):
    E, D, F = 5, 64, 32
    w13, w2 = random_weights(E, D, F, seed=12)
    q13, q2, scales, d13, d2, _ = fp8_experts(w13, w2, (1, None))  # per-channel scales
    assert scales.w13.shape == (E, 2 * F, 1) and scales.block13 == (1, D) and scales.block2 == (1, F)
    counts = torch.tensor([3, 0, 6, 1, 0])
    expert_N = torch.cat([torch.repeat_interleave(torch.arange(E), counts), torch.full((4,), E)])
    x = torch.randn(expert_N.numel(), D)
    out = grouped_experts(x, expert_N, q13, q2, out=poisoned(x.shape[0], D, dtype=x.dtype), config=PATHS[path],
                          scales=scales)
    real = int(counts.sum())
    want = reference_experts(d13, d2)(x[:real], counts)
    torch.testing.assert_close(out[:real], want, **TOLERANCE[torch.float32])
    assert (out[real:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
@pytest.mark.parametrize("shape", ["235b", "30b"])
@pytest.mark.parametrize("kind", ["uneven", "uniform"])
def test_gpu_fp8_experts_match_their_dequantized_reference(shape, T, kind):
    """Qwen's FP8 layout (128x128 blocks) at the real shapes, bf16 activations, ragged and
    uneven loads (experts with no tokens), GEMV (W8A16 by default) and blocked (W8A8, the FP8
    tensor cores) paths: the float32 reference on the dequantized weights with the activations
    quantized as the kernels quantize them, within bf16 tolerance, and the plain one within FP8
    tolerance."""
    w13, w2, _ = gpu_weights(shape)
    q13, q2, scales, d13, d2, _ = fp8_experts(w13, w2, (128, 128))
    s = SHAPES[shape]
    weights, ids = routing(kind, T, s["K"], s["E"], seed=T, device="cuda")
    x = gpu_tokens(T, s["D"], seed=T)
    config = moe_config(T * s["K"], q13)
    out = fused_moe(x, weights, ids, q13, q2, out=poisoned(T, s["D"], dtype=torch.bfloat16, device="cuda"),
                    scales=scales)
    plain = reference_moe(x, weights, ids, d13, d2)
    assert_bf16_close(out, reference_moe_a8(x, weights, ids, d13, d2, a8_groups(config, scales, s["D"], s["F"])))
    assert ((out.float() - plain).norm() / plain.norm()).item() < 6e-2  # e4m3 activations: 3 mantissa bits


@interpreter
def test_fp8_weights_without_their_scales_and_bad_grids_are_refused():
    E, D, F, K, T = 4, 64, 32, 2, 3
    w13, w2 = random_weights(E, D, F, seed=4)
    q13, q2, scales, *_ = fp8_experts(w13, w2, (16, 16))
    weights, ids = routing("uniform", T, K, E)
    x = torch.randn(T, D)
    with pytest.raises(ValueError, match="need their ExpertScales"):
        fused_moe(x, weights, ids, q13, q2)
    with pytest.raises(ValueError, match="need their ExpertScales"):
        grouped_experts(x, torch.zeros(T, dtype=torch.int64), w13, w2, scales=scales)
    from expertmesh.experts.triton_fp8 import ExpertScales

    with pytest.raises(ValueError, match="w2 scales must be float32"):
        fused_moe(x, weights, ids, q13, q2, scales=ExpertScales(scales.w13, scales.w2[:, :1], (16, 16), (16, 16)))
    with pytest.raises(ValueError, match="straddle gate and up"):
        fused_moe(x, weights, ids, q13, q2, scales=ExpertScales(scales.w13, scales.w2, (64, 16), (16, 16)))
