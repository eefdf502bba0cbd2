"""Expert-load counting inside the top-k kernel (router/triton_gating.py `counts_E`) against its
reference, `ExpertLoadStats.record` (router/stats.py), and the fused MoE block that relies on it.

On the CPU the kernel runs in Triton's interpreter (tests/conftest.py); the `gpu` tests run it
compiled at the real router shape (128 experts, top 8) and inside a captured CUDA graph.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from expertmesh.router import ExpertLoadStats, GateConfig, gate
from expertmesh.router.triton_gating import topk_softmax_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(T, E, seed, dtype=torch.float32):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _reference_counts(logits, K, scoring, start_E, copy_weights_N=None):
    """ExpertLoadStats.record over gate()'s ids, from `start_E` on."""
    stats = ExpertLoadStats(1, logits.shape[1], DEV)
    stats.counts_LE[0].copy_(start_E)
    stats.copy_weights_N = copy_weights_N
    _, ids = gate(logits.float(), GateConfig(K, True, scoring))
    stats.record(0, ids)
    return stats.counts_LE[0]


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize(("T", "E", "K"), [(1, 8, 2), (37, 60, 4), (300, 128, 8), (3, 16, 1)])
@pytest.mark.parametrize("weighted", [False, True], ids=["ones", "copy_weights"])
def test_counts_equal_expert_load_stats_record(scoring, T, E, K, weighted):
    logits = _logits(T, E, seed=T * E + K)
    gen = torch.Generator().manual_seed(K)
    start = torch.randint(0, 1000, (E,), generator=gen).to(DEV)  # counters accumulate: never start at zero
    copy_weights = torch.randint(0, 3, (T * K,), generator=gen).to(DEV) if weighted else None
    counts = start.clone()
    _, ids = topk_softmax_triton(logits, K, True, scoring, counts_E=counts, copy_weights_N=copy_weights)
    expected = _reference_counts(logits, K, scoring, start, copy_weights)
    assert torch.equal(ids.cpu(), gate(logits.float(), GateConfig(K, True, scoring))[1].cpu())
    assert torch.equal(counts, expected)
    added = T * K if copy_weights is None else int(copy_weights.sum())
    assert int((counts - start).sum()) == added


def test_graph_padding_rows_weigh_nothing_and_int32_counters():
    """The model runner's weights (1 per copy of a real row, 0 for the padding rows of a graph's
    batch) leave the padding rows uncounted; int32 counters take the same sums."""
    T, E, K, real = 8, 128, 8, 3
    logits = _logits(T, E, seed=5)
    valid_N = (torch.arange(T, device=DEV) < real).to(torch.int64).repeat_interleave(K)
    counts = torch.zeros(E, dtype=torch.int32, device=DEV)
    topk_softmax_triton(logits, K, True, "topk_softmax", counts_E=counts, copy_weights_N=valid_N)
    topk_softmax_triton(logits, K, True, "topk_softmax", counts_E=counts, copy_weights_N=valid_N)
    _, ids = gate(logits[:real].float(), GateConfig(K, True, "topk_softmax"))
    expected = torch.zeros(E, dtype=torch.int64, device=DEV).index_add_(0, ids.reshape(-1).to(DEV),
                                                                        torch.ones(real * K, dtype=torch.int64,
                                                                                   device=DEV))
    assert counts.dtype == torch.int32 and torch.equal(counts.long(), 2 * expected)


def test_counting_arguments_are_checked():
    logits = _logits(4, 16, seed=1)
    with pytest.raises(ValueError, match="counts_E"):
        topk_softmax_triton(logits, 2, True, counts_E=torch.zeros(15, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="counts_E"):
        topk_softmax_triton(logits, 2, True, counts_E=torch.zeros(16, device=DEV))  # float counters
    with pytest.raises(ValueError, match="copy_weights_N"):
        topk_softmax_triton(logits, 2, True, counts_E=torch.zeros(16, dtype=torch.int64, device=DEV),
                            copy_weights_N=torch.ones(4, dtype=torch.int64, device=DEV))  # [T], not [T*K]
    with pytest.raises(ValueError, match="counts_E too"):
        topk_softmax_triton(logits, 2, True, copy_weights_N=torch.ones(8, dtype=torch.int64, device=DEV))


@pytest.mark.parametrize("graph_weights", [False, True])
def test_fused_moe_block_counts_like_the_plain_block(qwen3_moe_path, graph_weights):
    """The fused block no longer calls stats.record: its counters (from the top-k kernel) equal
    the plain block's, with the model runner's copy weights set as around a graph's forward."""
    from expertmesh.model.config import ModelConfig
    from expertmesh.model.moe import SparseMoeBlock
    from expertmesh.router import LocalDispatcher

    config = ModelConfig.from_pretrained(qwen3_moe_path)
    E, K, T = config.num_experts, config.top_k, 6
    blocks, stats = [], []
    for fast in (False, True):
        s = ExpertLoadStats(2, E, DEV)
        block = SparseMoeBlock(config, E, 1, dispatcher=LocalDispatcher(torch.arange(E, device=DEV)), stats=s,
                               expert_impl="triton" if fast else "auto", fast=fast).to(DEV)
        blocks.append(block)
        stats.append(s)
    torch.manual_seed(0)
    for p in blocks[0].parameters():
        p.data.normal_(0, 0.5)
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(T, config.hidden_size, device=DEV)
    for s in stats:
        s.copy_weights_N = (torch.tensor([1, 1, 0, 1, 0, 0], device=DEV).repeat_interleave(K)
                            if graph_weights else None)
    with torch.no_grad():
        out_plain, out_fused = (block(x) for block in blocks)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(stats[1].counts_LE, stats[0].counts_LE)
    assert int(stats[1].counts_LE[1].sum()) == (3 if graph_weights else T) * K
    assert int(stats[1].counts_LE[0].sum()) == 0  # only this block's layer


# ---- GPU: compiled, real router shape, inside a CUDA graph ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 4096])
def test_gpu_counts_equal_record_in_bf16(T):
    E, K = 128, 8
    logits = _logits(T, E, seed=T, dtype=torch.bfloat16)
    start = torch.randint(0, 50, (E,), device=DEV)
    counts = start.clone()
    _, ids = topk_softmax_triton(logits, K, True, "topk_softmax", counts_E=counts)
    expected = start.clone().index_add_(0, ids.reshape(-1), torch.ones(T * K, dtype=torch.int64, device=DEV))
    assert torch.equal(counts, expected) and int((counts - start).sum()) == T * K


@pytest.mark.gpu
def test_gpu_counting_is_graph_capturable_and_replays_add_up():
    """No host sync inside (sync debug mode), and every replay adds its copies' weights once."""
    E, K, T, real = 128, 8, 8, 5
    logits = _logits(T, E, seed=3, dtype=torch.bfloat16)
    stats = ExpertLoadStats(3, E, DEV)
    valid_N = (torch.arange(T, device=DEV) < real).to(torch.int64).repeat_interleave(K)

    def step():
        return topk_softmax_triton(logits, K, True, "topk_softmax", counts_E=stats.layer_counts(2),
                                   copy_weights_N=valid_N)

    step()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, ids = step()
    stats.reset()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    expected = torch.zeros(E, dtype=torch.int64, device=DEV).index_add_(
        0, ids[:real].reshape(-1), torch.ones(real * K, dtype=torch.int64, device=DEV))
    assert torch.equal(stats.counts_LE[2], 3 * expected)
    assert stats.snapshot().dtype == torch.int64 and stats.snapshot().device.type == "cpu"
    assert int(stats.counts_LE[:2].sum()) == 0
