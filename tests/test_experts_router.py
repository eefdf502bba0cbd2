"""Experts' GEMM paths against the reference loop; gating; dispatch/combine on a hand-worked layout."""
from __future__ import annotations

import pytest
import torch

from expertmesh.experts import Experts
from expertmesh.router import GateConfig, LocalDispatcher, gate, softmax_topk, topk_softmax
from expertmesh.router.stats import ExpertLoadStats


def _experts(impl, E=6, D=32, F=16, seed=0):
    torch.manual_seed(seed)
    ex = Experts(E, D, F, impl=impl)
    ex.w13_EFD.copy_(torch.randn(E, 2 * F, D) * 0.1)
    ex.w2_EDF.copy_(torch.randn(E, D, F) * 0.1)
    return ex


@pytest.mark.parametrize("impl", ["grouped", "batched", "auto"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0, 0, 0, 1], [1, 0, 2, 0, 1, 0], [4, 4, 4, 4, 4, 4]])
def test_expert_paths_match_the_reference(impl, counts):
    reference, fast = _experts("reference"), _experts(impl)
    counts_E = torch.tensor(counts)
    x_ND = torch.randn(int(counts_E.sum()), 32)
    expected = reference(x_ND, counts_E)
    torch.testing.assert_close(fast(x_ND, counts_E), expected, atol=1e-5, rtol=1e-5)
    expert_N = torch.repeat_interleave(torch.arange(6), counts_E)
    torch.testing.assert_close(fast(x_ND, counts_E, expert_N), expected, atol=1e-5, rtol=1e-5)


def test_experts_with_no_tokens():
    out = _experts("auto")(torch.empty(0, 32), torch.zeros(6, dtype=torch.int64))
    assert out.shape == (0, 32)


def test_unknown_expert_impl():
    with pytest.raises(ValueError, match="unknown expert impl 'fast'"):
        Experts(2, 8, 4, impl="fast")


def test_qwen_gating_renormalises_and_qwen2_does_not():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w_norm, ids = softmax_topk(logits, 2, renormalize=True)
    w_raw, _ = softmax_topk(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]]
    probs = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(w_raw[0], probs[:2])
    torch.testing.assert_close(w_norm[0], probs[:2] / probs[:2].sum())


def test_mixtral_topk_then_softmax_equals_softmax_topk_renormalised():
    logits = torch.randn(50, 8)
    w1, i1 = topk_softmax(logits, 2)
    w2, i2 = softmax_topk(logits, 2, renormalize=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)
    w3, _ = gate(logits, GateConfig(top_k=2, renormalize=True, scoring="topk_softmax"))
    torch.testing.assert_close(w3, w1)


def test_dispatch_and_combine_on_a_hand_worked_layout():
    # 3 tokens, top-2, 4 experts; rank owns all, expert e in local slot (3 - e).
    #   token 0 -> experts (1, 0)   copies 0, 1
    #   token 1 -> experts (2, 1)   copies 2, 3
    #   token 2 -> experts (0, 3)   copies 4, 5
    # local slots of the copies: [2, 3, 1, 2, 3, 0]; stable sort by slot -> copies [5, 2, 0, 3, 1, 4]
    dispatcher = LocalDispatcher(torch.tensor([3, 2, 1, 0]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    ids = torch.tensor([[1, 0], [2, 1], [0, 3]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    routed = dispatcher.dispatch(x, ids, weights)
    assert routed.handle.order_N.tolist() == [5, 2, 0, 3, 1, 4]
    assert routed.counts_E.tolist() == [1, 1, 2, 2]
    assert routed.x_ND.tolist() == [[2, 2], [0, 1], [1, 0], [0, 1], [1, 0], [2, 2]]
    # Let "expert in slot s" multiply by (s + 1): rows come out scaled by their slot.
    slot_of_row = torch.tensor([0, 1, 2, 2, 3, 3])
    y = routed.x_ND * (slot_of_row[:, None] + 1)
    out = dispatcher.combine(y, routed.handle)
    # token 0: 0.75 * 3 * x0 (expert 1 = slot 2) + 0.25 * 4 * x0 (expert 0 = slot 3)
    expected = torch.stack([
        (0.75 * 3 + 0.25 * 4) * x[0],
        (0.5 * 2 + 0.5 * 3) * x[1],
        (0.9 * 4 + 0.1 * 1) * x[2],
    ])
    torch.testing.assert_close(out, expected)


def test_expert_load_counters():
    stats = ExpertLoadStats(num_moe_layers=2, num_experts=4)
    stats.record(0, torch.tensor([[0, 1], [1, 3]]))
    stats.record(1, torch.tensor([[2, 2]]))
    assert stats.snapshot().tolist() == [[1, 2, 0, 1], [0, 0, 2, 0]]
    torch.testing.assert_close(stats.imbalance(), torch.tensor([2.0, 4.0]))


def test_engine_reports_expert_load(qwen3_moe_path):
    from expertmesh import LLM, SamplingParams

    llm = LLM(qwen3_moe_path, device="cpu", progress=False)
    out = llm.generate([[3, 4, 5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    load = llm.engine.expert_load()
    config = llm.engine.executor.model_config
    assert load.shape == (len(config.moe_layers), config.num_experts)
    # every token computed (5 prompt + 2 decode inputs) was routed to top_k experts in every layer
    tokens = 5 + len(out[0].outputs[0].token_ids) - 1
    assert load.sum(dim=1).tolist() == [tokens * config.top_k] * len(config.moe_layers)


def test_dense_path_equals_dispatch_grouped_combine():
    """Experts.dense (every token through every expert, weighted) equals dispatch -> experts -> combine."""
    torch.manual_seed(0)
    E, D, F_, T, K = 8, 32, 16, 11, 2
    experts = Experts(E, D, F_, impl="reference")
    experts.w13_EFD.data.normal_(0, 0.1)
    experts.w2_EDF.data.normal_(0, 0.1)
    x = torch.randn(T, D)
    weights, ids = gate(torch.randn(T, E), GateConfig(top_k=K, renormalize=True, scoring="topk_softmax"))
    dispatcher = LocalDispatcher(torch.arange(E))
    routed = dispatcher.dispatch(x, ids, weights)
    expected = dispatcher.combine(experts(routed.x_ND, routed.counts_E, routed.expert_N), routed.handle)
    dense_weights = torch.zeros(T, E).scatter_(1, ids, weights)
    torch.testing.assert_close(experts.dense(x, dense_weights), expected, atol=1e-6, rtol=1e-5)


def test_moe_block_takes_the_dense_path_only_for_small_local_work(qwen3_moe_path):
    from expertmesh.model.config import ModelConfig
    from expertmesh.model.moe import DENSE_MAX_MACS, SparseMoeBlock

    config = ModelConfig.from_pretrained(qwen3_moe_path)
    block = SparseMoeBlock(config, config.num_experts, 0, dispatcher=LocalDispatcher(torch.arange(config.num_experts)),
                           stats=None)
    macs = config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    assert block.dense_max_tokens == DENSE_MAX_MACS // macs > 0
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(block.dense_max_tokens, config.hidden_size)
    dense = block(x)
    block.dense_max_tokens = 0
    torch.testing.assert_close(dense, block(x), atol=1e-6, rtol=1e-5)
    partial = SparseMoeBlock(config, config.num_experts // 2, 0,
                             dispatcher=LocalDispatcher(torch.arange(config.num_experts) % 4), stats=None)
    assert partial.dense_max_tokens == 0  # a rank holding only some experts always dispatches
