"""`RequestGuard`: what happens to an API request before FastAPI reads its body.

    headers ──▶ 1. API key (Authorization)         401 / 429 / 503, not one body byte read
            ──▶ 2. Content-Length over the limit    413 at once
            ──▶ 3. the body, read here chunk by chunk and counted as it arrives (chunked bodies
                   too): past the limit, 413 and nothing more is read; no byte of it for
                   `body_timeout_s`, 408 (a body sent one byte a minute holds no connection)
            ──▶ FastAPI (the body replayed from memory; then the client's own `receive`, so a
                client that disconnects mid-stream is still seen)
            ──▶ 4. the request counted once in expertmesh_requests_total with its final status

FastAPI reads and parses the whole body before any route dependency runs, so a key checked by a
dependency is checked after a 50 MiB body was read and parsed, and a malformed body from a caller
without a key got a 400 instead of a 401. The guard runs first, on every path but the open ones
(`OPEN_PATHS`: health, liveness, metrics, the docs), so a route added later is guarded unless it
is named there.

The body limit (`max_request_body_bytes`) defaults to `default_max_request_body_bytes(max_model_len)`
(see `gateway/app_config.py`): room for the longest prompt the model takes, and no more.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.metrics import Metrics, RequestOutcome, current_outcome, endpoint_of
from expertmesh.gateway.protocol import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


OPEN_PATHS = frozenset({"/health", "/livez", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Paths served without a key, a body or counting (relative to the app's root path)."""


class RequestGuard:
    """Pure ASGI middleware (wraps the FastAPI app); see the module docstring."""

    def __init__(self, app, *, auth: Authenticator | None, max_body_bytes: int, metrics: Metrics,
                 body_timeout_s: float = 30.0) -> None:
        self.app, self.auth, self.max_body_bytes, self.metrics = app, auth, max_body_bytes, metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        outcome = RequestOutcome(endpoint_of(path))
        first_status: list[int] = []

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start" and not first_status:
                first_status.append(message["status"])
            await send(message)

        token = current_outcome.set(outcome)
        try:
            try:
                await self._authorize(scope)
                body = await self._read_body(scope, receive)
            except APIError as exc:
                await send_error(send_noting_status, exc)
                return
            if body is None:  # the client left while sending its body
                first_status.append(499)
                return
            await self.app(scope, _replay(body, receive), send_noting_status)
        finally:
            current_outcome.reset(token)
            status = outcome.status or str(first_status[0] if first_status else 500)
            self.metrics.count_request(outcome.endpoint, status)

    async def _authorize(self, scope: Scope) -> None:
        if self.auth is None or not self.auth.enabled:
            return
        header = _header(scope, b"authorization")
        await self.auth.check_http(None if header is None else header.decode("latin-1"))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or APIError 413 as soon as it is known to exceed the limit."""
        limit = self.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise _too_large(limit, f"its Content-Length is {int(length)} bytes")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(f"The request body stalled: no byte of it arrived for {self.body_timeout_s:g} s.",
                               status=408, code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, f"more than {limit} bytes arrived")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then defers to the client's (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (Serve passes a route prefix as `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def _too_large(limit: int, why: str) -> APIError:
    return APIError(f"The request body is too large: {why}, and this server accepts at most {limit} bytes "
                    f"(max_request_body_bytes).", status=413, code="request_too_large")


async def send_error(send: Send, exc: APIError) -> None:
    """Answer with `exc` as OpenAI's JSON error object, closing the connection when the body was
    not read to its end (a 413, or a refusal sent before the body)."""
    body = json.dumps(exc.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
