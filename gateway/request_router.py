"""The engine deployment's Ray Serve request router: prefix affinity, else power of two choices.

The choice itself is gateway/routing.py's (pure functions, where the design is written); this class
is the glue to Serve's `RequestRouter` API. Serve pickles this module by value into every process
that holds a handle to the deployment, so it keeps no state of its own at module level: what it
learns of the replicas goes to `routing.report`.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from expertmesh.gateway.app_config import REQUEST_ROUTING_POLICIES
from expertmesh.gateway.routing import PROBE_DEADLINE_S, ReplicaStats, preferred_replica, report, route

log = logging.getLogger(__name__)


class EngineRouter(RequestRouter):
    """Serve's request router of the engine deployment (`request_router_kwargs`: `policy`, one of
    REQUEST_ROUTING_POLICIES, and `busy_bound`). No FIFOMixin: the replica chosen for a request must
    serve that request, not the oldest one waiting, or the affinity would be lost."""

    policy: str = "prefix_affinity"
    busy_bound: int = 1

    def initialize_state(self, policy: str = "prefix_affinity", busy_bound: int = 1, seed: int | None = None,
                         **_: Any) -> None:
        if policy not in REQUEST_ROUTING_POLICIES:
            raise ValueError(f"request_routing must be one of {REQUEST_ROUTING_POLICIES}, not {policy!r}")
        self.policy, self.busy_bound = policy, max(1, int(busy_bound))
        self.rng = random.Random(seed)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        report(self._deployment_id.app_name, self._deployment_id.name,
               tuple(ReplicaStats(r.replica_id.unique_id, dict(r.routing_stats or {})) for r in replicas))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = self._key_of(pending_request)
        preferred = preferred_replica(key, list(by_id)) if key is not None else None
        load = await self._queue_len(by_id[preferred]) if preferred is not None else None
        others = [self.replica_queue_len_cache.get(r.replica_id) for i, r in by_id.items() if i != preferred]
        least = min((n for n in others if n is not None), default=None)  # Serve's cached figures: no probe
        rng = getattr(self, "rng", None) or random.Random()
        return [[by_id[i] for i in rank] for rank in route(key, list(by_id), load, self.busy_bound, rng, least)]

    def _key_of(self, pending_request: PendingRequest | None) -> str | None:
        if self.policy != "prefix_affinity" or pending_request is None:
            return None
        if pending_request.metadata.call_method != "generate":
            return None
        key = pending_request.kwargs.get("routing_key")
        return key if isinstance(key, str) else None

    async def _queue_len(self, replica: RunningReplica) -> int | None:
        """The replica's ongoing requests: Serve's cached figure, else asked once (None: no answer)."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is not None:
            return queue_len
        try:
            queue_len = await asyncio.wait_for(replica.get_queue_len(deadline_s=PROBE_DEADLINE_S), PROBE_DEADLINE_S)
        except Exception:  # a replica that does not answer is not preferred this time
            log.debug("no queue length from replica %s", replica.replica_id, exc_info=True)
            return None
        self.on_new_queue_len_info(replica.replica_id, queue_len)
        return queue_len
