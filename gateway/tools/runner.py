"""`ToolRunner`: the server-side tools one gateway replica may call, and the calls themselves.

    runner = ToolRunner.from_settings(cfg, tokenizer, metrics)   # the registry read and checked
    await runner.start()          # every registered MCP server reached and its tools listed (cached)
    async with runner.request_scope() as scope:                  # one /v1/responses request
        tools = await scope.mcp_tools("calc", allowed_tools=["add"], param="tools[0]")
        tools += scope.webhook_tools(["get_weather"], param="tools[1]")
        result = await scope.call(tools[0], '{"a": 1, "b": 2}')  # ToolResult(output="3", error=None, ...)
    await runner.close()

`mcp_tools` and `webhook_tools` turn a request's tool specs into `ServerTool`s, refusing with
`ToolRequestError` (a 400) what the server cannot serve: an unknown label or webhook, an
allowed_tools name the server lacks, a request-supplied URL when `allow_request_mcp_urls` is off,
or one that is not http(s) to public addresses (netguard.py), or cannot be listed. `call` never
raises for a tool's failure: bad JSON arguments, a timeout (waiting for the server's concurrency
slot included), a response over `tool_response_max_bytes`, a server error or isError result, a
refused request, garbage: each is a `ToolResult` with `error` set, counted in
`expertmesh_tool_calls_total{server, outcome}`. Only cancellation (the client went away) propagates.

**Request scope.** Servers a request names by `server_url` live as long as the request:
`request_scope()` gives a `ToolScope` with the same `mcp_tools`, `webhook_tools` and `call`; the
request-supplied servers it lists share one guarded connection pool, closed when the scope exits
(a later call of one of their tools is an error result). The runner's own `mcp_tools(server_url=...)`
and `call` work outside a scope too, with a fresh pool per listing and per call. Registered servers
ignore scopes: HTTP ones open a session per call over a pool kept for the runner's life, stdio
ones are spawned once by `start` and kept (mcp_client.py).

Metrics: a registered server's calls are labelled by its label (or the webhook's name); every
request-supplied server shares the label "request", so clients cannot grow the series without end.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from mcp import StdioServerParameters

from expertmesh.gateway.tools.mcp_client import (
    HttpMcpServer,
    StdioMcpServer,
    ToolFailure,
    check_tool_names,
    result_text,
)
from expertmesh.gateway.tools.netguard import GuardedTransport, NetGuard, NetguardRefused, connection_pool
from expertmesh.gateway.tools.registry import (
    HEADER_PATTERN,
    LABEL_PATTERN,
    McpServerEntry,
    ToolRegistry,
    ToolRegistryError,
    check_headers,
    load_registry,
)
from expertmesh.gateway.tools.types import ServerTool, ToolRequestError, ToolResult
from expertmesh.gateway.tools.webhooks import Webhook

logger = logging.getLogger(__name__)

REQUEST_SERVER_LABEL = "request"
"""The metrics `server` label of every request-supplied MCP server."""
MAX_REQUEST_HEADERS = 32
MAX_REQUEST_HEADER_BYTES = 16384

__all__ = ["ServerTool", "ToolRegistryError", "ToolRequestError", "ToolResult", "ToolRunner", "ToolScope"]


@dataclass
class _Target:
    """Where calls of a server go, and their limits."""

    label: str
    timeout_s: float
    slots: asyncio.Semaphore
    mcp: HttpMcpServer | StdioMcpServer | None = None
    webhook: Webhook | None = None
    tools: dict[str, ServerTool] = field(default_factory=dict)


class _RequestServer:
    """A server a request named by URL: vetted, listed live, called through the netguard. With a scope
    it shares that scope's pool; without one, each listing and call gets its own."""

    def __init__(self, label: str, url: str, headers: dict[str, str], guard: NetGuard, max_bytes: int,
                 timeout_s: float, max_concurrency: int, shared: bool) -> None:
        self.label, self.url, self.headers, self.guard = label, url, headers, guard
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.slots = asyncio.Semaphore(max_concurrency)
        self._shared = HttpMcpServer(url, headers, GuardedTransport(guard), max_bytes) if shared else None
        self.closed = False

    @asynccontextmanager
    async def server(self):
        if self.closed:
            raise ToolFailure("error", "the request that listed this MCP server has ended")
        if self._shared is not None:
            yield self._shared
            return
        own = HttpMcpServer(self.url, self.headers, GuardedTransport(self.guard), self.max_bytes)
        try:
            yield own
        finally:
            await own.aclose()

    async def aclose(self) -> None:
        self.closed = True
        if self._shared is not None:
            await self._shared.aclose()


