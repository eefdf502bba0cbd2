"""Routing across engine replicas without Ray (gateway/routing.py, gateway/request_router.py): the
routing key, rendezvous hashing (stable when a replica comes or goes), the fallback to the less
loaded of two, the replicas' counters summed for /metrics, the `request_routing` setting and the
deployment options it gives Serve."""
from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from expertmesh.gateway.app_config import AppConfig
from expertmesh.gateway.metrics import Metrics
from expertmesh.gateway.routing import (
    KEY_BLOCKS,
    ReplicaStats,
    busy_bound,
    preferred_replica,
    route,
    routing_key,
    summed_stats,
    two_random,
)

KEYS = [routing_key(list(range(i, i + 64)), 16) for i in range(2000)]
REPLICAS = [f"replica-{i}" for i in range(4)]


def test_the_key_covers_the_first_full_blocks_only():
    prompt = list(range(100, 100 + 16 * KEY_BLOCKS))
    key = routing_key(prompt, 16)
    assert key is not None and len(key) == 32
    assert routing_key(prompt + [7, 8, 9], 16) == key  # what follows the first KEY_BLOCKS blocks is not read
    assert routing_key(prompt + list(range(500)), 16) == key
    assert routing_key(prompt[:-1], 16) != key  # one block fewer is another key
    assert routing_key([1] + prompt[1:], 16) != key  # so is any change inside the blocks
    assert routing_key(prompt[:20], 16) == routing_key(prompt[:31], 16)  # a partial block is not read
    longer = prompt + list(range(64))
    assert routing_key(longer, 32) != routing_key(longer, 16)  # KEY_BLOCKS blocks of 32 read 128 tokens


@pytest.mark.parametrize("prompt, block_size", [([], 16), (list(range(15)), 16), (list(range(40)), 0),
                                                (list(range(40)), -3), ([2**63] * 16, 16), ([-2**63 - 1] * 16, 16)])
def test_no_key_for_a_prompt_shorter_than_a_block_or_past_int64(prompt, block_size):
    assert routing_key(prompt, block_size) is None


def test_rendezvous_hashing_is_deterministic_and_spreads_keys_evenly():
    owners = [preferred_replica(k, REPLICAS) for k in KEYS]
    assert owners == [preferred_replica(k, list(reversed(REPLICAS))) for k in KEYS]  # order does not matter
    counts = {r: owners.count(r) for r in REPLICAS}
    assert all(400 <= c <= 600 for c in counts.values()), counts  # 500 each, give or take
    assert preferred_replica("any", []) is None
    assert preferred_replica("any", ["only"]) == "only"


def test_adding_a_replica_moves_only_the_keys_it_takes():
    before = {k: preferred_replica(k, REPLICAS) for k in KEYS}
    after = {k: preferred_replica(k, [*REPLICAS, "replica-new"]) for k in KEYS}
    moved = [k for k in KEYS if after[k] != before[k]]
    assert all(after[k] == "replica-new" for k in moved)
    assert 300 <= len(moved) <= 500  # a fifth of 2000


def test_removing_a_replica_moves_only_its_keys():
    before = {k: preferred_replica(k, REPLICAS) for k in KEYS}
    after = {k: preferred_replica(k, REPLICAS[1:]) for k in KEYS}
    moved = {k for k in KEYS if after[k] != before[k]}
    assert moved == {k for k in KEYS if before[k] == REPLICAS[0]}


def test_the_preferred_replica_comes_first_unless_busy_or_unknown():
    rng, key = random.Random(0), KEYS[0]
    preferred = preferred_replica(key, REPLICAS)
    ranks = route(key, REPLICAS, 3, 8, rng)
    assert ranks[0] == [preferred] and len(ranks) == 2  # then the power-of-two pair, should it be full
    assert len(set(ranks[1])) == 2 and set(ranks[1]) <= set(REPLICAS)
    for load in (8, 9, None):  # at the bound, past it, no answer: the less loaded of two random replicas
        ranks = route(key, REPLICAS, load, 8, rng)
        assert len(ranks) == 1 and len(set(ranks[0])) == 2
    ranks = route(None, REPLICAS, None, 8, rng)  # a prompt shorter than one block
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert route(key, ["only"], 0, 8, rng) == [["only"], ["only"]]
    assert route(key, [], None, 8, rng) == [] and route(None, [], None, 8, rng) == []


