"""Live expert rebalancing (EPLB) on real Ray (CPU, gloo): an EP group of 3 ranks, 12 experts and 3
redundant slots, routing skewed towards a few experts by the checkpoint's router gates. The group
rebalances while requests decode; greedy tokens before, across and after it equal ep_size=1's, and
the ranks' max/mean load falls."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh import LLM, SamplingParams
from expertmesh.gateway.engine_client import expert_load_lists
from expertmesh.gateway.metrics import Metrics
from expertmesh.model.tiny import make_tiny
from expertmesh.router.eplb import imbalance, initial_layout, rank_loads

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "混合专家模型把每个词元送到少数几个专家那里。",
           "a", "Once upon a time"]
MAX_TOKENS = [30, 22, 26, 18, 28]
LATER = ["Experts are", "1, 2, 3,", "tokens go"]
HOT = {0: (3, 4, 5), 1: (10, 9, 7)}
"""Per layer, the experts the crafted gates favour: layer 0's 3 and 4 share rank 0 in the initial
layout (rank 0 holds 0-4, rank 1 5-9, rank 2 10, 11 and copies of 0-2)."""


def skew_routing(path: Path, hot: dict[int, tuple[int, ...]], strength: float = 0.3) -> None:
    """Make a few experts win the gates: hidden dimension 0 gets a constant share of every token's
    embedding (the residual stream carries it through the layers), and the gate rows of the hot
    experts read it; lm_head ignores that dimension so the tokens stay varied."""
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name, t in tensors.items():
            if name == "model.embed_tokens.weight":
                t[:, 0] = 0.05
            elif name == "lm_head.weight":
                t[:, 0] = 0
            for layer, experts in hot.items():
                if name == f"model.layers.{layer}.mlp.gate.weight":
                    t[:, 0] = 0
                    for i, e in enumerate(experts):
                        t[e, 0] = strength * (1 - 0.15 * i)
        save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def skewed_path(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("eplb") / "m12", num_experts=12)
    skew_routing(path, HOT)
    return path


def _params(max_tokens):
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]


@pytest.fixture(scope="module")
def expected(skewed_path):
    llm = LLM(str(skewed_path), device="cpu", progress=False)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params(MAX_TOKENS))]
    later = [o.outputs[0].token_ids for o in llm.generate(LATER, _params([12] * len(LATER)))]
    load = llm.engine.expert_load()
    for layer, experts in HOT.items():  # the gates do skew the routing
        assert load[layer, list(experts)].sum() > 0.6 * load[layer].sum()
    return first, later


def _rank_load(delta_LE: torch.Tensor, layouts_LP) -> torch.Tensor:
    return torch.tensor([rank_loads(row, layout, 3) for row, layout in zip(delta_LE.tolist(), layouts_LP)])


def test_rebalance_mid_decode_keeps_greedy_tokens_and_evens_the_ranks(ray_session, skewed_path, expected):
    first, later = expected
    llm = LLM(str(skewed_path), device="cpu", ep_size=3, num_redundant_experts=3, eplb_interval=6,
              eplb_min_imbalance=1.3, progress=False)
    engine = llm.engine
    executor = engine.executor
    try:
        initial = (initial_layout(12, 3, 3),) * 2
        assert executor.balancer.layouts_LP == initial
        tok = llm.get_tokenizer()
        for i, (prompt, params) in enumerate(zip(PROMPTS, _params(MAX_TOKENS))):
            engine.add_request(str(i), tok.encode(prompt), params)
        # Step by hand: after each step, the load counted so far and the layouts it ran under (a
        # rebalance happens before a step's forward, so the layouts after a step are the ones it used).
        tokens: dict[str, list[int]] = {}
        seen = torch.zeros(2, 12, dtype=torch.int64)
        rank_load = {"before": torch.zeros(2, 3), "after": torch.zeros(2, 3)}
        rebalanced_at, step = None, 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] = list(out.outputs[0].token_ids)
            step += 1
            load = engine.expert_load()
            era = "before" if executor.balancer.rebalances == 0 else "after"
            if era == "after" and rebalanced_at is None:
                rebalanced_at = step
                running = [r for r in tokens if len(tokens[r]) < MAX_TOKENS[int(r)]]
                assert len(running) == len(PROMPTS), "the rebalance comes while every request decodes"
            rank_load[era] += _rank_load(load - seen, executor.balancer.layouts_LP)
            seen = load
        assert rebalanced_at is not None and executor.balancer.rebalances >= 1
        assert [tokens[str(i)] for i in range(len(PROMPTS))] == first  # before, across and after: ep_size=1's

        # The layouts moved hot experts' copies, and every rank's slots hold what the layouts say.
        layouts = executor.balancer.layouts_LP
        assert layouts != initial
        slots = ray_session.get([w.slot_experts.remote() for w in executor.workers])
        for r in range(3):
            assert slots[r] == [tuple(layout[r * 5:(r + 1) * 5]) for layout in layouts]
        for layer, experts in HOT.items():
            assert max(layouts[layer].count(e) for e in experts) >= 2  # a hot expert has copies

        # Measured over each era's own tokens: the busiest rank over the mean falls by a margin.
        before = [imbalance(row.tolist()) for row in rank_load["before"]]
        after = [imbalance(row.tolist()) for row in rank_load["after"]]
        assert executor.balancer.last is not None
        assert max(before) > 1.5 and max(after) < 1.25 and max(after) < 0.75 * max(before), (before, after)

        # After: new requests on the rebalanced group, same tokens; no KV block leaked.
        assert [o.outputs[0].token_ids for o in llm.generate(LATER, _params([12] * len(LATER)))] == later
        stats = engine.stats()
        assert stats["kv_usage"] == 0.0 and stats["num_free_blocks"] == stats["num_blocks"]

        # /metrics reads the same report through the engine client's helper.
        report = expert_load_lists(engine)
        assert report["rebalances"] == executor.balancer.rebalances and len(report["rank_imbalance"]) == 2
        metrics = Metrics()
        metrics.observe_engine(engine.stats(), report)
        text = metrics.render().decode()
        assert f"expertmesh_eplb_rebalances_total {float(executor.balancer.rebalances)}" in text
        assert 'expertmesh_expert_rank_load_imbalance{layer="1"}' in text
        assert 'expertmesh_expert_routed_tokens_total{expert="3",layer="0"}' in text
    finally:
        llm.shutdown()


def test_eplb_start_up_refuses_a_shape_that_does_not_divide(ray_session, skewed_path):
    with pytest.raises(ValueError, match=r"14 slots do not divide evenly over 3 ranks"):
        LLM(str(skewed_path), device="cpu", ep_size=3, num_redundant_experts=2, progress=False)
    with pytest.raises(ValueError, match="at most 24"):
        LLM(str(skewed_path), device="cpu", ep_size=3, num_redundant_experts=10**9, progress=False)