def _check_request_headers(headers: Mapping[str, Any], param: str) -> dict[str, str]:
    if len(headers) > MAX_REQUEST_HEADERS:
        raise ToolRequestError(f"at most {MAX_REQUEST_HEADERS} headers", param=f"{param}.headers")
    out, size = {}, 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not re.match(HEADER_PATTERN, name) \
                or any(c in value for c in "\r\n\0"):
            raise ToolRequestError(f"invalid header {str(name)[:64]!r}", param=f"{param}.headers")
        size += len(name) + len(value)
        out[name] = value
    if size > MAX_REQUEST_HEADER_BYTES:
        raise ToolRequestError(f"headers over {MAX_REQUEST_HEADER_BYTES} bytes", param=f"{param}.headers")
    try:
        check_headers(out)
    except ValueError as exc:
        raise ToolRequestError(str(exc), param=f"{param}.headers") from None
    return out


def _filter(label: str, tools: list[ServerTool], allowed: list[str] | None) -> list[ServerTool]:
    """`tools` narrowed to `allowed` (in the server's order); ValueError naming what it lacks."""
    if allowed is None:
        return list(tools)
    names = {t.name for t in tools}
    missing = [name for name in dict.fromkeys(allowed) if name not in names]
    if missing:
        raise ValueError(f"allowed_tools names {', '.join(map(repr, missing[:8]))}, which the MCP server "
                         f"{label!r} does not list (it lists {', '.join(sorted(names)[:16]) or 'none'})")
    return [t for t in tools if t.name in set(allowed)]


