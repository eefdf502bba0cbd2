"""Autoscaling the engine deployment: how many EP groups run, from the engines' own load.

Each engine replica is one EP group. Its `record_autoscaling_stats` reports what its engine
holds (Ray Serve's custom autoscaling metrics): sequences running, sequences waiting to be
admitted, and the share of KV blocks in use. Serve averages each over `look_back_period_s` per
replica, and `EnginePolicy` (the deployment's `autoscaling_config.policy`) turns them into a
number of replicas:

    up   (one group more)  sequences wait (one or more on average: an engine is full, its
                           max_num_seqs or its KV blocks keep requests out), or a replica's KV use passes
                           `kv_high`, or the sequences exceed `target_seqs` per replica
    down (one group fewer) nothing waits, and the sequences would fit the remaining groups at
                           `target_seqs` each, with their KV use under `kv_high`
    else                   as it is

One group at a time either way. Serve then applies `min_replicas`/`max_replicas` and the delays
(`upscale_delay_s`, `downscale_delay_s`): a decision must hold that long before it is acted on,
so a burst or a lull shorter than the delay changes nothing (no flapping). A replica being
removed stops receiving new requests and keeps serving those it has for up to the deployment's
`graceful_shutdown_timeout_s` (`drain_timeout_s`).
"""
from __future__ import annotations

import math
from typing import Any

METRICS = ("num_running", "num_waiting", "kv_usage")
"""What every engine replica reports (`EngineServer.record_autoscaling_stats`)."""


class EnginePolicy:
    """Serve's custom policy (`autoscaling_config.policy`; a class, so that Serve builds it once with
    the policy's kwargs): called with Serve's `AutoscalingContext` every control-loop tick, it
    returns (replicas wanted, policy state) by the module docstring's rule over the replicas'
    averaged metrics."""

    def __init__(self, target_seqs: float = 128.0, kv_high: float = 0.9) -> None:
        if target_seqs <= 0 or not 0 < kv_high <= 1:
            raise ValueError(f"target_seqs ({target_seqs}) must be > 0 and kv_high ({kv_high}) in (0, 1]")
        self.target_seqs, self.kv_high = target_seqs, kv_high

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        per_replica = {name: list((metrics.get(name) or {}).values()) for name in METRICS}
        return decide(ctx.current_num_replicas, per_replica, target_seqs=self.target_seqs,
                      kv_high=self.kv_high), ctx.policy_state


def decide(current: int, metrics: dict[str, list[float]], *, target_seqs: float, kv_high: float) -> int:
    """The number of replicas wanted, from each replica's averaged metrics. Before any replica has
    reported (or with none running) it keeps the current number."""
    running, waiting, kv = (metrics.get(name, []) for name in METRICS)
    if current < 1 or not running:
        return current
    seqs = sum(running) + sum(waiting)
    if sum(waiting) >= 1 or max(kv, default=0.0) > kv_high or seqs > target_seqs * current:
        return current + 1
    if current > 1 and seqs <= target_seqs * (current - 1) and sum(kv) < kv_high * (current - 1):
        return current - 1
    return current


def autoscaling_config(*, min_replicas: int, max_replicas: int, initial_replicas: int, target_seqs: float,
                       upscale_delay_s: float, downscale_delay_s: float, look_back_period_s: float) -> dict[str, Any]:
    """The engine deployment's `autoscaling_config` (Ray Serve's schema) with `EnginePolicy`."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "look_back_period_s": look_back_period_s,
        "policy": {"policy_function": "expertmesh.gateway.autoscaling:EnginePolicy",
                   "policy_kwargs": {"target_seqs": float(target_seqs)}},
    }


def default_target_seqs(max_num_seqs: int) -> int:
    """Sequences per replica the policy aims at when none is given: half of max_num_seqs (an engine
    at half its batch still has room for a burst while the next group starts)."""
    return max(1, math.ceil(max_num_seqs / 2))


__all__ = ["METRICS", "EnginePolicy", "autoscaling_config", "decide", "default_target_seqs"]
