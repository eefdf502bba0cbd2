"""The Ray Serve application: an ingress deployment and a model deployment.

    HTTP (Serve proxy) ──▶ Gateway replica: FastAPI app + gRPC server (auth, template, parsers)
    gRPC (every gateway replica's own server; one port per node, SO_REUSEPORT) ──▶ the same replica
                              │  handle.generate (a stream of step outputs per request)
                              ▼
                           EngineServer replica = one EP group: AsyncEngine(EngineCore) with an
                           in-process runner (ep_size 1) or N RankWorker actors scheduled into the
                           replica's own placement group (bundle 0: the replica, 1..N: the ranks)

`build_app(args)` is the import path of a Serve config file (`serve run`/`serve deploy`, and the
Helm chart's `serveConfigV2`); `args` is an `AppConfig`. `expertmesh serve` builds the same app
from its flags. Both deployments allow many ongoing requests: the engine batches them itself.
The gateway's handle routes each request to an engine replica through `EngineRouter`
(gateway/request_router.py: prefix affinity, else the less loaded of two; gateway/routing.py says
how), which also brings every replica's counters (`record_routing_stats`) to the gateway's /metrics.

Lost ends, both ways:
- the engine replica dies: its handle calls fail with Ray's actor errors; the gateway's client
  resumes each request on a healthy replica from what it had streamed (`ServeEngineClient`), up to
  `max_resumptions` times, then turns the failure into `EngineDeadError`: a stream ends with an
  error event (gRPC: UNAVAILABLE) and a unary call with a 503;
- the gateway replica dies: Ray does not cancel the calls it made, so each request carries its
  gateway's actor handle (`GatewayRef`) and the engine replica pings the gateways it serves
  (`CallerWatch`) every `CALLER_CHECK_PERIOD_S`; a gateway Ray reports dead has its requests
  cancelled, which aborts them in the engine and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from expertmesh.cluster.placement import rank_bundles
from expertmesh.engine.async_engine import AsyncEngine, EngineDeadError, EngineHeartbeat
from expertmesh.engine.core import EngineCore, Resume
from expertmesh.engine.model_files import load_tokenizer
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.gateway.app_config import AppConfig
from expertmesh.gateway.routing import (
    EXPERT_REPORT,
    ROUTING_STATS_PERIOD_S,
    ReplicaStats,
    busy_bound,
    merged_expert_reports,
    replica_stats,
    routing_key,
    summed_stats,
)

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT, GATEWAY_DEPLOYMENT = "ExpertMeshEngine", "ExpertMeshGateway"
CALLER_CHECK_PERIOD_S = 2.0
"""How often an engine replica asks Ray whether the gateways with requests in flight still live."""


@dataclass(frozen=True)
class GatewayRef:
    """The gateway replica a request came from: its Ray actor id and handle."""
    actor_id: str
    handle: Any


class CallerWatch:
    """Cancels the calls of gateway replicas that died (see the module docstring). Only Ray's word
    that an actor died (`ActorDiedError`) counts: a gateway that is slow to answer keeps its calls."""

    def __init__(self, period_s: float = CALLER_CHECK_PERIOD_S) -> None:
        self.period_s = period_s
        self._calls: dict[str, set[asyncio.Task]] = {}
        self._watchers: dict[str, asyncio.Task] = {}

    @contextlib.contextmanager
    def watching(self, caller: GatewayRef | None):
        """Within this block, the current task is cancelled if `caller` dies."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield
            return
        calls = self._calls.setdefault(caller.actor_id, set())
        calls.add(task)
        if caller.actor_id not in self._watchers:
            self._watchers[caller.actor_id] = asyncio.create_task(self._watch(caller))
        try:
            yield
        finally:
            calls.discard(task)
            if not calls and self._calls.get(caller.actor_id) is calls:
                del self._calls[caller.actor_id]
                watcher = self._watchers.pop(caller.actor_id, None)
                if watcher is not None and watcher is not asyncio.current_task():
                    watcher.cancel()

    async def _watch(self, caller: GatewayRef) -> None:
        while caller.actor_id in self._calls:
            await asyncio.sleep(self.period_s)
            try:
                await asyncio.wait_for(caller.handle.__ray_ready__.remote(), timeout=max(self.period_s, 5.0))
            except ray.exceptions.ActorDiedError:
                calls = self._calls.pop(caller.actor_id, set())
                self._watchers.pop(caller.actor_id, None)
                log.warning("gateway %s died: aborting its %d requests", caller.actor_id, len(calls))
                for task in calls:
                    task.cancel()
                return
            except Exception:  # slow or briefly unreachable is not dead
                continue


