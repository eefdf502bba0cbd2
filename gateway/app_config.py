"""`AppConfig`: every setting of a served model, in one place.

The same object is built from `expertmesh serve` flags, from the `args:` of a Ray Serve config
file (`import_path: expertmesh.gateway.serve_app:build_app`), and from the Helm chart's
`serveConfigV2`, then handed down as an `EngineConfig` and the gateway's settings. Unknown keys
are an error that names them, so a typo in a config file never passes silently.

Its fields are not written here: they are the engine's settings (engine/config.py, all but
`ray_address`: a served app already runs inside Ray) and the serving settings of `ServingConfig`
below, derived into a pydantic model by `app_config_model` (engine/config_fields.py says how).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from expertmesh.engine.config import EngineConfig, engine_settings
from expertmesh.engine.config_fields import Setting, setting, settings_of, unknown_key_error
from expertmesh.model.hub import is_repo_id

BODY_BYTES_PER_TOKEN = 32
"""A generous bound on the request-body bytes one prompt token takes: English text is about 4
bytes a token, CJK about 3 bytes a character, JSON's `\\uXXXX` escapes 6 bytes a character, and a
prompt given as token ids at most 8 bytes an id (`151935, `)."""
BODY_OVERHEAD_BYTES = 1 << 20
"""Room beside the prompt: message framing, tools and their schemas, response formats."""


def default_max_request_body_bytes(max_model_len: int) -> int:
    """The request-body limit sized for the longest prompt the model takes:
    `BODY_OVERHEAD_BYTES + BODY_BYTES_PER_TOKEN * max_model_len` (1 MiB + 32 bytes a token: about
    9 MiB for a 262,144-token Qwen3-235B, 2.3 MiB for a 40,960-token Qwen3-30B)."""
    return BODY_OVERHEAD_BYTES + BODY_BYTES_PER_TOKEN * max_model_len

REQUEST_ROUTING_POLICIES = ("prefix_affinity", "power_of_two")
"""Values of `request_routing` (gateway/request_router.py implements both)."""


@dataclass
class ServingConfig:
    """The settings of a served model beyond the engine's: names, keys, ports, replicas."""

    served_model_name: str | None = None
    """The name clients pass as `model`; default: the repo id, or the checkpoint directory's name."""
    max_n: int = setting(16, ge=1)
    """Largest `n` (completions per request) a request may ask for."""
    max_prompts: int = setting(256, ge=1)
    """Most prompts one completions request may batch: each is its own engine request, `n` sequences
    each, so without a cap one request of a few megabytes could queue millions of sequences."""
    api_keys: list[str] = setting(default_factory=list, flag="--api-key")
    """Accepted API keys (raw). With none here, in api_keys_env or redis_url, the API is open."""
    redis_url: str | None = None
    """Shared state (API keys, rate limits, replica registry) in Redis, redis://host:port/db. A key
    source: with it every request needs a key, even while Redis holds none (then all are refused).
    Default: no shared state (in-process)."""
    api_keys_env: str | None = setting(None, min_length=1)
    """Name of an environment variable holding more accepted keys, comma-separated: the Helm chart fills
    it from a Kubernetes Secret, so no raw key is written into the Serve config."""
    redis_password_env: str | None = setting(None, min_length=1)
    """Name of an environment variable holding the password of redis_url (from a Secret, as above)."""
    grpc_port: int | None = setting(50051, ge=0, le=65535)
    """gRPC port of each gateway replica; 0 (or None) turns gRPC off."""
    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 for every interface); `expertmesh serve` binds --host's
    address unless this is given."""
    engine_replicas: int = setting(1, ge=1)
    """EP groups (model deployment replicas) to run; each holds ep_size ranks."""
    min_replicas: int | None = setting(None, ge=1)
    """Autoscaling: the fewest engine replicas (needs max_replicas; default 1)."""
    max_replicas: int | None = setting(None, ge=1)
    """Autoscaling: the most engine replicas. Setting it turns autoscaling on: Ray Serve scales the engine
    deployment between min_replicas and max_replicas from the engines' own load (waiting requests, running
    sequences, KV-cache use), starting from engine_replicas; unset, engine_replicas is fixed."""
    autoscale_target_seqs: int | None = setting(None, ge=1)
    """Autoscaling: sequences (running plus waiting) per engine replica the policy aims at; more, or any
    request waiting for room, adds a replica. Default: half of max_num_seqs."""
    upscale_delay_s: float = setting(30.0, ge=0)
    """Autoscaling: how long the load must call for one more engine replica before it is started."""
    downscale_delay_s: float = setting(300.0, ge=0)
    """Autoscaling: how long the load must allow one engine replica fewer before one is drained and released."""
    autoscale_look_back_s: float = setting(30.0, gt=10)
    """Autoscaling: the window each replica's load is averaged over (replicas report every 10 s)."""
    drain_timeout_s: float = setting(60.0, gt=0)
    """How long an engine replica being removed (scaled down, redeployed) keeps serving the requests it
    holds after it stops taking new ones; those still running then end with an error."""
    gateway_replicas: int = setting(1, ge=1, le=1024)
    """Gateway replicas (HTTP app and gRPC server; each serves gRPC, sharing the port on its node)."""
    max_ongoing_requests: int = setting(1024, ge=1)
    """Requests one replica holds at once (the engine batches them; Serve's default of 5 would starve it)."""
    request_routing: str = setting("prefix_affinity", choices=REQUEST_ROUTING_POLICIES)
    """How the gateway picks an engine replica: prefix_affinity sends a prompt to the replica its first
    KV blocks hash to (rendezvous hashing), where its prefix is likely cached, unless that replica holds
    min(max_ongoing_requests, max_num_seqs) requests; then, and for prompts shorter than one block, the
    less loaded of two random replicas, which is all power_of_two does."""
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    """Python logging level of expertmesh's and Ray Serve's logs."""
    max_request_body_bytes: int | None = setting(None, ge=1024)
    """Largest HTTP request body and gRPC request message accepted (413 / RESOURCE_EXHAUSTED beyond);
    None sizes it for the model: 1 MiB + 32 bytes per token of max_model_len."""
    health_stall_timeout_s: float = setting(30.0, gt=0)
    """`/health` answers 503 when the engine has been busy this long without finishing a step."""
    http_keep_alive_timeout_s: int = setting(90, ge=1)
    """Seconds an idle HTTP keep-alive connection stays open (Ray Serve's proxy; above the 60 s idle
    timeout of common load balancers, so they close first)."""
    http_header_timeout_s: float = setting(30.0, gt=0)
    """Seconds a client has to send a request's headers (counted from the connection, or from the
    first byte of its next request); then the proxy closes the socket. gRPC: the HTTP/2 handshake."""
    http_request_timeout_s: float | None = setting(None, gt=0)
    """End-to-end limit of one HTTP request (Ray Serve's request_timeout_s; 408 beyond); None: no
    limit, as a long generation may legitimately take minutes."""
    grpc_max_connection_idle_s: float = setting(300.0, gt=0)
    """A gRPC connection with no call for this long is closed (GOAWAY)."""
    grpc_keepalive_time_s: float = setting(60.0, gt=0)
    """The gRPC server pings an idle connection this often; one that does not answer within 20 s is closed."""
    grpc_max_concurrent_streams: int = setting(1024, ge=1)
    """Most gRPC calls one connection may hold open at once."""
    tool_registry: str | None = setting(None, path=True)
    """A YAML file of the server-side tools /v1/responses may call: MCP servers (streamable HTTP URL or a
    stdio command) and webhooks (README, "Server-side tools"). Checked at start-up: a server that cannot be
    reached or lists no tools stops the start. Default: none."""
    allow_request_mcp_urls: bool = False
    """Let a request name an MCP server by its own server_url (not only the registry's labels); even then
    only http(s) URLs whose every address is public are called (no loopback, private, link-local or
    metadata address, checked after DNS resolution and on every request, redirects included)."""
    tool_timeout_s: float = setting(30.0, gt=0)
    """Default time limit of one server-side tool call, waiting for a free slot of the server included (a
    registry entry's timeout_s overrides it); past it the call ends as an error the model sees."""
    tool_response_max_bytes: int = setting(1 << 20, ge=1024)
    """Largest response of one tool call (bytes of an HTTP response body, or of a stdio server's result);
    a larger one is cut off as it arrives and ends the call as an error."""
    tool_output_max_tokens: int = setting(2048, ge=16)
    """A tool's output is truncated to this many tokens of the model's tokenizer (with a marker) before the
    model sees it."""
    tool_max_concurrency: int = setting(8, ge=1)
    """Default most calls in flight at once to one tool server or webhook, per gateway replica (a registry
    entry's max_concurrency overrides it); more wait for a slot within their timeout."""
    max_tool_rounds: int = setting(8, ge=1, le=128)
    """Most rounds of server-side tool calls in one /v1/responses request; a loop that would go on ends with
    status "incomplete" (reason max_tool_rounds)."""
    response_store_ttl_s: float = setting(30 * 86400.0, gt=0)
    """How long a stored /v1/responses response (store: true) can be read or continued with
    previous_response_id, in seconds (default 30 days)."""


