"""The engine replicas' series in Ray's metrics, which Ray's dashboard reads
(gateway/dashboard_metrics.py): the per-layer values they carry, how often the expert load is
read, and a real run: Ray Serve with Ray's metrics endpoint on, the tiny model, a few requests,
then the replica's load and per-layer expert-load imbalance scraped from that endpoint, tagged
with the engine deployment and its replica."""
from __future__ import annotations

import re

import httpx
import pytest
from serve_app_helper import running_app, wait_for

from expertmesh.gateway.dashboard_metrics import EXPERT_LOAD_PERIOD_S, DashboardMetrics, expert_series
from expertmesh.router.eplb import imbalance as load_imbalance


def test_expert_series_hold_each_layers_imbalance_across_experts_and_ranks():
    report = {"expert_load": [[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]], "rank_imbalance": [1.0, 2.5, 1.0],
              "rebalances": 2}
    series = expert_series(report)
    assert series["expertmesh_expert_load_imbalance"] == [("0", 1.0), ("1", 4.0), ("2", 1.0)]
    assert series["expertmesh_expert_rank_load_imbalance"] == [("0", 1.0), ("1", 2.5), ("2", 1.0)]
    assert expert_series({"expert_load": [[2, 6]]}) == {"expertmesh_expert_load_imbalance": [("0", 1.5)]}
    assert expert_series(None) == {} and expert_series({}) == {}  # a dense model has no expert load
    assert load_imbalance([3.0, 1.0]) == 1.5 and load_imbalance([0.0, 0.0]) == 1.0


def test_the_expert_load_is_read_at_most_once_a_period():
    metrics = DashboardMetrics.__new__(DashboardMetrics)  # the throttle alone: no Ray metrics needed
    metrics._next_expert_read = 0.0
    assert metrics.expert_load_due(now=100.0)
    assert not metrics.expert_load_due(now=100.0 + EXPERT_LOAD_PERIOD_S / 2)
    assert metrics.expert_load_due(now=100.0 + EXPERT_LOAD_PERIOD_S)


def _series(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one series in Prometheus text."""
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)}


@pytest.mark.slow
def test_the_engine_replicas_load_reaches_rays_metrics_endpoint(qwen3_moe_path):
    import openai

    from expertmesh.cluster.collective import free_port
    from expertmesh.gateway.serve_app import ENGINE_DEPLOYMENT

    metrics_port = free_port()
    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": 0}
    env = {"RAY_metrics_report_interval_ms": "1000"}  # Ray's export period (10 s by default)
    with running_app(args, env=env, ray_init={"_metrics_export_port": metrics_port}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for prompt in ("one two three", "the quick brown fox", "4 5 6 7"):
            assert client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        def scrape():
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            imbalance = _series(text, "ray_expertmesh_expert_load_imbalance")
            return (text, imbalance) if imbalance else None

        text, imbalance = wait_for(scrape, 90, "the expert load is in Ray's metrics", period=1.0)
        layers = {re.search(r'layer="(\d+)"', labels)[1] for labels in imbalance}
        assert layers == {"0", "1"}  # the tiny model's two MoE layers
        assert all(f'deployment="{ENGINE_DEPLOYMENT}"' in labels and 'replica="' in labels for labels in imbalance)
        assert all(value >= 1.0 for value in imbalance.values())  # tokens were routed: max over mean
        kv = _series(text, "ray_expertmesh_kv_cache_usage_ratio")
        assert kv and all(0.0 <= value <= 1.0 for value in kv.values())
        assert _series(text, "ray_expertmesh_num_requests_running")