@serve.deployment(name=ENGINE_DEPLOYMENT, health_check_period_s=10, health_check_timeout_s=60)
class EngineServer:
    """One replica = one EP group and its engine loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ray.util import get_current_placement_group

        cfg = AppConfig.model_validate(config)
        _set_log_level(cfg.log_level)
        engine_config = cfg.engine_config()
        tokenizer = load_tokenizer(engine_config.load)
        if cfg.ep_size == 1:
            from expertmesh.engine.executor import InProcessExecutor

            executor = InProcessExecutor(engine_config, progress=False)
        else:
            from expertmesh.cluster.executor import RayExecutor

            executor = RayExecutor(engine_config, placement_group=get_current_placement_group(), bundle_offset=1)
        self.engine = AsyncEngine(EngineCore(engine_config, executor, tokenizer))
        self.callers = CallerWatch()
        from expertmesh.gateway.dashboard_metrics import DashboardMetrics

        self.dashboard = DashboardMetrics()  # this replica's series in Ray's metrics (the dashboard)
        self.expert_report: dict | None = None
        self.info_dict = {"model_name": cfg.model_name(), "max_model_len": self.engine.core.max_model_len,
                          "vocab_size": self.engine.core.vocab_size}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, caller: GatewayRef | None = None, resume: Resume | None = None,
                       routing_key: str | None = None):
        """Streams lists of RequestOutput; a refused request yields {"error": message} once. The
        request is aborted when `caller` (the gateway replica) dies. `resume`: it ran on a replica
        that died and goes on from there (ServeEngineClient). `routing_key` is the router's
        (gateway/routing.py); the engine does not read it."""
        with self.callers.watching(caller):
            try:
                async for batch in self.engine.generate(request_id, prompt_token_ids, params, prompt, resume):
                    yield batch
            except ValueError as exc:
                yield {"error": str(exc)}

    async def info(self) -> dict[str, Any]:
        return self.info_dict

    async def stats(self) -> dict[str, float]:
        return self.engine.stats()

    async def heartbeat(self) -> EngineHeartbeat:
        return self.engine.heartbeat()

    async def expert_load(self) -> dict | list[list[float]] | None:
        from expertmesh.gateway.engine_client import expert_load_lists

        return await self.engine.call(expert_load_lists)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics of this replica (gateway/autoscaling.py)."""
        from expertmesh.gateway.autoscaling import METRICS

        stats = self.engine.stats()
        return {name: float(stats[name]) for name in METRICS}

    async def record_routing_stats(self) -> dict[str, float]:
        """The engine's counters, which Serve's controller polls every ROUTING_STATS_PERIOD_S and hands
        to every handle's router: the gateways' /metrics sum them over the replicas. The same poll
        exports them, and now and then the expert load, to Ray's dashboard (gateway/dashboard_metrics.py)."""
        stats = self.engine.stats()
        report = None
        if self.dashboard.expert_load_due():
            try:
                report = await asyncio.wait_for(self.expert_load(), EXPERT_LOAD_TIMEOUT_S)
            except Exception as exc:  # a busy or dying engine: the dashboard waits for the next read
                log.debug("expert load for the dashboard: %r", exc)
        if isinstance(report, dict):
            self.expert_report = report
        self.dashboard.observe(stats, report if isinstance(report, dict) else None)
        # the last expert load goes with the counters: the gateways' /metrics merge every replica's
        return {**stats, EXPERT_REPORT: self.expert_report} if self.expert_report is not None else stats

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class ServeEngineClient:
    """The serving layer's engine client over the model deployment's handle.

    A replica that dies under a call (Ray's actor errors, Serve's unavailable replica) does not end
    the request: it resumes on a healthy replica from its prompt and what it has streamed so far
    (`Resume`: the tokens and the text), up to `max_resumptions` times, each after a short pause
    while Serve replaces the replica; greedy decoding gives the tokens it would have given. Past
    that, or for n > 1 (whose completions stream together), the failure surfaces as
    `EngineDeadError`.

    Each call carries the prompt's routing key (`routing_key`, from its first full KV blocks of
    `block_size` tokens; None without `block_size` or for a prompt shorter than a block), which the
    deployment's router (gateway/request_router.py) reads to prefer the replica that likely holds
    the prefix, unless `request_routing` is power_of_two; a resumed request carries it too."""

    def __init__(self, handle, caller: GatewayRef | None = None, max_resumptions: int = 3,
                 retry_pause_s: float = 0.5, block_size: int | None = None) -> None:
        self.handle, self.caller = handle, caller
        self.max_resumptions, self.retry_pause_s = max_resumptions, retry_pause_s
        self.block_size = block_size
        self.resumptions = 0
        """Requests this gateway resumed on another replica (expertmesh_num_resumptions adds them)."""

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None):
        tokens: list[int] = []
        text, failures = "", 0
        key = routing_key(prompt_token_ids, self.block_size) if self.block_size else None
        while True:
            resume = Resume(tuple(tokens), text) if tokens or text else None
            gen = _as_own_request(self.handle.options(stream=True).generate.remote, request_id, prompt_token_ids,
                                  params, prompt, self.caller, resume, routing_key=key)
            finished = False
            try:
                async for item in gen:
                    if isinstance(item, dict):
                        raise ValueError(item["error"])
                    if params.n == 1:
                        for out in item:
                            tokens += out.outputs[0].token_ids_delta
                            text += out.outputs[0].text_delta
                    finished = item[-1].finished
                    yield item
                return
            except (ray.exceptions.RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
                failures += 1
                if params.n != 1 or failures > self.max_resumptions:
                    raise EngineDeadError(f"the engine replica failed: {type(exc).__name__}") from exc
                log.warning("request %s: its engine replica failed (%s); resuming after %d tokens", request_id,
                            type(exc).__name__, len(tokens))
                self.resumptions += 1
                await asyncio.sleep(self.retry_pause_s * failures)
            finally:
                if not finished:
                    gen.cancel()  # the replica's generator is cancelled, which aborts the request

    async def heartbeat(self) -> EngineHeartbeat:
        return await self.handle.heartbeat.remote()

    async def stats(self) -> dict[str, float]:
        """The engine counters summed over every live replica as each last reported them
        (`replica_stats`), with `num_engine_replicas`, and this gateway's resumptions on another
        replica. Before any replica has reported: one replica's counters, asked now."""
        replicas = self.replica_stats()
        stats = summed_stats(replicas) if any(r.stats for r in replicas) else await self.handle.stats.remote()
        return {**stats, "num_replica_resumptions": self.resumptions}

    def replica_stats(self) -> tuple[ReplicaStats, ...]:
        """Every live engine replica's counters, as the deployment's router last received them."""
        return replica_stats(self.handle.app_name, self.handle.deployment_name)

    async def expert_load(self) -> dict | list[list[float]] | None:
        """Every replica's expert load as the replicas last reported it (merged_expert_reports); before
        any report, one replica's, asked now."""
        merged = merged_expert_reports(self.replica_stats())
        return merged if merged is not None else await self.handle.expert_load.remote()

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


def _as_own_request(call, *args, **kwargs):
    """`call(*args, **kwargs)` (a handle call) as a Serve request of its own. A handle call made while serving an HTTP
    request inherits that request's internal id, and a request router that matches its choice to the
    request by that id (Serve's base `RequestRouter`, which `EngineRouter` keeps so that a choice
    serves the request it was made for) leaves all but one of several concurrent calls (the prompts
    of one batched completions request) unrouted forever. Serve has no public option for the id."""
    from ray.serve import context as serve_context
    from ray.serve._private.utils import generate_request_id

    def run():
        current = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=generate_request_id()))
        return call(*args, **kwargs)

    return contextvars.copy_context().run(run)