def truncate_output(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens of `tokenizer`, with a visible marker; unchanged when
    it fits. Without a tokenizer, 4 characters count as a token. Only the first 32 characters a token
    are tokenized (a tool may return a megabyte)."""
    if len(text.encode("utf-8", "surrogatepass")) <= max_tokens:  # a token is at least one byte
        return text
    if tokenizer is None:
        if len(text) <= max_tokens * 4:
            return text
        kept = text[: max_tokens * 4]
    else:
        head = text[: max_tokens * 32]
        ids = tokenizer.encode(head)
        if len(ids) <= max_tokens and len(head) == len(text):
            return text
        kept = tokenizer.decode(ids[:max_tokens], skip_special_tokens=False)
    return kept + f"\n[... truncated: the tool's output was {len(text)} characters; the first {max_tokens} " \
                  "tokens are shown]"


def _arguments(text: str) -> dict[str, Any]:
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ToolFailure("error", f"the arguments are not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise ToolFailure("error", f"the arguments must be a JSON object, not {type(value).__name__}")
    return value


def _check_against_schema(schema: dict, arguments: dict[str, Any]) -> None:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        where = "/".join(map(str, error.absolute_path))
        raise ToolFailure("error", f"the arguments do not match the tool's parameters: "
                                   f"{(where + ': ') if where else ''}{error.message[:200]}")


class ToolRunner:
    """The registry's servers and webhooks of one gateway replica, and the calls to them."""

    def __init__(self, registry: ToolRegistry | None = None, *, tokenizer: Any = None, metrics: Any = None,
                 timeout_s: float = 30.0, max_bytes: int = 1 << 20, max_output_tokens: int = 2048,
                 max_concurrency: int = 8, allow_request_urls: bool = False, netguard: NetGuard | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.registry = registry or ToolRegistry()
        self._environ = os.environ if environ is None else environ
        self.registry.check_env(self._environ)
        self.tokenizer, self.metrics = tokenizer, metrics
        self.timeout_s, self.max_bytes, self.max_output_tokens = timeout_s, max_bytes, max_output_tokens
        self.max_concurrency, self.allow_request_urls = max_concurrency, allow_request_urls
        self.netguard = netguard or NetGuard()
        self._mcp: dict[str, _Target] = {}
        self._webhooks: dict[str, _Target] = {}
        self._webhook_pool: httpx2.AsyncHTTPTransport | None = None
        self._started = False

    @classmethod
    def from_settings(cls, cfg: Any, tokenizer: Any, metrics: Any, *, netguard: NetGuard | None = None,
                      environ: Mapping[str, str] | None = None) -> ToolRunner:
        """A runner for AppConfig `cfg` (or anything with its tool_* fields); no registry: none."""
        path = getattr(cfg, "tool_registry", None)
        registry = load_registry(path, environ) if path else ToolRegistry()
        return cls(registry, tokenizer=tokenizer, metrics=metrics, timeout_s=cfg.tool_timeout_s,
                   max_bytes=cfg.tool_response_max_bytes, max_output_tokens=cfg.tool_output_max_tokens,
                   max_concurrency=cfg.tool_max_concurrency, allow_request_urls=cfg.allow_request_mcp_urls,
                   netguard=netguard, environ=environ)

    # -- start and close ------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach every registered MCP server and list its tools; ToolRegistryError naming each server that
        fails (unreachable, lists no tools, allowed_tools naming tools it lacks) or a tool name that two
        servers or webhooks share."""
        if self._started:
            return
        self._started = True
        self._webhook_pool = connection_pool()
        for hook in self.registry.webhooks:
            webhook = Webhook(hook.name, hook.url, hook.resolved_headers(self._environ),
                              hook.resolved_secret(self._environ), self._webhook_pool, self.max_bytes)
            tool = ServerTool("webhook", hook.name, hook.name, hook.description, dict(hook.parameters))
            self._webhooks[hook.name] = _Target(hook.name, hook.timeout_s or self.timeout_s,
                                                asyncio.Semaphore(hook.max_concurrency or self.max_concurrency),
                                                webhook=webhook, tools={hook.name: tool})
        results = await asyncio.gather(*(self._start_server(entry) for entry in self.registry.mcp_servers),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                await self.close()
                raise result  # cancelled
        errors = [str(r) if isinstance(r, ToolRegistryError) else f"{type(r).__name__}: {r}"
                  for r in results if isinstance(r, Exception)]
        if not errors:
            try:
                self._check_unique_names()
            except ToolRegistryError as exc:
                errors.append(str(exc))
        if errors:
            await self.close()
            raise ToolRegistryError("; ".join(errors))

    async def _start_server(self, entry: McpServerEntry) -> None:
        label, timeout_s = entry.server_label, entry.timeout_s or self.timeout_s
        where = f"mcp server {label!r} ({entry.url or ' '.join(entry.argv)})"
        server: HttpMcpServer | StdioMcpServer
        if entry.url is not None:
            server = HttpMcpServer(entry.url, entry.resolved_headers(self._environ), connection_pool(),
                                   self.max_bytes)
        else:
            argv = entry.argv
            server = StdioMcpServer(label, StdioServerParameters(command=argv[0], args=argv[1:], cwd=entry.cwd,
                                                                 env=entry.resolved_env(self._environ)),
                                    self.max_bytes)
        slots = asyncio.Semaphore(entry.max_concurrency or self.max_concurrency)
        self._mcp[label] = _Target(label, timeout_s, slots, mcp=server)  # close() reaches it from here on
        try:
            with anyio.fail_after(timeout_s):
                if isinstance(server, HttpMcpServer):
                    tools = await server.list_tools(timeout_s)
                else:
                    tools = await server.start(timeout_s)
        except (TimeoutError, ToolFailure, OSError) as exc:
            reason = exc.message if isinstance(exc, ToolFailure) else (
                f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc))
            raise ToolRegistryError(f"{where} cannot be reached: {reason}") from None
        served = [ServerTool("mcp", label, t.name, t.description or "", dict(t.input_schema)) for t in tools]
        try:
            served = _filter(label, served, entry.allowed_tools)
            check_tool_names([t for t in tools if t.name in {s.name for s in served}])
        except (ValueError, ToolFailure) as exc:
            raise ToolRegistryError(f"{where}: {exc}") from None
        if not served:
            raise ToolRegistryError(f"{where} lists no tools")
        self._mcp[label].tools = {t.name: t for t in served}

    def _check_unique_names(self) -> None:
        owners: dict[str, str] = {}
        for target in [*self._mcp.values(), *self._webhooks.values()]:
            what = f"webhook {target.label!r}" if target.webhook else f"mcp server {target.label!r}"
            for name in target.tools:
                if name in owners:
                    raise ToolRegistryError(f"the tool name {name!r} is given by both {owners[name]} and {what}: "
                                            "tool names must be unique across servers and webhooks (leave one "
                                            "out with allowed_tools)")
                owners[name] = what

    async def close(self) -> None:
        """Stop the stdio servers and close every connection pool."""
        targets = list(self._mcp.values())
        self._mcp, self._webhooks = {}, {}
        await asyncio.gather(*(t.mcp.aclose() for t in targets if t.mcp is not None), return_exceptions=True)
        if self._webhook_pool is not None:
            await self._webhook_pool.aclose()
            self._webhook_pool = None

    # -- what a request may use -----------------------------------------------------------------

    @property
    def servers(self) -> list[str]:
        """The registered MCP server labels."""
        return list(self._mcp)

    @asynccontextmanager
    async def request_scope(self):
        """A `ToolScope` for one request: request-supplied servers it lists are closed when it exits."""
        scope = ToolScope(self)
        try:
            yield scope
        finally:
            await scope.aclose()

    async def mcp_tools(self, server_label: str, *, server_url: str | None = None,
                        headers: dict[str, str] | None = None, allowed_tools: list[str] | None = None,
                        param: str = "tools") -> list[ServerTool]:
        """The tools of the MCP server a request names: a registered label (its cached tools), or, with
        `server_url`, a request-supplied server (listed live); narrowed to `allowed_tools`."""
        return await self._mcp_tools(server_label, server_url, headers, allowed_tools, param, None)

    async def _mcp_tools(self, label: str, url: str | None, headers: dict[str, str] | None,
                         allowed: list[str] | None, param: str, scope: ToolScope | None) -> list[ServerTool]:
        if url is None:
            target = self._mcp.get(label)
            if target is None:
                known = ", ".join(map(repr, self._mcp)) or "none"
                raise ToolRequestError(f"unknown MCP server_label {label!r} (registered: {known})",
                                       param=f"{param}.server_label")
            if headers:
                raise ToolRequestError("headers are for a request-supplied server_url; a registered server's "
                                       "headers are the operator's", param=f"{param}.headers")
            try:
                return _filter(label, list(target.tools.values()), allowed)
            except ValueError as exc:
                raise ToolRequestError(str(exc), param=f"{param}.allowed_tools") from None
        if label in self._mcp:
            raise ToolRequestError(f"server_label {label!r} is a registered MCP server; a request-supplied "
                                   "server_url needs another label", param=f"{param}.server_label")
        if not self.allow_request_urls:
            raise ToolRequestError("this server calls only its registered MCP servers (request-supplied server_url "
                                   "is off: allow_request_mcp_urls)", param=f"{param}.server_url")
        if not isinstance(label, str) or not re.match(LABEL_PATTERN, label):
            raise ToolRequestError("server_label must be 1-64 letters, digits, _ or -", param=f"{param}.server_label")
        checked = _check_request_headers(headers or {}, param)
        try:
            await self.netguard.vet(url)
        except NetguardRefused as exc:
            raise ToolRequestError(f"server_url refused: {exc}", param=f"{param}.server_url") from None
        remote = _RequestServer(label, url, checked, self.netguard, self.max_bytes, self.timeout_s,
                                self.max_concurrency, shared=scope is not None)
        if scope is not None:
            scope.remotes.append(remote)
        try:
            with anyio.fail_after(self.timeout_s):
                async with remote.server() as server:
                    tools = await server.list_tools(self.timeout_s)
            check_tool_names(tools)
        except (TimeoutError, ToolFailure) as exc:
            reason = exc.message if isinstance(exc, ToolFailure) else f"no answer within {self.timeout_s:g} s"
            raise ToolRequestError(f"the MCP server at server_url cannot be used: {reason}",
                                   param=f"{param}.server_url") from None
        served = [ServerTool("mcp", label, t.name, t.description or "", dict(t.input_schema), remote=remote)
                  for t in tools]
        try:
            return _filter(label, served, allowed)
        except ValueError as exc:
            raise ToolRequestError(str(exc), param=f"{param}.allowed_tools") from None

    def webhook_tools(self, names: list[str] | None = None, *, param: str = "tools") -> list[ServerTool]:
        """The registered webhooks named (None: all of them); an unknown name is a ToolRequestError."""
        if names is None:
            return [next(iter(t.tools.values())) for t in self._webhooks.values()]
        out = []
        for name in names:
            target = self._webhooks.get(name)
            if target is None:
                known = ", ".join(map(repr, self._webhooks)) or "none"
                raise ToolRequestError(f"unknown webhook {name!r} (registered: {known})", param=f"{param}.name")
            out.append(target.tools[name])
        return out

    # -- calls ----------------------------------------------------------------------------------

    async def call(self, tool: ServerTool, arguments: str, *, call_id: str | None = None) -> ToolResult:
        """Run `tool` with `arguments` (the JSON text the model produced). Never raises for the tool's
        failure (see the module's docstring); `call_id` reaches a webhook (default: a fresh id)."""
        started = time.monotonic()
        label = REQUEST_SERVER_LABEL if tool.remote is not None else tool.server
        timeout_s = self.timeout_s
        output: str | None = None
        try:
            args = _arguments(arguments)
            if tool.remote is not None:
                timeout_s = tool.remote.timeout_s
                with anyio.fail_after(timeout_s):
                    async with tool.remote.slots, tool.remote.server() as server:
                        output = self._mcp_output(await server.call_tool(tool.name, args, timeout_s))
            else:
                target = (self._webhooks if tool.kind == "webhook" else self._mcp).get(tool.server)
                if target is None or tool.name not in target.tools:
                    raise ToolFailure("error", f"the {tool.kind} tool {tool.name!r} of {tool.server!r} is not "
                                               "available")
                timeout_s = target.timeout_s
                if target.webhook is not None:
                    _check_against_schema(target.tools[tool.name].parameters, args)
                with anyio.fail_after(timeout_s):
                    async with target.slots:
                        output = await self._invoke(target, tool, args, call_id or f"call_{uuid.uuid4().hex}")
            outcome, error = "ok", None
        except TimeoutError:
            outcome, error = "timeout", f"the tool {tool.name!r} did not finish within {timeout_s:g} s"
        except ToolFailure as exc:
            outcome, error = exc.outcome, exc.message
        except Exception:  # whatever goes wrong, the model sees an error result, never a 5xx
            logger.exception("tool call %s/%s failed unexpectedly", tool.server, tool.name)
            outcome, error = "error", "the tool call failed (internal error)"
        duration = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.count_tool_call(label, outcome, duration)
        text = output if error is None else error
        assert text is not None
        text = text.encode("utf-8", "replace").decode("utf-8")  # JSON may carry lone surrogates: no text
        if 4 * len(text) > self.max_output_tokens:  # else it fits: a character is at most 4 bytes, a token 1+
            try:
                text = await asyncio.to_thread(truncate_output, text, self.tokenizer, self.max_output_tokens)
            except Exception:
                logger.exception("truncating the output of tool %s/%s failed", tool.server, tool.name)
                text = truncate_output(text, None, self.max_output_tokens)
        return ToolResult(output=text if error is None else None, error=None if error is None else text,
                          duration_s=duration)

    async def _invoke(self, target: _Target, tool: ServerTool, args: dict[str, Any], call_id: str) -> str:
        if target.webhook is not None:
            return await target.webhook.call(args, call_id, target.timeout_s)
        if isinstance(target.mcp, HttpMcpServer):
            return self._mcp_output(await target.mcp.call_tool(tool.name, args, target.timeout_s))
        assert isinstance(target.mcp, StdioMcpServer)
        return self._mcp_output(await target.mcp.call_tool(tool.name, args))

    @staticmethod
    def _mcp_output(result) -> str:
        text = result_text(result)
        if result.is_error:
            raise ToolFailure("error", text or "the tool reported an error")
        return text


class ToolScope:
    """One request's view of the runner (`ToolRunner.request_scope`): the runner's `mcp_tools`,
    `webhook_tools` and `call`, with request-supplied servers kept until the scope closes."""

    def __init__(self, runner: ToolRunner) -> None:
        self.runner = runner
        self.remotes: list[_RequestServer] = []

    async def mcp_tools(self, server_label: str, *, server_url: str | None = None,
                        headers: dict[str, str] | None = None, allowed_tools: list[str] | None = None,
                        param: str = "tools") -> list[ServerTool]:
        return await self.runner._mcp_tools(server_label, server_url, headers, allowed_tools, param, self)

    def webhook_tools(self, names: list[str] | None = None, *, param: str = "tools") -> list[ServerTool]:
        return self.runner.webhook_tools(names, param=param)

    async def call(self, tool: ServerTool, arguments: str, *, call_id: str | None = None) -> ToolResult:
        return await self.runner.call(tool, arguments, call_id=call_id)

    async def aclose(self) -> None:
        remotes, self.remotes = self.remotes, []
        await asyncio.gather(*(r.aclose() for r in remotes), return_exceptions=True)


def check_tool_registry(cfg: Any, environ: Mapping[str, str] | None = None) -> list[str]:
    """What `expertmesh serve` runs before Ray starts: load the registry, reach every server, list the
    tools, stop them again. The tool names served, or ToolRegistryError."""
    async def check() -> list[str]:
        runner = ToolRunner.from_settings(cfg, None, None, environ=environ)
        await runner.start()
        try:
            return [t.name for target in [*runner._mcp.values(), *runner._webhooks.values()]
                    for t in target.tools.values()]
        finally:
            await runner.close()

    return asyncio.run(check())
