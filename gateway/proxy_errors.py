"""OpenAI's error object for the answers Ray Serve's HTTP proxy gives by itself.

The proxy answers some requests without the app, in plain text: 404 for a path no application
serves, 503 while no replica of the app is ready, 408 and 429 under request timeouts or queue
limits; and when a replica dies before answering, it sends nothing, so uvicorn writes a bare
"Internal Server Error". `OpenAIErrors` wraps the proxy and turns each into

    {"error": {"message": <the proxy's text>, "type": ..., "param": null, "code": ...}}

keeping the status and headers (Retry-After). Responses that are JSON (every answer of the app
itself) and all successful ones pass untouched, streams included.

Serve builds the proxy's middlewares from its one callback (`gateway/proxy_callback.py`), which
returns `middlewares()`.
"""
from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_KINDS = {404: "not_found_error", 429: "requests"}
_CODES = {404: "not_found", 408: "timeout", 429: "rate_limit_exceeded", 500: "internal_error",
          503: "service_unavailable"}
_NO_ANSWER = "The server had an error while processing your request (no replica answered); retry."


def middlewares() -> list[Middleware]:
    """The proxy's middlewares (see the module docstring)."""
    return [Middleware(OpenAIErrors)]


def error_body(status: int, message: str) -> bytes:
    kind = _KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": None, "code": _CODES.get(status)}
    return json.dumps({"error": error}, ensure_ascii=True).encode("ascii")


class OpenAIErrors:
    """ASGI middleware: a non-JSON error response becomes OpenAI's error object; an HTTP request
    that ends with no response at all (or an exception before one) becomes a JSON 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        held: Message | None = None  # the start of a plain-text error, sent once its body is known
        body: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and not _is_json(message):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                text = b"".join(body).decode("utf-8", "replace").strip() or _NO_ANSWER
                await _send_error(send, held["status"], text, _kept_headers(held))
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            if started:
                raise
            log.exception("the proxy failed before answering %s %s", scope.get("method"), scope.get("path"))
            await _send_error(send, 500, _NO_ANSWER, [])
            return
        if not started:
            await _send_error(send, 500, _NO_ANSWER, [])


def _is_json(start: Message) -> bool:
    content_type = next((v for k, v in start.get("headers", ()) if k.lower() == b"content-type"), b"")
    return content_type.split(b";")[0].strip().lower().endswith(b"json")


def _kept_headers(start: Message) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in start.get("headers", ()) if k.lower() not in (b"content-type", b"content-length")]


async def _send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    data = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
