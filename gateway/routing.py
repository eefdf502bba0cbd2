"""Routing requests across engine replicas: the choice, as pure functions, and the replicas' counters.

`EngineRouter` (gateway/request_router.py, Ray Serve's request-router API) applies these to every
call the gateway makes through its handle to the engine deployment. For each `generate` call:

1. The gateway hashes the prompt's first full KV blocks of token ids (`routing_key`: at most
   `KEY_BLOCKS` blocks of the engine's `block_size`) and passes the key with the call
   (`generate(..., routing_key=key)`); the router reads it from the `PendingRequest`.
2. The preferred replica is the key's rendezvous (highest-random-weight) choice over the live
   replica ids (`preferred_replica`): adding or removing a replica moves only that replica's share
   of the keys, so the others keep their caches warm.
3. The preferred replica is tried first unless it is busy: its ongoing requests (Serve's queue
   length: cached, else asked once) have reached `busy_bound` = min(max_ongoing_requests,
   max_num_seqs), the point past which a new request would wait for a batch slot rather than run.
   Busy, unknown (it did not answer), a prompt shorter than one block, any other call (`info`,
   `heartbeat`), or `request_routing: power_of_two`: the less loaded of two random replicas (Serve's
   power-of-two choice), which is also the second rank after the preferred replica (`route`).

The router also keeps what every replica last reported through Serve's `record_routing_stats`
(the engine's counters; Serve's controller asks each replica every `ROUTING_STATS_PERIOD_S` and
broadcasts what changed to every handle's router): `replica_stats(app, deployment)` hands them to
the gateway's /metrics, so its engine series cover every replica with no Ray call per scrape or
per token. They live here, not in the router's module, because Serve pickles that module by
value: its globals would be a copy in the gateway.
"""
from __future__ import annotations

import hashlib
import random
import threading
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KEY_BLOCKS = 4
"""Full KV blocks of the prompt the routing key covers (64 tokens at block_size 16): enough to tell
conversations and system prompts apart, few enough that a conversation's next turn, which repeats
its first blocks, keeps its key."""
ROUTING_STATS_PERIOD_S = 1.0
"""How often Serve's controller asks each engine replica for its counters (`record_routing_stats`)."""
PROBE_DEADLINE_S = 1.0
"""How long the router waits for the preferred replica's queue length when none is cached."""


