"""Prometheus metrics of one gateway, in vLLM's vocabulary under the `expertmesh_` prefix.

Request-side series (counters and latency histograms) are recorded by the serving layer as
requests run; engine-side series (running and waiting requests, KV block usage, the prefix cache's
queried and hit tokens, expert-load imbalance per layer, per expert and across an EP group's ranks,
load-balancer rebalances) are read from the engine at scrape time. Under Ray Serve the engine
counters are summed over every engine replica, as each last reported them (within about a second:
gateway/routing.py; the expert load merged likewise, within about 10 s), with
`expertmesh_engine_replicas` and the `expertmesh_replica_*{replica}` series of each replica beside
them.
Each gateway has its own registry: several apps in one process never collide.

Server-side tools (gateway/tools/runner.py) add `expertmesh_tool_calls_total{server, outcome}` (outcome
one of TOOL_OUTCOMES) and `expertmesh_tool_call_duration_seconds{server}`; `server` is a registered
label or webhook name, or "request" for every server a request named by URL (a bounded set).

`expertmesh_requests_total{endpoint, status}` counts every API request once, refusals included
(a 401, a 413, a malformed body never reach the serving layer): the transport (the HTTP guard,
the gRPC servicer) opens a `RequestOutcome` for each request and counts it when the request
ends. A request that reached the engine reports its own status into that outcome (a stream that
started with 200 may still end in 499, 500 or 503). With no transport around it (tests calling
`OpenAIServing` directly), the engine stream counts itself.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from expertmesh.router.eplb import imbalance as load_imbalance

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
_TOOL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOOL_OUTCOMES = ("ok", "error", "timeout", "too_large", "refused")
"""The `outcome` label of `expertmesh_tool_calls_total` (gateway/tools/runner.py)."""


@dataclass
class RequestOutcome:
    """One API request's status, filled in as it runs and counted once when it ends."""
    endpoint: str
    status: str | None = None
    """The status the serving layer reported (it outranks the transport's first status line)."""

    def report(self, status: str) -> None:
        if self.status is None or self.status == "200":
            self.status = status


current_outcome: ContextVar[RequestOutcome | None] = ContextVar("expertmesh_request_outcome", default=None)
"""The outcome of the request being served in this context (set by the transport)."""


def endpoint_of(path: str) -> str:
    """The `endpoint` label of an HTTP path (a bounded set: unknown paths are "other"); a stored
    response's paths (`/v1/responses/{id}`, its input_items) count as "responses"."""
    known = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
             "/v1/models": "models"}.get(path.rstrip("/"))
    if known is not None:
        return known
    for prefix, endpoint in (("/v1/models/", "models"), ("/v1/responses/", "responses")):
        if path.startswith(prefix):
            return endpoint
    return "other"