@serve.deployment(name=GATEWAY_DEPLOYMENT, graceful_shutdown_timeout_s=10)
@serve.ingress()
class Gateway:
    """FastAPI over HTTP (through Serve's proxy) and a gRPC server on `grpc_port`.

    Every replica serves gRPC: replicas on one node bind `grpc_host:grpc_port` together
    (SO_REUSEPORT), and the kernel deals each new connection to one of them; the node's port is
    open while one of them runs. Why not Serve's own gRPC proxy: DESIGN.md, "gRPC on every gateway
    replica". `/health` and the `expertmesh-replica` metadata of every gRPC call name the replica.
    """

    async def __init__(self, engine_handle, config: dict[str, Any]) -> None:
        from expertmesh.cluster.state import make_state_store
        from expertmesh.gateway.auth import Authenticator
        from expertmesh.gateway.responses import ResponsesServing, ResponsesSettings
        from expertmesh.gateway.serving import OpenAIServing, ServingSettings

        cfg = AppConfig.model_validate(config)
        _set_log_level(cfg.log_level)
        context = ray.get_runtime_context()
        client = ServeEngineClient(engine_handle, GatewayRef(context.get_actor_id(), context.current_actor),
                                   max_resumptions=cfg.max_resumptions,
                                   block_size=cfg.block_size)
        info = await client.info()  # waits for the model: the gateway is ready once it is loaded
        tokenizer = load_tokenizer(cfg.engine_config().load)
        aliases = tuple(a for a in (cfg.model, str(cfg.model_path())) if a)
        self.serving = OpenAIServing(client, tokenizer, ServingSettings(
            info["model_name"], info["max_model_len"], max_n=cfg.max_n, max_prompts=cfg.max_prompts,
            model_aliases=aliases, vocab_size=info["vocab_size"]))
        redis_url = cfg.resolved_redis_url()  # the key store, when configured: then a key is always required
        store = make_state_store(redis_url) if redis_url else None
        self.auth = Authenticator(cfg.resolved_api_keys(), store=store)
        self.serving.limiter = self.auth
        log.info("API keys: %s", await self.auth.status(wait_s=5.0))
        # The Responses API: stored responses in Redis with redis_url (every replica sees them), else
        # in this replica's memory; server-side tools through the tool runner, started (registry checked).
        self.tool_runner = await start_tool_runner(cfg, tokenizer, self.serving.metrics)
        self.responses = ResponsesServing(self.serving, self.tool_runner, store or make_state_store(None),
                                          ResponsesSettings.from_config(cfg))
        self.cfg, self.max_body_bytes = cfg, cfg.request_body_limit(info["max_model_len"])
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.grpc, self.grpc_health, self.grpc_bound = None, None, None
        if cfg.grpc_port:
            from expertmesh.gateway.grpc_server import GrpcHealth, GrpcOptions, build_grpc_server

            options = GrpcOptions(max_message_bytes=self.max_body_bytes,
                                  handshake_timeout_s=cfg.http_header_timeout_s,
                                  max_connection_idle_s=cfg.grpc_max_connection_idle_s,
                                  keepalive_time_s=cfg.grpc_keepalive_time_s,
                                  max_concurrent_streams=cfg.grpc_max_concurrent_streams,
                                  reuse_port=True)  # (`expertmesh serve` checks the port is free first)
            self.grpc_health = GrpcHealth()
            self.grpc = build_grpc_server(self.serving, self.auth, cfg.grpc_port, host=cfg.grpc_host,
                                          options=options, health=self.grpc_health, replica=self.replica,
                                          responses=self.responses)
            await self.grpc.start()
            self.grpc_bound = f"{cfg.grpc_host}:{cfg.grpc_port}"

    async def grpc_address(self) -> str | None:
        """host:port the gRPC server is bound to (None: gRPC is off), for the banner of `expertmesh serve`."""
        return self.grpc_bound

    async def replica_id(self) -> str:
        """This replica's Serve id: what `/health` and the gRPC `expertmesh-replica` metadata say."""
        return self.replica

    def __serve_build_asgi_app__(self):
        from expertmesh.gateway.http import build_http_app

        return build_http_app(self.serving, self.auth, max_body_bytes=self.max_body_bytes,
                              health_stall_timeout_s=self.cfg.health_stall_timeout_s,
                              body_timeout_s=self.cfg.http_header_timeout_s, replica=self.replica,
                              responses=self.responses)

    async def __del__(self) -> None:
        if getattr(self, "grpc", None) is not None:
            # NOT_SERVING first: a client watching health moves on while the calls in flight finish;
            # the closed socket leaves the node's port to the other replicas there.
            await self.grpc_health.enter_graceful_shutdown()
            await self.grpc.stop(grace=2)
        close = getattr(getattr(self, "tool_runner", None), "close", None)
        if close is not None:
            await close()


