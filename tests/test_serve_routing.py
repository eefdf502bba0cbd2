"""Prefix-affinity routing and the replicas' counters on real Ray Serve (CPU, the tiny model, two
engine replicas, the official client): prompts sharing their first KV blocks all land on one replica
(its prefix cache hits grow, the other's counters stand still) while other prefixes spread over
both; with the preferred replica busy (max_num_seqs 2: its batch is full of held-open streams), more
requests with that prefix go to the other replica and succeed; /metrics' prefix-cache counters are
the sum of what each replica's engine counts, read from the replicas themselves."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from serve_app_helper import APP, running_app, wait_for

pytestmark = pytest.mark.slow

BLOCK = 16
SHARED = [100 + (i * 7) % 300 for i in range(5 * BLOCK)]  # five full blocks: the key reads the first four


def _prompt(prefix: list[int], i: int) -> list[int]:
    return prefix + [400 + i, 401 + i, 402 + i]


@pytest.fixture(scope="module")
def served(qwen3_moe_path):
    import openai

    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": 0, "engine_replicas": 2,
            "num_kv_blocks": 512, "block_size": BLOCK, "max_num_seqs": 2}
    with running_app(args, num_cpus=4) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        wait_for(lambda: _metrics(base)[0].get("expertmesh_engine_replicas") == 2.0, 60, "both replicas report")
        yield {"client": client, "model": model, "base": base}


def _metrics(base: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(/metrics' unlabelled series, {series: {replica: value}} of the expertmesh_replica_* ones)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    plain = {name: float(v) for name, v in re.findall(r"^(expertmesh_\w+) (\S+)$", text, re.MULTILINE)}
    per_replica: dict[str, dict[str, float]] = {}
    for name, replica, v in re.findall(r'^(expertmesh_replica_\w+)\{replica="([^"]+)"\} (\S+)$', text, re.MULTILINE):
        per_replica.setdefault(name, {})[replica] = float(v)
    return plain, per_replica


def _per_replica(base: str, series: str) -> dict[str, float]:
    return _metrics(base)[1].get(f"expertmesh_replica_{series}", {})


def _settled(base: str, series: str, want_total: float) -> dict[str, float]:
    """Each replica's `series` once their sum has reached `want_total` (the replicas report every second)."""
    return wait_for(lambda: (v := _per_replica(base, series)) and sum(v.values()) >= want_total and v, 30,
                    f"{series} reaches {want_total}")


def _complete(served, prompt: list[int], max_tokens: int = 2) -> str:
    r = served["client"].completions.create(model=served["model"], prompt=prompt, max_tokens=max_tokens,
                                            temperature=0)
    return r.choices[0].finish_reason


def _grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: after.get(r, 0.0) - before.get(r, 0.0) for r in after}


def test_prompts_sharing_a_prefix_land_on_one_replica_and_others_spread(served):
    base = served["base"]
    queries0 = _per_replica(base, "prefix_cache_queries_total")
    hits0 = _per_replica(base, "prefix_cache_hits_total")
    for i in range(6):
        assert _complete(served, _prompt(SHARED, i)) == "length"
    want = sum(queries0.values()) + 6 * len(_prompt(SHARED, 0))
    queries = _grown(queries0, _settled(base, "prefix_cache_queries_total", want))
    hits = _grown(hits0, _per_replica(base, "prefix_cache_hits_total"))
    home = max(queries, key=lambda r: queries[r])
    assert len(queries) == 2 and queries[home] == 6 * len(_prompt(SHARED, 0)), queries
    assert all(v == 0 for r, v in queries.items() if r != home), queries  # the other replica saw none of them
    assert hits[home] >= 5 * 4 * BLOCK, hits  # every request after the first found the shared blocks cached

    queries0 = _settled(base, "prefix_cache_queries_total", want)
    for i in range(16):  # sixteen other prefixes: both replicas get some (2 in 65,536 would not)
        assert _complete(served, [500 + 23 * i + j for j in range(2 * BLOCK)]) == "length"
    queries = _grown(queries0, _settled(base, "prefix_cache_queries_total", want + 16 * 2 * BLOCK))
    assert all(v > 0 for v in queries.values()), queries


