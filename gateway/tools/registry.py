"""The tool registry: the MCP servers and webhooks an operator lets /v1/responses call.

A YAML file (`--tool-registry FILE`, AppConfig's `tool_registry`, the Helm chart's `toolRegistry`):

    mcp_servers:
      - server_label: calc                      # the label requests name ({"type": "mcp", "server_label": "calc"})
        url: http://calc.tools.svc:9001/mcp     # streamable HTTP ...
        headers_env: {Authorization: CALC_AUTH} # ... a header's value from an environment variable (a Secret)
        allowed_tools: [add, multiply]          # only these of the server's tools (default: all it lists)
        timeout_s: 10                           # per call (default: tool_timeout_s)
        max_concurrency: 4                      # calls in flight per gateway replica (default: tool_max_concurrency)
      - server_label: files
        command: [python, -m, files_server]     # stdio: spawned once per gateway process and kept
        args: [--root, /data]
        env: {LOG_LEVEL: warning}
        env_from: {FILES_TOKEN: FILES_TOKEN}    # the child's variable from the gateway's (a Secret)
        cwd: /srv
    webhooks:
      - name: get_weather                       # the tool name the model sees; requests select it by name
        description: Current weather of a city.
        parameters: {type: object, properties: {city: {type: string}}, required: [city]}
        url: https://hooks.example.com/weather
        secret_env: WEATHER_HOOK_SECRET         # HMAC-SHA256 signing secret (webhooks.py)

Every value is checked here: unknown keys are refused with the closest known one (as AppConfig
does), bounds hold (no negative timeout, no concurrency of millions), URLs are http(s), labels and
names are short identifiers, duplicates are refused, and every environment variable named must be
set when the registry is loaded. What needs the servers themselves (reachable, listing tools,
tool names unique across servers and webhooks) is checked by `ToolRunner.start`.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from expertmesh.engine.config_fields import unknown_key_error

LABEL_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""server_label and webhook names: what OpenAI allows in a function name."""
ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HEADER_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"
"""An HTTP header name (RFC 9110 token)."""
MAX_TIMEOUT_S = 3600.0
MAX_CONCURRENCY = 1024
MAX_ENTRIES = 256
MAX_REGISTRY_BYTES = 1 << 20
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
                               "trailer", "keep-alive", "proxy-connection", "mcp-session-id",
                               "mcp-protocol-version", "x-expertmesh-signature", "x-expertmesh-timestamp"})
"""Headers the transport sets itself: a registry or a request may not set them."""

Label = Annotated[str, Field(pattern=LABEL_PATTERN)]
EnvName = Annotated[str, Field(pattern=ENV_PATTERN, max_length=256)]
HeaderName = Annotated[str, Field(pattern=HEADER_PATTERN)]
HeaderValue = Annotated[str, Field(max_length=8192, pattern=r"^[^\r\n\x00]*$")]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]
Concurrency = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]
Description = Annotated[str, Field(max_length=8192)]


class ToolRegistryError(ValueError):
    """The registry file is bad, names an unset environment variable, or a registered server cannot
    be reached or lists no tools: a start-up error whose message names the entry and why."""


