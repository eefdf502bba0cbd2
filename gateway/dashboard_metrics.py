"""The engine's figures on Ray's dashboard.

Each engine replica exports its load through Ray Serve's metrics API (`ray.serve.metrics`, which
tags every series with the replica's `deployment`, `replica` and `application`), so Ray's metrics
endpoint on every node (`ray start --metrics-export-port`), which the dashboard's Metrics view
and its Grafana dashboards read, carries them beside Serve's own per-replica series. Ray names
them with its `ray_` prefix:

    ray_expertmesh_num_requests_running / _waiting, ray_expertmesh_kv_cache_usage_ratio
    ray_expertmesh_expert_load_imbalance{layer}        busiest expert over the mean, per MoE layer
    ray_expertmesh_expert_rank_load_imbalance{layer}   busiest rank over the mean (an EP group)
    ray_expertmesh_eplb_rebalances_total               placements the load balancer switched

The gateway's own `/metrics` (gateway/metrics.py) sums the same figures over the replicas; these
are each replica's, one series per replica. `EngineServer.record_routing_stats`, which Serve polls
every second, feeds them: the engine's counters each time, its expert load (a device-to-host copy,
and on an EP group one call to its ranks) at most every `EXPERT_LOAD_PERIOD_S`.
"""
from __future__ import annotations

import time
from typing import Any

from expertmesh.router.eplb import imbalance as load_imbalance

EXPERT_LOAD_PERIOD_S = 10.0
"""Seconds between two reads of a replica's expert load (Ray exports metrics every 10 s by default)."""

ENGINE_GAUGES = {
    "expertmesh_num_requests_running": ("num_running", "Requests in the running batch of this engine replica."),
    "expertmesh_num_requests_waiting": ("num_waiting", "Requests waiting in this engine replica."),
    "expertmesh_kv_cache_usage_ratio": ("kv_usage", "Fraction of this engine replica's KV cache blocks in use."),
}


def expert_series(report: dict[str, Any] | None) -> dict[str, list[tuple[str, float]]]:
    """Per-layer values of the expert-load report (`engine_client.expert_load_lists`), as
    {series name: [(layer, value)]}: the imbalance across experts and, from an EP group, across ranks."""
    if not report:
        return {}
    series: dict[str, list[tuple[str, float]]] = {}
    if report.get("expert_load"):
        series["expertmesh_expert_load_imbalance"] = [
            (str(layer), load_imbalance(counts)) for layer, counts in enumerate(report["expert_load"])]
    if report.get("rank_imbalance"):
        series["expertmesh_expert_rank_load_imbalance"] = [
            (str(layer), float(value)) for layer, value in enumerate(report["rank_imbalance"])]
    return series


class DashboardMetrics:
    """One engine replica's series in Ray's metrics (made inside the replica, where Serve tags them)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.engine = {name: metrics.Gauge(name, description=doc) for name, (_, doc) in ENGINE_GAUGES.items()}
        self.layers = {
            "expertmesh_expert_load_imbalance": metrics.Gauge(
                "expertmesh_expert_load_imbalance", tag_keys=("layer",),
                description="Per MoE layer: the busiest expert's routed tokens over the mean per expert (1 is even)."),
            "expertmesh_expert_rank_load_imbalance": metrics.Gauge(
                "expertmesh_expert_rank_load_imbalance", tag_keys=("layer",),
                description="Per MoE layer: the busiest rank's routed tokens over the mean per rank of the EP "
                            "group, since the last load-balancer check (1 is even)."),
        }
        self.rebalances = metrics.Counter("expertmesh_eplb_rebalances_total",
                                          description="Expert placements the load balancer switched.")
        self._rebalances_seen = 0
        self._next_expert_read = 0.0

    def expert_load_due(self, now: float | None = None) -> bool:
        """Whether the expert load should be read again (at most every EXPERT_LOAD_PERIOD_S)."""
        now = time.monotonic() if now is None else now
        if now < self._next_expert_read:
            return False
        self._next_expert_read = now + EXPERT_LOAD_PERIOD_S
        return True

    def observe(self, stats: dict[str, float], report: dict[str, Any] | None = None) -> None:
        """The engine's counters (`AsyncEngine.stats`), and its expert-load report when one was read."""
        for name, (key, _) in ENGINE_GAUGES.items():
            if key in stats:
                self.engine[name].set(float(stats[key]))
        for name, values in expert_series(report).items():
            for layer, value in values:
                self.layers[name].set(value, tags={"layer": layer})
        total = int((report or {}).get("rebalances", self._rebalances_seen))
        if total > self._rebalances_seen:
            self.rebalances.inc(total - self._rebalances_seen)
            self._rebalances_seen = total