def routing_key(prompt_token_ids: Sequence[int], block_size: int, max_blocks: int = KEY_BLOCKS) -> str | None:
    """The hex digest of the prompt's first full blocks of token ids (up to `max_blocks`), or None
    when the prompt is shorter than one block (or holds an id no int64 holds): such a request has no
    preferred replica."""
    num_blocks = min(len(prompt_token_ids) // block_size, max_blocks) if block_size >= 1 else 0
    if num_blocks < 1:
        return None
    try:
        data = array("q", prompt_token_ids[:num_blocks * block_size]).tobytes()
    except (OverflowError, TypeError):
        return None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _weight(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


def preferred_replica(key: str, replica_ids: Sequence[str]) -> str | None:
    """The replica of highest weight hash(key, replica id) (rendezvous hashing); None with none."""
    return max(replica_ids, key=lambda r: (_weight(key, r), r), default=None)


def busy_bound(max_ongoing_requests: int, max_num_seqs: int) -> int:
    """Ongoing requests at which the preferred replica counts as busy: its engine's batch is full
    (max_num_seqs) or Serve would refuse it more (max_ongoing_requests), whichever comes first."""
    return max(1, min(max_ongoing_requests, max_num_seqs))


def two_random(replica_ids: Sequence[str], rng: random.Random) -> list[str]:
    """Two distinct replicas at random (one when there is one): Serve's power-of-two candidates."""
    return rng.sample(list(replica_ids), min(2, len(replica_ids)))


SPILL_MARGIN = 8
"""Ongoing requests the preferred replica may hold beyond the least loaded one before its prefix
spills to the power-of-two pair: an application whose requests share one system prompt (one key)
stays on one replica under light load and spreads under heavy load, long before that replica's batch
is full (as Ray Serve LLM's prefix router and SGLang's cache-aware router bound their imbalance)."""


def route(key: str | None, replica_ids: Sequence[str], preferred_load: int | None, bound: int,
          rng: random.Random, least_load: int | None = None) -> list[list[str]]:
    """Ranks of candidate replicas for one request, most preferred first (Serve takes the least
    loaded replica with room in the first rank that has one). `preferred_load`: the ongoing requests
    of `preferred_replica(key, replica_ids)` (None: unknown, it did not answer); `least_load`: the
    fewest ongoing requests known of the other replicas (None: none known)."""
    fallback = two_random(replica_ids, rng)
    preferred = preferred_replica(key, replica_ids) if key is not None else None
    if preferred is None or preferred_load is None or preferred_load >= bound:
        return [fallback] if fallback else []
    if least_load is not None and preferred_load > least_load + SPILL_MARGIN:
        return [fallback]
    return [[preferred], fallback]


@dataclass(frozen=True)
class ReplicaStats:
    """One engine replica's counters as it last reported them (`EngineServer.record_routing_stats`;
    empty before its first report)."""
    replica_id: str
    stats: Mapping[str, float]


_reported: dict[tuple[str, str], tuple[ReplicaStats, ...]] = {}
_reported_lock = threading.Lock()


def report(app_name: str, deployment_name: str, replicas: tuple[ReplicaStats, ...]) -> None:
    """The router's latest view of the deployment's live replicas (it runs on Serve's router loop)."""
    with _reported_lock:
        _reported[(app_name, deployment_name)] = replicas


def replica_stats(app_name: str, deployment_name: str) -> tuple[ReplicaStats, ...]:
    """What every live replica of the deployment last reported, as this process's router saw it
    (empty before the router's first update)."""
    with _reported_lock:
        return _reported.get((app_name, deployment_name), ())


def summed_stats(replicas: Sequence[ReplicaStats]) -> dict[str, float]:
    """The engine counters summed over the replicas that reported (KV usage weighted by each
    replica's blocks), plus `num_engine_replicas`: the live replicas."""
    reported = [r.stats for r in replicas if r.stats]
    total: dict[str, float] = {"num_engine_replicas": float(len(replicas))}
    for stats in reported:
        for name, value in stats.items():
            if name != "kv_usage" and isinstance(value, (int, float)):  # (not the expert report)
                total[name] = total.get(name, 0.0) + float(value)
    blocks = sum(float(s.get("num_blocks", 0)) for s in reported)
    if blocks > 0:
        total["kv_usage"] = sum(float(s.get("kv_usage", 0)) * float(s.get("num_blocks", 0)) for s in reported) / blocks
    return total


EXPERT_REPORT = "expert_report"
"""The key of a replica's routing stats that holds its last expert-load report
(`engine_client.expert_load_lists`, read at most every dashboard_metrics.EXPERT_LOAD_PERIOD_S)."""


def merged_expert_reports(replicas: Sequence[ReplicaStats]) -> dict | None:
    """The expert-load reports of every replica that sent one, as one: routed tokens summed per layer
    and expert, each layer's rank imbalance the worst replica's, rebalances summed; None when none did
    (a dense model, or no report yet). Replicas of one deployment serve one model: reports of another
    shape are left out."""
    reports = [r.stats[EXPERT_REPORT] for r in replicas if isinstance(r.stats.get(EXPERT_REPORT), dict)]
    loads = [r["expert_load"] for r in reports if r.get("expert_load")]
    if not loads:
        return None
    shape = [len(row) for row in loads[0]]
    loads = [load for load in loads if [len(row) for row in load] == shape]
    merged: dict = {"expert_load": [[sum(rows) for rows in zip(*layer)] for layer in zip(*loads)]}
    ranks = [r["rank_imbalance"] for r in reports if r.get("rank_imbalance")]
    if ranks:
        merged["rank_imbalance"] = [max(values) for values in zip(*ranks)]
    if any("rebalances" in r for r in reports):
        merged["rebalances"] = sum(int(r.get("rebalances", 0)) for r in reports)
    return merged
