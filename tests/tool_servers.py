"""Real tool servers for the tests of server-side tools (tests/test_tools_*.py; usable by others).

- `McpHttpServer`: an MCP server built with the `mcp` package (`MCPServer`) over streamable HTTP,
  served by uvicorn in a thread on a free port, recording every call's arguments. Besides /mcp it
  answers /redirect?to=URL (307) and /html (a 200 that is no MCP); with the header `X-Garbage: 1`
  it answers every tools/call with broken JSON, with `X-Chunked: 1` it sends no Content-Length. It
  can listen on several loopback addresses at once (127.0.0.1 and 127.0.0.2) so a test can tell
  which one a request reached.
- `WebhookServer`: an HTTP server (http.server, in a thread) that checks each call's signature
  with `verify_webhook_signature` and a `ReplayCache`, and answers by path.
- tests/data/mcp_stdio_server.py: the same kind of MCP server over stdio.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

STDIO_SERVER = Path(__file__).parent / "data" / "mcp_stdio_server.py"


@dataclass
class Recorder:
    """What the MCP server saw: each call's tool and arguments, the requests' Host headers and the
    local addresses they reached, and the most calls of `hold` in flight at once."""

    calls: list[tuple[str, dict]] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, arguments: dict) -> None:
        with self.lock:
            self.calls.append((name, arguments))


def make_mcp_server(recorder: Recorder, *, with_tools: bool = True):
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    mcp = MCPServer("test-tools", log_level="WARNING")
    if not with_tools:
        return mcp

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        recorder.record("add", {"a": a, "b": b})
        return a + b

    @mcp.tool()
    def paint(color: Literal["red", "green", "blue"]) -> str:
        """Paint the wall (a bounded argument: a forced random model writes one short call)."""
        recorder.record("paint", {"color": color})
        return f"the wall is {color} now"

    @mcp.tool()
    async def nap(length: Literal["long"]) -> str:
        """Sleep 10 s (past a test's tool timeout), whatever the arguments."""
        recorder.record("nap", {"length": length})
        await asyncio.sleep(10)
        return "rested"

    @mcp.tool()
    def flood(size: Literal["huge"]) -> str:
        """10 MB of text, whatever the arguments."""
        recorder.record("flood", {"size": size})
        return "f" * (10 << 20)

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text."""
        recorder.record("echo", {"text": text})
        return text

    @mcp.tool()
    async def sleep(seconds: float) -> str:
        """Sleep, then answer."""
        recorder.record("sleep", {"seconds": seconds})
        await asyncio.sleep(seconds)
        return "awake"

    @mcp.tool()
    async def hold(seconds: float) -> str:
        """Count the calls in flight while sleeping."""
        with recorder.lock:
            recorder.in_flight += 1
            recorder.max_in_flight = max(recorder.max_in_flight, recorder.in_flight)
        try:
            await asyncio.sleep(seconds)
        finally:
            with recorder.lock:
                recorder.in_flight -= 1
        return "held"

    @mcp.tool()
    def big(size: int) -> str:
        """A string of `size` characters."""
        recorder.record("big", {"size": size})
        return "x" * size

    @mcp.tool()
    def fail(message: str) -> str:
        """Always an error result."""
        raise ToolError(message)

    @mcp.tool()
    def weather(city: str) -> dict:
        """Structured content only."""
        return {"city": city, "sky": "clear"}

    return mcp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Extras:
    """ASGI around the MCP app: records hosts, answers /redirect and /html, garbles tools/call."""

    def __init__(self, app, recorder: Recorder) -> None:
        self.app, self.recorder = app, recorder

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        with self.recorder.lock:
            self.recorder.hosts.append(headers.get(b"host", b"").decode())
            self.recorder.reached.append(scope["server"][0])
        path = scope["path"]
        if path == "/redirect":
            to = parse_qs(scope["query_string"].decode()).get("to", ["/mcp"])[0]
            return await _answer(send, 307, b"", [(b"location", to.encode())])
        if path == "/html":
            return await _answer(send, 200, b"<html>not an MCP server</html>", [(b"content-type", b"text/html")])
        if headers.get(b"x-chunked") == b"1":  # answers without Content-Length: read to learn the size
            async def chunked(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [(k, v) for k, v in message["headers"]
                                                      if k.lower() != b"content-length"]}
                await send(message)

            return await self.app(scope, receive, chunked)
        if headers.get(b"x-garbage") != b"1":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if b'"tools/call"' in body:
            return await _answer(send, 200, b'{"jsonrpc": "2.0", "id": ', [(b"content-type", b"application/json")])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _answer(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class McpHttpServer:
    """`make_mcp_server` over streamable HTTP on a free port of each of `hosts`."""

    def __init__(self, hosts: tuple[str, ...] = ("127.0.0.1",), *, with_tools: bool = True) -> None:
        import uvicorn
        from mcp.server.transport_security import TransportSecuritySettings

        self.recorder = Recorder()
        mcp = make_mcp_server(self.recorder, with_tools=with_tools)
        app = mcp.streamable_http_app(transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=False))  # tests reach it by names of their own
        self.port = free_port(hosts[0])
        sockets = []
        for host in hosts:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, self.port))
            sockets.append(s)
        self.server = uvicorn.Server(uvicorn.Config(_Extras(app, self.recorder), log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.01)

    def url(self, host: str = "127.0.0.1", path: str = "/mcp") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> McpHttpServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WebhookServer:
    """A webhook receiver on a free port that verifies every call (`secret`), recording each request
    as (path, headers, body, refusal or None). Paths: /weather ({"output": ...}), /text (plain text),
    /error ({"error": ...}), /status500, /redirect (302 to /weather), /big (10 MB), /slow (2 s)."""

    def __init__(self, secret: str) -> None:
        from expertmesh.gateway.tools.webhooks import ReplayCache

        self.secret = secret
        self.cache = ReplayCache()
        self.requests: list[tuple[str, dict, bytes, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                owner._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        from expertmesh.gateway.tools.webhooks import WebhookSignatureError, verify_webhook_signature

        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        try:
            verify_webhook_signature(self.secret, h.headers.get("X-Expertmesh-Timestamp"),
                                     h.headers.get("X-Expertmesh-Signature"), body, replay_cache=self.cache)
            refusal = None
        except WebhookSignatureError as exc:
            refusal = str(exc)
        path = urlsplit(h.path).path
        self.requests.append((path, dict(h.headers), body, refusal))
        if refusal is not None:
            return self._send(h, 401, json.dumps({"error": refusal}).encode())
        call = json.loads(body)
        if path == "/weather":
            return self._send(h, 200, json.dumps({"output": f"sunny in {call['arguments']['city']}"}).encode())
        if path == "/text":
            return self._send(h, 200, b"plain words", "text/plain")
        if path == "/error":
            return self._send(h, 200, json.dumps({"error": "no such city"}).encode())
        if path == "/status500":
            return self._send(h, 500, b"internal details the model need not see", "text/plain")
        if path == "/redirect":
            h.send_response(302)
            h.send_header("Location", "/weather")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        if path == "/big":
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.end_headers()  # no Content-Length: the client learns the size only by reading
            try:
                for _ in range(160):
                    h.wfile.write(b"y" * 65536)
            except OSError:
                pass  # the client stopped reading
            h.close_connection = True
            return None
        if path == "/slow":
            time.sleep(2)
            return self._send(h, 200, b'{"output": "late"}')
        return self._send(h, 404, b'{"error": "no such hook"}')

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> WebhookServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_runner(registry: dict, body, **kwargs):
    """asyncio.run(body(runner, metrics)): a started ToolRunner over `registry` (keyword arguments go to
    ToolRunner), closed after, and its Metrics."""
    from expertmesh.gateway.metrics import Metrics
    from expertmesh.gateway.tools.registry import parse_registry
    from expertmesh.gateway.tools.runner import ToolRunner

    metrics = Metrics()

    async def go():
        runner = ToolRunner(parse_registry(registry), metrics=metrics, **kwargs)
        await runner.start()
        try:
            return await body(runner, metrics)
        finally:
            await runner.close()

    return asyncio.run(go())