class _EngineCollector(Collector):
    """Gauges from the latest engine snapshot, set by `Metrics.observe_engine` before a scrape."""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}
        self.expert_load: dict | None = None
        self.replicas: dict[str, dict[str, float]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self.stats
        for name, key, doc in (
            ("expertmesh_num_requests_running", "num_running", "Requests in the running batch."),
            ("expertmesh_num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
            ("expertmesh_kv_cache_usage_ratio", "kv_usage", "Fraction of KV cache blocks in use (0 to 1)."),
            ("expertmesh_kv_cache_free_blocks", "num_free_blocks", "KV cache blocks free."),
            ("expertmesh_kv_cache_blocks", "num_blocks", "KV cache blocks in all."),
            ("expertmesh_engine_replicas", "num_engine_replicas", "Engine replicas (EP groups) serving."),
            ("expertmesh_num_preemptions", "num_preemptions", "Requests preempted (recomputed) so far."),
            ("expertmesh_num_resumptions", "num_resumptions",
             "Requests this engine replica resumed (on a fresh EP group, or from another replica)."),
            ("expertmesh_num_replica_resumptions", "num_replica_resumptions",
             "Requests this gateway moved to another engine replica after theirs died."),
        ):
            if key in s:
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        yield from self._prefix_cache()
        report = self.expert_load or {}
        load = report.get("expert_load")
        if load:
            imbalance = GaugeMetricFamily(
                "expertmesh_expert_load_imbalance",
                "Per MoE layer: tokens routed to the busiest expert over the mean per expert (1 is even).",
                labels=["layer"])
            tokens = CounterMetricFamily("expertmesh_expert_routed_tokens",
                                         "Token copies routed to each expert of each MoE layer.",
                                         labels=["layer", "expert"])
            for layer, counts in enumerate(load):
                imbalance.add_metric([str(layer)], load_imbalance(counts))  # busiest expert over the mean
                for expert, count in enumerate(counts):
                    tokens.add_metric([str(layer), str(expert)], float(count))
            yield imbalance
            yield tokens
        if report.get("rank_imbalance"):
            ranks = GaugeMetricFamily(
                "expertmesh_expert_rank_load_imbalance",
                "Per MoE layer: the busiest rank's routed tokens over the mean per rank of the EP group, "
                "under the expert placement in force, since the last load-balancer check (1 is even).",
                labels=["layer"])
            for layer, value in enumerate(report["rank_imbalance"]):
                ranks.add_metric([str(layer)], float(value))
            yield ranks
        if "rebalances" in report:
            yield CounterMetricFamily("expertmesh_eplb_rebalances", "Expert placements switched by the load balancer.",
                                      value=float(report["rebalances"]))

    def _prefix_cache(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        """The prefix cache in tokens, as vLLM counts it: queried (prompt tokens looked up at admission)
        and hit (found cached), summed over the replicas, their ratio, and each replica's own."""
        s = self.stats
        if "prefix_cache_queries" in s and "prefix_cache_hits" in s:
            queries, hits = float(s["prefix_cache_queries"]), float(s["prefix_cache_hits"])
            yield CounterMetricFamily("expertmesh_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache, over every engine replica.", value=queries)
            yield CounterMetricFamily("expertmesh_prefix_cache_hits", "Prompt tokens found in the prefix cache, "
                                      "over every engine replica.", value=hits)
            yield GaugeMetricFamily("expertmesh_prefix_cache_hit_rate", "Prefix-cache hits over queries in "
                                    "tokens, since the replicas started (0 before any query).",
                                    value=hits / queries if queries > 0 else 0.0)
        if not self.replicas:
            return
        families = {key: CounterMetricFamily(f"expertmesh_replica_{key}", f"{doc}, per engine replica.",
                                             labels=["replica"])
                    for key, doc in (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                                     ("prefix_cache_hits", "Prompt tokens found in the prefix cache"))}
        running = GaugeMetricFamily("expertmesh_replica_num_requests_running",
                                    "Requests in the running batch, per engine replica.", labels=["replica"])
        for replica, stats in sorted(self.replicas.items()):
            for key, family in families.items():
                if key in stats:
                    family.add_metric([replica], float(stats[key]))
            if "num_running" in stats:
                running.add_metric([replica], float(stats["num_running"]))
        yield from (*families.values(), running)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("expertmesh_requests", "Requests finished, by endpoint and HTTP-style status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("expertmesh_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("expertmesh_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("expertmesh_time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("expertmesh_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("expertmesh_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.tool_calls = Counter("expertmesh_tool_calls", "Server-side tool calls (MCP servers and webhooks) by "
                                  "server (an MCP server_label or webhook name; \"request\" for servers a request "
                                  "named by URL) and outcome (ok, error, timeout, too_large, refused).",
                                  ["server", "outcome"], registry=r)
        self.tool_call_duration = Histogram("expertmesh_tool_call_duration_seconds", "Time of one server-side tool "
                                            "call, waiting for a free slot of its server included.", ["server"],
                                            buckets=_TOOL_BUCKETS, registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def count_tool_call(self, server: str, outcome: str, duration_s: float) -> None:
        """One server-side tool call ended with `outcome` (one of TOOL_OUTCOMES) after `duration_s`."""
        self.tool_calls.labels(server, outcome).inc()
        self.tool_call_duration.labels(server).observe(duration_s)

    def observe_engine(self, stats: dict[str, float], expert_load: dict | list[list[float]] | None,
                       replicas: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """The engine's latest figures: `stats` summed over the replicas, `replicas` by replica id;
        `expert_load` the engine's report (`engine_client.expert_load_lists`), or the bare
        [layer][expert] token counts of an older engine."""
        if isinstance(expert_load, list):
            expert_load = {"expert_load": expert_load}
        self._engine.stats, self._engine.expert_load = dict(stats), expert_load
        self._engine.replicas = {r: dict(v) for r, v in (replicas or {}).items()}

    def render(self) -> bytes:
        return generate_latest(self.registry)