def test_the_fallback_pair_is_random_over_every_replica():
    rng = random.Random(1)
    seen = {r for _ in range(200) for r in two_random(REPLICAS, rng)}
    assert seen == set(REPLICAS)
    assert two_random(["a"], rng) == ["a"] and two_random([], rng) == []


def test_busy_bound_is_the_batch_or_serves_limit():
    assert busy_bound(1024, 256) == 256
    assert busy_bound(4, 256) == 4
    assert busy_bound(0, 0) == 1


def test_replica_counters_are_summed_kv_usage_weighted_by_blocks():
    replicas = (ReplicaStats("a", {"num_running": 2, "prefix_cache_queries": 100, "prefix_cache_hits": 40,
                                   "kv_usage": 0.5, "num_blocks": 100}),
                ReplicaStats("b", {"num_running": 1, "prefix_cache_queries": 50, "prefix_cache_hits": 10,
                                   "kv_usage": 0.0, "num_blocks": 300}),
                ReplicaStats("c", {}))  # running, not reported yet
    total = summed_stats(replicas)
    assert total["num_engine_replicas"] == 3
    assert (total["num_running"], total["prefix_cache_queries"], total["prefix_cache_hits"]) == (3, 150, 50)
    assert total["kv_usage"] == pytest.approx(0.125) and total["num_blocks"] == 400
    assert summed_stats(()) == {"num_engine_replicas": 0.0}


