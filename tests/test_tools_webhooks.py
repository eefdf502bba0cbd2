"""Webhooks (gateway/tools/webhooks.py through ToolRunner) against a real HTTP receiver that verifies
every call with `verify_webhook_signature` and refuses replays; the signing helper on its own."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from tool_servers import WebhookServer, run_runner

from expertmesh.gateway.metrics import Metrics
from expertmesh.gateway.tools.mcp_client import CallState, CallTransport
from expertmesh.gateway.tools.registry import ToolRegistryError, parse_registry
from expertmesh.gateway.tools.runner import ToolRequestError, ToolRunner
from expertmesh.gateway.tools.webhooks import (
    ReplayCache,
    Webhook,
    WebhookSignatureError,
    sign_webhook,
    verify_webhook_signature,
)

SECRET = "whsec-test-0123456789"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}


# ---- the receiver's helper ----------------------------------------------------------------------

def test_a_signature_verifies_once_and_nothing_else_does():
    body = b'{"name":"get_weather","arguments":{"city":"Paris"},"call_id":"call_1"}'
    now = 1_800_000_000
    signature = sign_webhook(SECRET, now, body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    verify_webhook_signature(SECRET, str(now), signature, body, now=now + 10)
    verify_webhook_signature(SECRET.encode(), str(now), signature, body.decode(), now=now)  # bytes or str
    cases = [
        (SECRET, str(now), signature, body + b" ", now, "signature mismatch"),
        ("another-secret", str(now), signature, body, now, "signature mismatch"),
        (SECRET, str(now + 1), signature, body, now, "signature mismatch"),  # the timestamp is signed too
        (SECRET, str(now), signature, body, now + 301, "stale timestamp"),
        (SECRET, str(now), signature, body, now - 301, "stale timestamp"),  # from the future
        (SECRET, None, signature, body, now, "missing"),
        (SECRET, str(now), "", body, now, "missing"),
        (SECRET, "17e8", signature, body, now, "malformed X-Expertmesh-Timestamp"),
        (SECRET, str(now), signature.removeprefix("sha256="), body, now, "malformed X-Expertmesh-Signature"),
        (SECRET, str(now), "sha256=" + "0" * 64, body, now, "signature mismatch"),
        (SECRET, str(now), "sha256=ü", body, now, "signature mismatch"),
    ]
    for secret, timestamp, sig, payload, at, message in cases:
        with pytest.raises(WebhookSignatureError, match=message):
            verify_webhook_signature(secret, timestamp, sig, payload, now=at)
    seen = ReplayCache()
    verify_webhook_signature(SECRET, str(now), signature, body, now=now, replay_cache=seen)
    with pytest.raises(WebhookSignatureError, match="replayed signature"):
        verify_webhook_signature(SECRET, str(now), signature, body, now=now + 1, replay_cache=seen)


def test_the_replay_cache_forgets_only_what_is_stale_anyway():
    cache = ReplayCache(max_entries=3)
    assert cache.add("a", expires_at=100, now=0) and not cache.add("a", expires_at=100, now=50)
    assert cache.add("a", expires_at=300, now=150)  # expired at 100: a replay now is refused as stale anyway
    for key in "bcd":
        assert cache.add(key, expires_at=400, now=160)
    assert len(cache) == 3  # bounded: the oldest left


# ---- calls to a real receiver -------------------------------------------------------------------

@pytest.fixture(scope="module")
def receiver():
    with WebhookServer(SECRET) as server:
        yield server


def hooks(receiver: WebhookServer) -> dict:
    def hook(name: str, path: str, **extra) -> dict:
        return {"name": name, "url": receiver.url(path), "description": f"the {path} hook",
                "secret_env": "EM_HOOK_SECRET", **extra}

    return {"webhooks": [hook("get_weather", "/weather", parameters=CITY, headers={"X-Tenant": "t1"}),
                         hook("as_text", "/text"), hook("says_error", "/error"), hook("fails", "/status500"),
                         hook("moves", "/redirect"), hook("huge", "/big"), hook("slow", "/slow", timeout_s=0.5),
                         {"name": "unsigned", "url": receiver.url("/weather")}]}


def run(receiver: WebhookServer, body, **kwargs):
    return run_runner(hooks(receiver), body, environ={"EM_HOOK_SECRET": SECRET}, **kwargs)


def test_a_call_is_signed_verified_and_answers_and_a_replay_is_refused(receiver):
    async def body(runner: ToolRunner, metrics: Metrics):
        (weather,) = runner.webhook_tools(["get_weather"], param="tools[3]")
        assert (weather.kind, weather.server, weather.name, weather.parameters) == ("webhook", "get_weather",
                                                                                   "get_weather", CITY)
        assert [t.name for t in runner.webhook_tools()][:2] == ["get_weather", "as_text"]
        result = await runner.call(weather, '{"city": "Paris"}', call_id="call_abc")
        assert (result.output, result.error) == ("sunny in Paris", None)
        assert metrics.registry.get_sample_value("expertmesh_tool_calls_total",
                                                 {"server": "get_weather", "outcome": "ok"}) == 1
        with pytest.raises(ToolRequestError, match="unknown webhook 'nope'") as exc:
            runner.webhook_tools(["get_weather", "nope"], param="tools[3]")
        assert exc.value.param == "tools[3].name"

    run(receiver, body)
    path, headers, raw, refusal = receiver.requests[-1]
    assert (path, refusal) == ("/weather", None)  # the receiver verified it
    assert json.loads(raw) == {"name": "get_weather", "arguments": {"city": "Paris"}, "call_id": "call_abc"}
    assert headers["X-Tenant"] == "t1" and headers["Content-Type"] == "application/json"
    # the same request again, byte for byte: refused as a replay
    replay = httpx.post(receiver.url("/weather"), content=raw, headers={
        k: headers[k] for k in ("X-Expertmesh-Timestamp", "X-Expertmesh-Signature", "Content-Type")})
    assert replay.status_code == 401 and receiver.requests[-1][3] == "replayed signature"
    tampered = httpx.post(receiver.url("/weather"), content=raw.replace(b"Paris", b"Tokyo"), headers={
        k: headers[k] for k in ("X-Expertmesh-Timestamp", "X-Expertmesh-Signature", "Content-Type")})
    assert tampered.status_code == 401 and receiver.requests[-1][3] == "signature mismatch"


def test_answers_and_failures_become_outputs_and_error_results(receiver):
    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in runner.webhook_tools()}
        assert (await runner.call(tools["as_text"], "{}")).output == "plain words"
        assert (await runner.call(tools["says_error"], "{}")).error == "no such city"
        failed = await runner.call(tools["fails"], "{}")
        assert failed.error == "the webhook answered HTTP 500"  # its body stays with the webhook
        before = [r[0] for r in receiver.requests]
        moved = await runner.call(tools["moves"], "{}")
        assert moved.error == "the webhook answered a redirect (HTTP 302), which is not followed"
        assert [r[0] for r in receiver.requests] == [*before, "/redirect"]  # /weather never reached
        huge = await runner.call(tools["huge"], "{}")
        assert huge.error == "the tool's response exceeded 65536 bytes"
        slow = await runner.call(tools["slow"], "{}")
        assert slow.error == "the tool 'slow' did not finish within 0.5 s"
        unsigned = await runner.call(tools["unsigned"], '{"city": "Oslo"}')  # no secret_env: not signed
        assert unsigned.error == "HTTP 401: missing X-Expertmesh-Timestamp or X-Expertmesh-Signature header"
        assert "X-Expertmesh-Signature" not in receiver.requests[-1][1]
        count = len(receiver.requests)
        for bad, message in (('{"town": "Oslo"}', "'city' is a required property"),
                             ('{"city": 7}', "city: 7 is not of type 'string'"), ("{", "not valid JSON")):
            result = await runner.call(tools["get_weather"], bad)
            assert result.output is None and message in result.error
        assert len(receiver.requests) == count  # refused before any request
        outcomes = {o: metrics.registry.get_sample_value("expertmesh_tool_calls_total", {"server": s, "outcome": o})
                    for s, o in (("huge", "too_large"), ("slow", "timeout"), ("fails", "error"))}
        assert outcomes == {"too_large": 1, "timeout": 1, "error": 1}

    run(receiver, body, max_bytes=65536)


def test_a_streamed_answer_is_cut_at_the_cap(receiver):
    """/big streams 10 MB with no Content-Length: the transport stops reading just past the cap."""
    import httpx2

    async def go():
        state = CallState(65536)
        body, headers = Webhook("huge", receiver.url("/big"), {}, SECRET.encode(), httpx2.AsyncHTTPTransport(),
                                65536).request({}, "call_1")
        async with httpx2.AsyncClient(transport=CallTransport(httpx2.AsyncHTTPTransport(), state)) as http:
            with pytest.raises(httpx2.StreamError, match="exceeded 65536 bytes"):
                await http.post(receiver.url("/big"), content=body, headers=headers)
        return state

    state = asyncio.run(go())
    assert state.too_large and 65536 < state.largest_body < 65536 + 256 * 1024


def test_a_missing_secret_is_a_start_up_error(receiver):
    with pytest.raises(ToolRegistryError, match=r"webhook 'get_weather': secret_env.*EM_HOOK_SECRET, which is unset"):
        ToolRunner(parse_registry(hooks(receiver)), environ={})