NOT_SERVED = frozenset({"ray_address"})
"""Engine settings that are no AppConfig field: a served app runs inside the Ray it was deployed to."""


def app_settings() -> tuple[Setting, ...]:
    """AppConfig's fields, in order: the engine's settings, then the serving settings."""
    return tuple(s for s in engine_settings() if s.name not in NOT_SERVED) + settings_of(ServingConfig)


class _AppConfigBase(BaseModel):
    """Behaviour of AppConfig; its fields come from `app_settings()`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys_and_home_paths(cls, data: Any) -> Any:
        """Unknown keys are refused with the closest known one; `~` in a path is the home folder."""
        if not isinstance(data, dict):
            return data
        settings = {s.name: s for s in app_settings()}
        for key in data:
            if key not in settings:
                raise unknown_key_error(key, settings)
        return {k: os.path.expanduser(v) if settings[k].path and isinstance(v, str) and v.startswith("~") else v
                for k, v in data.items()}

    @field_validator("model", "tokenizer", check_fields=False)
    @classmethod
    def _directory_or_repo_id(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir() and not is_repo_id(value):
            raise ValueError(f"model directory {value!r} does not exist (and it is not a Hugging Face repo id, "
                             "org/name)")
        return value

    @model_validator(mode="after")
    def _replica_bounds(self):
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling between the two)")
        if self.max_replicas is not None and (self.min_replicas or 1) > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be at most max_replicas ({self.max_replicas})")
        return self

    def autoscaling(self) -> dict[str, Any] | None:
        """The engine deployment's Ray Serve `autoscaling_config`, or None for a fixed engine_replicas."""
        if self.max_replicas is None:
            return None
        from expertmesh.gateway.autoscaling import autoscaling_config, default_target_seqs

        low = self.min_replicas or 1
        return autoscaling_config(
            min_replicas=low, max_replicas=self.max_replicas,
            initial_replicas=min(max(self.engine_replicas, low), self.max_replicas),
            target_seqs=self.autoscale_target_seqs or default_target_seqs(self.max_num_seqs),
            upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s,
            look_back_period_s=self.autoscale_look_back_s)

    @field_validator("grpc_port", check_fields=False)
    @classmethod
    def _zero_port_is_off(cls, value: int | None) -> int | None:
        return value or None

    def model_path(self) -> Path:
        if self.model is not None:
            return Path(self.model)
        from expertmesh.model.default import default_model_path

        return default_model_path()

    def model_name(self) -> str:
        """served_model_name, else a repo id as given (vLLM's name), else the checkpoint directory's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is not None and not Path(self.model).is_dir():
            return self.model
        return self.model_path().name

    def resolved_api_keys(self) -> list[str]:
        """`api_keys` plus those in the variable `api_keys_env`. A named variable that is unset or
        holds no key is an error: a missing Secret must not leave the API open."""
        keys = list(self.api_keys)
        if self.api_keys_env:
            extra = [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
            if not extra:
                raise ValueError(f"api_keys_env: the environment variable {self.api_keys_env} is unset or "
                                 "holds no key (comma-separated keys expected)")
            keys += extra
        return keys

    def resolved_redis_url(self) -> str | None:
        """`redis_url` with the password from the variable `redis_password_env` (which must be set)."""
        if not self.redis_url or not self.redis_password_env:
            return self.redis_url
        password = os.environ.get(self.redis_password_env)
        if not password:
            raise ValueError(f"redis_password_env: the environment variable {self.redis_password_env} is unset")
        parts = urlsplit(self.redis_url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"redis_password_env needs a redis:// or rediss:// redis_url, not {parts.scheme}://")
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]  # as written (already URL-quoted)
        return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))

    def request_body_limit(self, max_model_len: int) -> int:
        """`max_request_body_bytes`, or the limit sized for `max_model_len` (the model's, once loaded)."""
        return self.max_request_body_bytes or default_max_request_body_bytes(max_model_len)

    def engine_config(self, ray_address: str | None = None) -> EngineConfig:
        values = {s.name: getattr(self, s.name) for s in engine_settings() if s.name not in NOT_SERVED}
        return EngineConfig.from_kwargs(**{**values, "model": str(self.model_path()), "ray_address": ray_address})


def app_config_model(name: str, base: type[BaseModel], settings: tuple[Setting, ...]) -> type[BaseModel]:
    """A pydantic model with one field per setting: its type (choices as a Literal), default, bounds,
    and its docstring as the field's description."""
    fields: dict[str, Any] = {}
    for s in settings:
        annotation: Any = Literal[s.choices] if s.choices else s.type
        if s.optional:
            annotation = annotation | None
        bounds = {"ge": s.ge, "gt": s.gt, "le": s.le, "min_length": s.min_length}
        default = {"default_factory": list} if isinstance(s.default, list) else {"default": s.default}
        fields[s.name] = (annotation, Field(description=s.help, **default,
                                            **{k: v for k, v in bounds.items() if v is not None}))
    return create_model(name, __base__=base, __module__=__name__, **fields)


AppConfig = app_config_model("AppConfig", _AppConfigBase, app_settings())
AppConfig.__doc__ = """Every setting of a served model: the engine's and `ServingConfig`'s fields (`app_settings()`)."""