def test_metrics_show_the_prefix_cache_over_replicas_and_each_replica():
    metrics = Metrics()
    replicas = {"a": {"prefix_cache_queries": 100.0, "prefix_cache_hits": 40.0, "num_running": 2.0},
                "b": {"prefix_cache_queries": 50.0, "prefix_cache_hits": 10.0, "num_running": 0.0}}
    metrics.observe_engine({"prefix_cache_queries": 150.0, "prefix_cache_hits": 50.0, "num_engine_replicas": 2.0},
                           None, replicas)
    text = metrics.render().decode()
    for line in ("# TYPE expertmesh_prefix_cache_queries_total counter", "expertmesh_prefix_cache_queries_total 150.0",
                 "expertmesh_prefix_cache_hits_total 50.0", "expertmesh_prefix_cache_hit_rate 0.3333333333333333",
                 "expertmesh_engine_replicas 2.0", 'expertmesh_replica_prefix_cache_hits_total{replica="a"} 40.0',
                 'expertmesh_replica_prefix_cache_queries_total{replica="b"} 50.0',
                 'expertmesh_replica_num_requests_running{replica="a"} 2.0'):
        assert line in text.splitlines(), line
    metrics.observe_engine({"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}, None)
    text = metrics.render().decode()
    assert "expertmesh_prefix_cache_hit_rate 0.0" in text.splitlines() and "expertmesh_replica_" not in text


@pytest.mark.parametrize("value", ["", "PREFIX_AFFINITY", "round_robin", "prefix_affinity " * 10_000, 1, -1, 0.5,
                                   None, True, ["prefix_affinity"]])
def test_hostile_request_routing_values_are_refused_by_name(value):
    with pytest.raises(ValidationError, match="request_routing"):
        AppConfig.model_validate({"request_routing": value})


def test_the_router_refuses_an_unknown_policy():
    from expertmesh.gateway.request_router import EngineRouter

    router = EngineRouter.__new__(EngineRouter)  # initialize_state alone: no Serve around it
    with pytest.raises(ValueError, match="request_routing must be one of"):
        router.initialize_state(policy="random")
    router.initialize_state(policy="power_of_two", busy_bound=-5)
    assert (router.policy, router.busy_bound) == ("power_of_two", 1)


@pytest.mark.parametrize("routing", ["prefix_affinity", "power_of_two"])
def test_build_app_gives_serve_the_router_and_keeps_the_setting_off_the_replicas(qwen3_moe_path, routing):
    from expertmesh.gateway.serve_app import build_app

    args = {"model": str(qwen3_moe_path), "device": "cpu", "request_routing": routing, "max_num_seqs": 8,
            "max_ongoing_requests": 100}
    gateway = build_app(args)._bound_deployment
    engine = gateway.init_args[0]._bound_deployment
    router = engine._deployment_config.request_router_config
    assert router.request_router_class == "expertmesh.gateway.request_router:EngineRouter"
    assert router.request_router_kwargs == {"policy": routing, "busy_bound": 8}
    assert router.request_routing_stats_period_s == 1.0
    # a deployment setting: changing it reconfigures the router, never restarts an engine
    assert "request_routing" not in engine.init_args[0] and "request_routing" not in gateway.init_args[1]


def test_the_serve_internals_each_engine_call_relies_on_are_there():
    """`serve_app._as_own_request` gives each engine call its own Serve request id through Serve's
    request context, which Serve has no public option for: a Ray release that renames these fails
    here, not as an outage of every generate call."""
    import dataclasses

    from ray.serve import context as serve_context
    from ray.serve._private.utils import generate_request_id

    current = serve_context._get_serve_request_context()
    assert "_internal_request_id" in {f.name for f in dataclasses.fields(current)}
    assert isinstance(generate_request_id(), str)
    token = serve_context._serve_request_context.set(dataclasses.replace(current, _internal_request_id="x"))
    serve_context._serve_request_context.reset(token)


def test_the_replicas_expert_loads_merge_into_one_report():
    from expertmesh.gateway.routing import EXPERT_REPORT, ReplicaStats, merged_expert_reports, summed_stats

    a = ReplicaStats("a", {"num_running": 1.0, EXPERT_REPORT: {"expert_load": [[1, 2], [3, 0]],
                                                               "rank_imbalance": [1.0, 1.5], "rebalances": 1}})
    b = ReplicaStats("b", {"num_running": 2.0, EXPERT_REPORT: {"expert_load": [[4, 0], [0, 1]],
                                                               "rank_imbalance": [2.0, 1.1], "rebalances": 2}})
    odd = ReplicaStats("c", {EXPERT_REPORT: {"expert_load": [[1, 1, 1]]}})  # another shape: left out
    assert merged_expert_reports([a, b, odd]) == {"expert_load": [[5, 2], [3, 1]], "rank_imbalance": [2.0, 1.5],
                                                  "rebalances": 3}
    assert merged_expert_reports([ReplicaStats("d", {"num_running": 0.0})]) is None  # dense, or not yet
    assert summed_stats([a, b]) == {"num_engine_replicas": 2.0, "num_running": 3.0}  # the report is not summed


def test_a_preferred_replica_far_ahead_of_the_least_loaded_spills_its_prefix():
    """One system prompt (one key) for a whole application must not pin it to one replica until that
    replica's batch is full: past SPILL_MARGIN more requests than the least loaded, it spills."""
    import random

    from expertmesh.gateway.routing import SPILL_MARGIN, preferred_replica, route

    ids = ["a", "b", "c"]
    key = "k" * 32
    want = preferred_replica(key, ids)
    rng = random.Random(0)
    assert route(key, ids, SPILL_MARGIN, 256, rng, least_load=0)[0] == [want]  # within the margin: affinity
    assert route(key, ids, 30, 256, rng, least_load=30 - SPILL_MARGIN)[0] == [want]
    spilled = route(key, ids, SPILL_MARGIN + 1, 256, rng, least_load=0)
    assert len(spilled) == 1 and len(spilled[0]) == 2  # only the power-of-two pair
    assert route(key, ids, 50, 256, rng, least_load=None)[0] == [want]  # no other load known: affinity
