"""`AppConfig`: every setting of a served model, in one place.

The same object is built from `expertmesh serve` flags, from the `args:` of a Ray Serve config
file (`import_path: expertmesh.gateway.serve_app:build_app`), and from the Helm chart's
`serveConfigV2`, then handed down as an `EngineConfig` and the gateway's settings. Unknown keys
are an error that names them, so a typo in a config file never passes silently.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertmesh.engine.config import (
    CacheConfig,
    EngineConfig,
    LimitsConfig,
    ModelLoadConfig,
    ParallelConfig,
    SchedulerConfig,
)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    """Checkpoint directory (HF format); None serves the embedded default model."""
    served_model_name: str | None = None
    """The name clients pass as `model`; defaults to the checkpoint directory's name."""
    ep_size: int = Field(1, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    expert_impl: str = "auto"
    load_format: Literal["safetensors", "dummy"] = "safetensors"
    seed: int = 0
    cpus_per_rank: int = Field(1, ge=1)
    step_channel: Literal["compiled", "ray_call"] = "compiled"
    max_n: int = Field(16, ge=1)
    """Largest `n` a request may ask for."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted API keys (raw); empty leaves the API open."""
    redis_url: str | None = None
    """Shared state (API keys, rate limits, registry) in Redis; None keeps it in-process."""
    api_keys_env: str | None = Field(None, min_length=1)
    """Name of an environment variable holding more accepted keys, comma-separated: the Helm chart
    fills it from a Kubernetes Secret, so no raw key is written into the Serve config."""
    redis_password_env: str | None = Field(None, min_length=1)
    """Name of an environment variable holding the password of `redis_url` (from a Secret, as above)."""
    grpc_port: int | None = Field(50051, ge=0, le=65535)
    """gRPC port of each gateway replica; None or 0 turns gRPC off."""
    engine_replicas: int = Field(1, ge=1)
    """EP groups (model deployment replicas); each holds ep_size ranks."""
    gateway_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(1024, ge=1)
    """Requests one replica holds at once (the engine batches them; Serve's default of 5 would starve it)."""
    max_stop_strings: int = Field(16, ge=1)
    """Most stop strings per request (OpenAI allows 4); more is a 400."""
    max_stop_string_chars: int = Field(256, ge=1)
    """Longest stop string in characters; longer is a 400."""
    grammar_compile_timeout_s: float = Field(5.0, gt=0)
    """Longest a response_format / guided_* / tool_choice constraint may take to compile (in grammar
    compiler processes, off the engine loop); past it the compile is killed and the request gets a 400."""
    grammar_compile_workers: int = Field(1, ge=1)
    """Grammar compiler processes per model replica."""
    grammar_max_bytes: int = Field(131072, ge=1)
    """Largest JSON schema (or the tools' parameter schemas together), EBNF grammar or list of choices, in bytes."""
    grammar_max_enum_values: int = Field(1000, ge=1)
    """Most enum values (and consts) in a JSON schema, or choices in guided_choice."""
    grammar_max_regex_chars: int = Field(4096, ge=1)
    """Longest guided_regex in characters."""

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"model directory {value!r} does not exist")
        return value

    def model_path(self) -> Path:
        if self.model is not None:
            return Path(self.model)
        from expertmesh.model.default import default_model_path

        return default_model_path()

    def model_name(self) -> str:
        return self.served_model_name or self.model_path().name

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

    def engine_config(self, ray_address: str | None = None) -> EngineConfig:
        return EngineConfig(
            load=ModelLoadConfig(str(self.model_path()), dtype=self.dtype, device=self.device,
                                 max_model_len=self.max_model_len, expert_impl=self.expert_impl,
                                 load_format=self.load_format, seed=self.seed),
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                              kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens),
            parallel=ParallelConfig(ep_size=self.ep_size, ray_address=ray_address, cpus_per_rank=self.cpus_per_rank,
                                    step_channel=self.step_channel),
            limits=LimitsConfig(max_stop_strings=self.max_stop_strings,
                                max_stop_string_chars=self.max_stop_string_chars,
                                grammar_compile_timeout_s=self.grammar_compile_timeout_s,
                                grammar_compile_workers=self.grammar_compile_workers,
                                grammar_max_bytes=self.grammar_max_bytes,
                                grammar_max_enum_values=self.grammar_max_enum_values,
                                grammar_max_regex_chars=self.grammar_max_regex_chars),
        )