async def start_tool_runner(cfg: AppConfig, tokenizer, metrics):
    """The tool runner of the Responses API's server-side tools, started: its registry's MCP servers
    are connected and listed (a bad registry fails the replica's start, naming the server)."""
    from expertmesh.gateway.tools.runner import ToolRunner

    runner = ToolRunner.from_settings(cfg, tokenizer, metrics)
    await runner.start()
    return runner


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application for `args` (an AppConfig's fields): `serve run
    expertmesh.gateway.serve_app:build_app model=/path ep_size=2`, or `import_path` in a config file."""
    cfg = AppConfig.model_validate(dict(args or {}))
    # The replicas' own settings, without the deployments' (replica counts, autoscaling, drain): a
    # change of those alone then reaches Serve as a lightweight update that keeps the replicas running.
    config = cfg.model_dump(exclude=DEPLOYMENT_SETTINGS)
    autoscaling = cfg.autoscaling()
    engine_options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests,
                                      "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
                                      **({"num_replicas": cfg.engine_replicas} if autoscaling is None
                                         else {"autoscaling_config": autoscaling}),
                                      "request_router_config": engine_router_config(cfg),
                                      **_engine_replica_resources(cfg, _uses_gpus(cfg.device))}
    engine = EngineServer.options(**engine_options).bind(config)
    gateway = Gateway.options(num_replicas=cfg.gateway_replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                              ray_actor_options={"num_cpus": GATEWAY_CPUS},
                              graceful_shutdown_timeout_s=cfg.drain_timeout_s)
    return gateway.bind(engine, config)


DEPLOYMENT_SETTINGS = frozenset({"engine_replicas", "gateway_replicas", "min_replicas", "max_replicas",
                                 "autoscale_target_seqs", "upscale_delay_s", "downscale_delay_s",
                                 "autoscale_look_back_s", "drain_timeout_s", "request_routing"})
"""AppConfig fields that shape the deployments, not what a replica does."""

def engine_router_config(cfg: AppConfig) -> RequestRouterConfig:
    """The engine deployment's request router (gateway/request_router.py) under `request_routing`,
    and how often Serve collects each replica's counters for it."""
    return RequestRouterConfig(
        request_router_class="expertmesh.gateway.request_router:EngineRouter",
        request_router_kwargs={"policy": cfg.request_routing,
                               "busy_bound": busy_bound(cfg.max_ongoing_requests, cfg.max_num_seqs)},
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)


EXPERT_LOAD_TIMEOUT_S = 5.0
"""How long the dashboard's read of a replica's expert load may take before it is skipped."""

GATEWAY_CPUS = 0.5
"""CPUs of a gateway replica, and of an EP group's engine replica (which only drives its ranks)."""


def _engine_replica_resources(cfg: AppConfig, gpus: bool) -> dict[str, Any]:
    """Deployment options of an engine replica: the in-process engine's CPUs (and GPU) for ep_size 1; for
    more, the replica's bundle and one bundle per rank, gang-scheduled as one placement group."""
    rank = rank_bundles(1, "cuda" if gpus else "cpu", cfg.cpus_per_rank)[0]
    if cfg.ep_size == 1:
        return {"ray_actor_options": {"num_cpus": rank["CPU"], "num_gpus": rank.get("GPU", 0)}}
    return {"ray_actor_options": {"num_cpus": GATEWAY_CPUS},
            "placement_group_bundles": [{"CPU": GATEWAY_CPUS}] + [dict(rank) for _ in range(cfg.ep_size)],
            "placement_group_strategy": "PACK"}


def app_bundles(cfg: AppConfig) -> list[dict[str, float]]:
    """Every bundle of resources the app reserves (its replicas'), to check that the cluster can hold it."""
    options = _engine_replica_resources(cfg, _uses_gpus(cfg.device))
    if "placement_group_bundles" in options:
        engine = options["placement_group_bundles"]
    else:
        actor = options["ray_actor_options"]
        engine = [{"CPU": actor["num_cpus"], **({"GPU": actor["num_gpus"]} if actor["num_gpus"] else {})}]
    autoscaling = cfg.autoscaling()
    replicas = cfg.engine_replicas if autoscaling is None else autoscaling["initial_replicas"]
    return engine * replicas + [{"CPU": GATEWAY_CPUS}] * cfg.gateway_replicas


def _uses_gpus(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def _set_log_level(level: str) -> None:
    """A replica's expertmesh and Ray Serve loggers at the configured level (log_level)."""
    for name in ("expertmesh", "ray.serve"):
        logging.getLogger(name).setLevel(level)
