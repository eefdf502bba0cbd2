"""Ray Serve's proxy's own answers in OpenAI's error object (`gateway/proxy_errors.py`): stand-in
ASGI apps answer as the proxy does (plain text 404/503/429, nothing at all when a replica died,
an exception) and the middleware must turn each into JSON, leaving JSON errors and successful
streams untouched. `tests/test_serve_hostile.py` checks it on the proxy of a served app."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from expertmesh.gateway.proxy_callback import PROXY_CALLBACK
from expertmesh.gateway.proxy_errors import OpenAIErrors, middlewares


def plain(status: int, text: bytes, headers=()):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
        await send({"type": "http.response.body", "body": text[:5], "more_body": True})
        await send({"type": "http.response.body", "body": text[5:]})
    return app


async def silent(scope, receive, send):
    """What Serve's proxy does when the replica failed before answering: no response at all."""


async def raising(scope, receive, send):
    raise RuntimeError("proxy internals")


async def json_error(scope, receive, send):
    await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": {"message": "ours"}}'})


async def stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(3):
        await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def get(app) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=OpenAIErrors(app), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.get("/v1/models")
    return asyncio.run(go())


@pytest.mark.parametrize("app, status, words, code", [
    (plain(503, b"Deployment 'ExpertMeshGateway' is unavailable."), 503, "unavailable", "service_unavailable"),
    (plain(404, b"Path '*' not found. Ping http://.../-/routes for available routes."), 404, "not found",
     "not_found"),
    (plain(429, b"Request dropped due to backpressure", [(b"retry-after", b"3")]), 429, "backpressure",
     "rate_limit_exceeded"),
    (plain(500, b""), 500, "no replica answered", "internal_error"),
    (silent, 500, "no replica answered", "internal_error"),
    (raising, 500, "no replica answered", "internal_error"),
])
def test_proxy_answers_become_openai_errors(app, status, words, code):
    r = get(app)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert words in error["message"] and "RuntimeError" not in error["message"]
    if status == 429:
        assert r.headers["retry-after"] == "3"


def test_json_errors_and_streams_pass_untouched():
    r = get(json_error)
    assert r.status_code == 400 and r.json() == {"error": {"message": "ours"}}
    r = get(stream)
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


def test_callback_is_what_serve_imports(monkeypatch):
    """Serve's one proxy callback returns these middlewares (and installs the header timeout)."""
    from ray.serve._private.utils import call_function_from_import_path
    from uvicorn import config

    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", config.HTTP_PROTOCOLS["auto"])  # restored after
    assert [m.cls for m in call_function_from_import_path(PROXY_CALLBACK)] == [m.cls for m in middlewares()]
    assert config.HTTP_PROTOCOLS["auto"] == "expertmesh.gateway.proxy_timeouts:HeaderTimeoutProtocol"