def http_url(value: str, what: str = "url") -> str:
    """`value` if it is an http(s) URL with a host, else ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host, not {value!r}")
    return value


def check_headers(headers: Mapping[str, Any]) -> None:
    """ValueError for a header the transport must own (Host, Content-Length, the MCP session's ...)."""
    for name in headers:
        if str(name).lower() in FORBIDDEN_HEADERS:
            raise ValueError(f"the header {name!r} cannot be set (the transport sets it)")


class _Entry(BaseModel):
    """Refuses unknown keys with the closest known one; types are strict (no "30" for 30)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise unknown_key_error(key, cls.model_fields)
        return data


def _from_env(owner: str, field: str, names: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """{key: environ[variable]} for `names` {key: variable}; an unset variable is a ToolRegistryError."""
    out = {}
    for key, var in names.items():
        value = environ.get(var)
        if value is None or value == "":
            raise ToolRegistryError(f"{owner}: {field}[{key!r}] names the environment variable {var}, which is unset "
                                    "(a missing Secret?)")
        out[key] = value
    return out


class McpServerEntry(_Entry):
    """One MCP server: streamable HTTP (`url`) or a stdio command (`command`)."""

    server_label: Label
    description: Description = ""
    url: str | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    headers_env: dict[HeaderName, EnvName] = Field(default_factory=dict)
    command: list[Annotated[str, Field(min_length=1)]] | str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[EnvName, str] = Field(default_factory=dict)
    env_from: dict[EnvName, EnvName] = Field(default_factory=dict)
    cwd: str | None = None
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(default=None,
                                                                                           min_length=1)
    timeout_s: Timeout | None = None
    max_concurrency: Concurrency | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("command")
    @classmethod
    def _argv(cls, value: list[str] | str | None) -> list[str] | None:
        if isinstance(value, str):
            value = shlex.split(value)
        if value is not None and not value:
            raise ValueError("command must name a program")
        return value

    @model_validator(mode="after")
    def _one_transport(self):
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of url (streamable HTTP) and command (stdio)")
        if self.url is not None and (self.args or self.env or self.env_from or self.cwd is not None):
            raise ValueError("args, env, env_from and cwd are for a stdio server (command), not a url")
        if self.command is not None and (self.headers or self.headers_env):
            raise ValueError("headers and headers_env are for a url, not a stdio server (command)")
        check_headers({**self.headers, **self.headers_env})
        return self

    @property
    def transport(self) -> str:
        return "http" if self.url is not None else "stdio"

    @property
    def argv(self) -> list[str]:
        assert isinstance(self.command, list)
        return [*self.command, *self.args]

    def resolved_headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {**self.headers, **_from_env(f"mcp server {self.server_label!r}", "headers_env", self.headers_env,
                                            environ)}

    def resolved_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The stdio child's extra environment (over the SDK's safe defaults: HOME, PATH, ...)."""
        return {**self.env, **_from_env(f"mcp server {self.server_label!r}", "env_from", self.env_from, environ)}


OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class WebhookEntry(_Entry):
    """One webhook: a tool the model calls by `name`, POSTed to `url` (webhooks.py)."""

    name: Label
    description: Description = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(OBJECT_SCHEMA))
    url: str
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    headers_env: dict[HeaderName, EnvName] = Field(default_factory=dict)
    secret_env: EnvName | None = None
    timeout_s: Timeout | None = None
    max_concurrency: Concurrency | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        return http_url(value)

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        if value.get("type") != "object":
            raise ValueError('parameters must be a JSON schema of an object ({"type": "object", ...})')
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"parameters is not a valid JSON schema: {exc.message}") from None
        return value

    @model_validator(mode="after")
    def _headers(self):
        check_headers({**self.headers, **self.headers_env})
        return self

    def resolved_headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {**self.headers, **_from_env(f"webhook {self.name!r}", "headers_env", self.headers_env, environ)}

    def resolved_secret(self, environ: Mapping[str, str]) -> bytes | None:
        if self.secret_env is None:
            return None
        secret = _from_env(f"webhook {self.name!r}", "secret_env", {"secret": self.secret_env}, environ)["secret"]
        return secret.encode()


class ToolRegistry(_Entry):
    """The whole file."""

    mcp_servers: list[McpServerEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)
    webhooks: list[WebhookEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)

    @model_validator(mode="after")
    def _unique(self):
        labels: set[str] = set()
        for server in self.mcp_servers:
            if server.server_label in labels:
                raise ValueError(f"two mcp_servers have the server_label {server.server_label!r}")
            labels.add(server.server_label)
        names: set[str] = set()
        for hook in self.webhooks:
            if hook.name in names:
                raise ValueError(f"two webhooks have the name {hook.name!r}")
            if hook.name in labels:  # one namespace: both label the `server` of calls and metrics
                raise ValueError(f"the webhook {hook.name!r} has the name of an mcp_servers server_label")
            names.add(hook.name)
        return self

    def check_env(self, environ: Mapping[str, str]) -> None:
        """ToolRegistryError naming the first environment variable named here that is unset."""
        for server in self.mcp_servers:
            server.resolved_headers(environ)
            server.resolved_env(environ)
        for hook in self.webhooks:
            hook.resolved_headers(environ)
            hook.resolved_secret(environ)


def _readable(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def parse_registry(data: Any, source: str = "tool registry") -> ToolRegistry:
    """The registry from parsed YAML (None: empty); ToolRegistryError naming what is wrong, and where."""
    if data is None:
        return ToolRegistry()
    if not isinstance(data, dict):
        raise ToolRegistryError(f"{source}: expected a mapping with mcp_servers and webhooks, got "
                                f"{type(data).__name__}")
    try:
        return ToolRegistry.model_validate(data)
    except ValidationError as exc:
        raise ToolRegistryError(f"{source}: {_readable(exc)}") from None


def load_registry(path: str | Path, environ: Mapping[str, str] | None = None) -> ToolRegistry:
    """Read, check and return the registry at `path`; every environment variable it names must be set
    in `environ` (default: this process's environment)."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_REGISTRY_BYTES + 1)
    except OSError as exc:
        raise ToolRegistryError(f"tool registry {path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_REGISTRY_BYTES:
        raise ToolRegistryError(f"tool registry {path}: larger than {MAX_REGISTRY_BYTES} bytes")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ToolRegistryError(f"tool registry {path}: not valid YAML ({exc})") from None
    registry = parse_registry(data, f"tool registry {path}")
    registry.check_env(os.environ if environ is None else environ)
    return registry
