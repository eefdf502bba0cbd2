"""MCP servers through the `mcp` SDK's client (`mcp.Client`): streamable HTTP and stdio.

**HTTP: one MCP session per call.** Each listing and each tool call opens its own session
(`mcp.Client` over `streamable_http_client`), sends its request and closes it, over a connection
pool kept per server (so TCP and TLS connections are reused). A session per call costs one more
small request (the protocol handshake; a few milliseconds on a LAN) and buys isolation: no session
state shared between the requests of different users, no session to revive after a server
restart, and a per-call transport (`CallTransport`) that holds that call's own size budget and
refusals, so a failure is classified exactly (too_large, refused, timeout, error).

**stdio: one process per gateway process, kept.** `StdioMcpServer` spawns the command once; one
background task owns the session (the SDK's task groups must be entered and left by one task) and
every call uses it concurrently from the caller's task. When a call finds the connection closed
(the process died) the owner closes what is left, and starts it again with backoff (0.5 s doubling
to 30 s); the call that found it dead ends as an error (a call is never retried: a tool need not
be idempotent), and later calls wait for the new connection within their timeout.

**Size.** Over HTTP every response body is counted as it streams (`CallTransport`): past
`tool_response_max_bytes` the stream is cut and the call fails as too_large, so a 10 MB answer is
never held (a Content-Length over the cap fails before the body is read). A stdio server's result
is measured once it has arrived (the SDK reads whole lines from the pipe; a registered command is
the operator's own program).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, CallToolResult, Implementation, Tool

from expertmesh.gateway.tools.netguard import NetguardRefused

logger = logging.getLogger(__name__)

MAX_LIST_PAGES = 20
MAX_TOOLS = 512
TOOL_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
"""Tool names the model may be shown (MCP's own recommendation, bounded)."""
RESTART_DELAYS_S = (0.5, 30.0)
"""A dead stdio server is started again after the first delay, doubling up to the second."""


@functools.cache
def _client_info() -> Implementation:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Implementation(name="expertmesh", version=version("expertmesh"))
    except PackageNotFoundError:
        return Implementation(name="expertmesh", version="0")


class ToolFailure(Exception):
    """A call or listing that failed: `outcome` (error, timeout, too_large, refused) and a short
    message fit for the model and the client."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.message = outcome, message


@dataclass
class CallState:
    """What one call's transport saw: its byte budget, whether it was exceeded or a request refused."""

    max_bytes: int
    too_large: bool = False
    refused: str | None = None
    largest_body: int = 0
    """Bytes read of the largest response body (so a test can see the stream was cut)."""


class ResponseTooLarge(httpx2.StreamError):
    """A response body past the call's byte budget (the stream is cut where it crossed it)."""


class _CappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, state: CallState) -> None:
        self.inner, self.state = inner, state

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.inner:
            read += len(chunk)
            self.state.largest_body = max(self.state.largest_body, read)
            if read > self.state.max_bytes:
                self.state.too_large = True
                raise ResponseTooLarge(f"the response exceeded {self.state.max_bytes} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class CallTransport(httpx2.AsyncBaseTransport):
    """One call's view of a server's shared transport: caps each response body at the call's budget
    and records a netguard refusal. Closing it leaves the shared transport open."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, state: CallState) -> None:
        self.inner, self.state = inner, state

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except NetguardRefused as exc:
            self.state.refused = str(exc)
            raise
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.max_bytes:
            await response.aclose()
            self.state.too_large = True
            raise ResponseTooLarge(f"the response exceeded {self.state.max_bytes} bytes")
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(response.status_code, headers=response.headers,
                               stream=_CappedStream(response.stream, self.state), extensions=response.extensions)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; anyio's task groups wrap them."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure(exc: BaseException, state: CallState | None = None) -> ToolFailure:
    """`exc` (from the SDK or the transport) as a ToolFailure with its outcome."""
    if isinstance(exc, ToolFailure):
        return exc
    if state is not None and state.too_large:
        return ToolFailure("too_large", f"the tool's response exceeded {state.max_bytes} bytes")
    if state is not None and state.refused:
        return ToolFailure("refused", f"request refused: {state.refused}")
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, ToolFailure):
            return leaf
        if isinstance(leaf, NetguardRefused):
            return ToolFailure("refused", f"request refused: {leaf}")
        if isinstance(leaf, (TimeoutError, httpx2.TimeoutException)):
            return ToolFailure("timeout", "the tool server did not answer in time")
    leaf = leaves[0]
    if isinstance(leaf, MCPError):
        return ToolFailure("error", _short(f"MCP error {leaf.code}: {leaf.message}"))
    if isinstance(leaf, httpx2.ConnectError):
        return ToolFailure("error", "cannot connect to the tool server")
    if isinstance(leaf, httpx2.HTTPError):
        return ToolFailure("error", _short(f"HTTP error talking to the tool server: {leaf}"))
    return ToolFailure("error", _short(f"{type(leaf).__name__}: {leaf}"))


def result_text(result: CallToolResult) -> str:
    """The text the model sees of a tool's result: its text contents joined (an embedded text
    resource's text too); with none, its structured content as JSON; other content as a note."""
    parts: list[str] = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        elif block.type in ("image", "audio"):
            parts.append(f"[{block.type} content ({getattr(block, 'mime_type', '?')}) not shown]")
        elif block.type == "resource_link":
            parts.append(f"[resource {getattr(block, 'uri', '')}]")
    if not any(block.type == "text" for block in result.content) and result.structured_content is not None:
        parts.insert(0, json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def check_tool_names(tools: list[Tool]) -> None:
    for tool in tools:
        if not TOOL_NAME.match(tool.name):
            raise ToolFailure("error", _short(f"the server lists a tool named {tool.name!r}, which is not a valid "
                                              "tool name (letters, digits, _ . / -, at most 128)"))


async def list_all_tools(client: Client) -> list[Tool]:
    """Every tool the server lists (following its pages, within MAX_LIST_PAGES and MAX_TOOLS)."""
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        if len(tools) > MAX_TOOLS:
            raise ToolFailure("error", f"the server lists more than {MAX_TOOLS} tools")
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise ToolFailure("error", f"the server's tool list runs past {MAX_LIST_PAGES} pages")


class HttpMcpServer:
    """A streamable HTTP MCP server: one session per listing or call, over `transport` (a connection
    pool, or a `GuardedTransport` for a request-supplied server), which it owns."""

    def __init__(self, url: str, headers: dict[str, str], transport: httpx2.AsyncBaseTransport,
                 max_bytes: int) -> None:
        self.url, self.headers, self.transport, self.max_bytes = url, dict(headers), transport, max_bytes

    @asynccontextmanager
    async def _session(self, state: CallState, timeout_s: float) -> AsyncIterator[Client]:
        async with httpx2.AsyncClient(transport=CallTransport(self.transport, state), headers=self.headers,
                                      timeout=httpx2.Timeout(timeout_s), trust_env=False) as http:
            stream = streamable_http_client(self.url, http_client=http, max_sse_event_size=state.max_bytes)
            async with Client(stream, cache=None, client_info=_client_info()) as client:
                yield client

    async def list_tools(self, timeout_s: float) -> list[Tool]:
        state = CallState(self.max_bytes)
        try:
            async with self._session(state, timeout_s) as client:
                return await list_all_tools(client)
        except Exception as exc:
            raise failure(exc, state) from None

    async def call_tool(self, name: str, arguments: dict[str, Any], timeout_s: float,
                        state: CallState | None = None) -> CallToolResult:
        state = state or CallState(self.max_bytes)
        try:
            async with self._session(state, timeout_s) as client:
                return await client.call_tool(name, arguments)
        except Exception as exc:
            raise failure(exc, state) from None

    async def aclose(self) -> None:
        await self.transport.aclose()


class StdioMcpServer:
    """A stdio MCP server: the command spawned once and kept, its session owned by one background
    task, started again (with backoff) when its connection is found closed."""

    def __init__(self, label: str, params: StdioServerParameters, max_bytes: int) -> None:
        self.label, self.params, self.max_bytes = label, params, max_bytes
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.starts = 0
        """Processes spawned so far (1 after start; more after restarts)."""

    async def start(self, timeout_s: float) -> list[Tool]:
        """Spawn the process, open the session and list the tools (ToolFailure on any failure)."""
        first: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._own(first, timeout_s), name=f"mcp-stdio-{self.label}")
        try:
            return await asyncio.wait_for(asyncio.shield(first), timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            first.cancel()
            await self.aclose(graceful=False)
            raise ToolFailure("timeout", f"did not start and list its tools within {timeout_s:g} s") from None
        except Exception as exc:
            await self.aclose(graceful=False)
            raise failure(exc) from None

    async def _own(self, first: asyncio.Future, timeout_s: float) -> None:
        delay = RESTART_DELAYS_S[0]
        while not self._closing:
            self._wake.clear()
            try:
                async with Client(self.params, cache=None, client_info=_client_info()) as client:
                    self.starts += 1
                    with anyio.fail_after(timeout_s):
                        tools = await list_all_tools(client)
                    self._client = client
                    self._connected.set()
                    if not first.done():
                        first.set_result(tools)
                    delay = RESTART_DELAYS_S[0]
                    await self._wake.wait()
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                logger.warning("mcp server %r (stdio) failed: %s; starting it again in %.1f s", self.label,
                               failure(exc).message, delay)
            finally:
                self._client = None
                if not self._closing:
                    self._connected.clear()
            if self._closing:
                return
            with suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, RESTART_DELAYS_S[1])

    def _broken(self, client: Client) -> None:
        if self._client is client:
            logger.warning("mcp server %r (stdio): the connection closed; starting it again", self.label)
            self._connected.clear()
            self._wake.set()

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        await self._connected.wait()
        client = self._client
        if client is None:
            raise ToolFailure("error", "the tool server is shut down")
        try:
            result = await client.call_tool(name, arguments)
        except Exception as exc:
            closed = any(isinstance(e, (anyio.ClosedResourceError, anyio.BrokenResourceError))
                         or (isinstance(e, MCPError) and e.code == CONNECTION_CLOSED) for e in _leaves(exc))
            if closed:
                self._broken(client)
                raise ToolFailure("error", "the tool server's connection closed during the call") from None
            raise failure(exc) from None
        size = len(result.model_dump_json(by_alias=True, exclude_none=True))
        if size > self.max_bytes:
            raise ToolFailure("too_large", f"the tool's response exceeded {self.max_bytes} bytes")
        return result

    async def aclose(self, graceful: bool = True) -> None:
        """Stop the process: the owner leaves the session (the SDK closes stdin, waits, then kills the
        process tree, each step bounded); not `graceful`, not connected, or stuck past 10 s, the owner
        is cancelled (the SDK's shutdown of the process still runs, shielded)."""
        self._closing = True
        self._connected.set()  # callers waiting for a connection see the shutdown
        self._wake.set()
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if not graceful or self._client is None:  # no session to leave: stop whatever it is waiting for
            task.cancel()
        _, pending = await asyncio.wait({task}, timeout=10)  # the task's own end is no error of ours
        if pending:
            logger.warning("mcp server %r (stdio) did not shut down in 10 s", self.label)
            task.cancel()