def test_a_busy_preferred_replica_sends_its_prefix_to_the_other(served):
    base, client = served["base"], served["client"]
    prefix = [50 + (i * 11) % 250 for i in range(4 * BLOCK)]
    assert _complete(served, _prompt(prefix, 0)) == "length"
    time.sleep(2.5)  # the replicas' next reports
    queries0 = _per_replica(base, "prefix_cache_queries_total")
    started, done, failures = threading.Barrier(3), threading.Event(), []

    def hold(i: int) -> None:  # a stream of the prefix that runs until the others are done
        try:
            stream = client.completions.create(model=served["model"], prompt=_prompt(prefix, i), max_tokens=3000,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            started.wait(timeout=120)
            done.wait(timeout=300)
            stream.close()
        except Exception as exc:
            failures.append(repr(exc))

    holders = [threading.Thread(target=hold, args=(i,), daemon=True) for i in (1, 2)]
    for t in holders:
        t.start()
    started.wait(timeout=120)
    assert _per_replica(base, "num_requests_running") is not None
    home = wait_for(lambda: next((r for r, v in _per_replica(base, "num_requests_running").items() if v == 2), None),
                    30, "one replica runs both held streams")  # affinity put both on the preferred replica
    try:
        for i in range(3, 6):  # the preferred replica's batch is full: these go to the other one
            assert _complete(served, _prompt(prefix, i)) == "length"
        assert not done.is_set() and all(t.is_alive() for t in holders), "the held streams ended too soon"
    finally:
        done.set()
        for t in holders:
            t.join(timeout=60)
    assert not failures, failures
    queries = _grown(queries0, _settled(base, "prefix_cache_queries_total",
                                        sum(queries0.values()) + 5 * len(_prompt(prefix, 0))))
    other = next(r for r in queries if r != home)
    assert queries[home] == 2 * len(_prompt(prefix, 0)), queries  # the two held streams only
    assert queries[other] == 3 * len(_prompt(prefix, 0)), queries


def test_the_prompts_of_one_batched_request_are_each_routed(served):
    """Several engine calls from one HTTP request (one per prompt) each reach a replica: Serve's
    router matches a choice to its request by an id those calls would otherwise share."""
    prompts = [_prompt(SHARED, 200 + i) for i in range(3)]
    prompts += [[600 + 29 * i + j for j in range(BLOCK)] for i in range(3)]
    r = served["client"].with_options(timeout=90).completions.create(model=served["model"], prompt=prompts,
                                                                      max_tokens=2, temperature=0)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)


def test_metrics_sum_the_prefix_cache_of_every_replica_as_the_engines_count_it(served):
    import ray

    _complete(served, _prompt(SHARED, 99))

    def replica_counters() -> dict[str, dict[str, float]]:
        """Each engine replica's counters, asked of the replica actor itself (Serve's
        record_routing_stats, which calls EngineServer.record_routing_stats)."""
        out = {}
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"]
            if name.startswith(f"SERVE_REPLICA::{APP}#ExpertMeshEngine#"):
                handle = ray.get_actor(name, namespace=actor["namespace"])
                out[name.rsplit("#", 1)[1]] = ray.get(handle.record_routing_stats.remote(), timeout=30)
        return out

    def agree():
        engines = replica_counters()
        plain, per_replica = _metrics(served["base"])
        queries = sum(s["prefix_cache_queries"] for s in engines.values())
        hits = sum(s["prefix_cache_hits"] for s in engines.values())
        return (len(engines) == 2 and plain["expertmesh_engine_replicas"] == 2
                and plain["expertmesh_prefix_cache_queries_total"] == queries
                and plain["expertmesh_prefix_cache_hits_total"] == hits
                and per_replica["expertmesh_replica_prefix_cache_hits_total"] == {
                    r: s["prefix_cache_hits"] for r, s in engines.items()}
                and plain["expertmesh_prefix_cache_hit_rate"] == pytest.approx(hits / queries) and hits > 0)

    wait_for(agree, 30, "/metrics agrees with the replicas' own counters")
