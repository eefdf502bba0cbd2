"""The HTTP gateway in-process, over a scripted engine (no model, no Ray): the API key is checked and
the body limited before a body byte is read; templates and tokenization leave the event loop free;
`/health` follows the engine's step heartbeat; every request, refused or not, is counted.

The ASGI app is driven directly (`asgi`), so a test sees exactly how much of a body the app read,
on an event loop in a background thread that stands for the gateway replica's loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from types import SimpleNamespace

import pytest

from expertmesh.engine.async_engine import AsyncEngine, EngineHeartbeat
from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.scripted import ScriptedExecutor
from expertmesh.gateway.app_config import default_max_request_body_bytes
from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.health import judge
from expertmesh.gateway.http import build_http_app
from expertmesh.gateway.serving import LocalEngineClient, OpenAIServing, ServingSettings
from expertmesh.model.config import ModelConfig
from expertmesh.model.tokenizer import Tokenizer

KEY = "sk-guard"
MAX_MODEL_LEN = 1024
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class HangingExecutor(ScriptedExecutor):
    """A scripted executor whose steps can be made to hang (until released), from a given step on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hang, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.steps, self.hang_after_step = 0, 0

    def execute(self, plan):
        self.steps += 1
        if self.hang.is_set() and self.steps > self.hang_after_step:
            self.release.wait(60)
        return super().execute(plan)


def crash_on_next_step(engine: AsyncEngine) -> None:
    """The engine thread dies at its next step (a failed step alone only fails its requests)."""
    def step():
        raise RuntimeError("the GPU fell off the bus")

    engine.core.step = step


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def gateway(qwen3_moe_path, loop):
    """build(**app_kwargs) -> a gateway over its own scripted engine (a fresh engine per test, since
    some tests crash theirs)."""
    tokenizer = Tokenizer.from_pretrained(qwen3_moe_path)
    engines = []

    def build(auth: Authenticator | None = None, client_cls=LocalEngineClient, **app_kwargs) -> SimpleNamespace:
        config = EngineConfig(load=ModelLoadConfig(str(qwen3_moe_path), device="cpu", max_model_len=MAX_MODEL_LEN),
                              cache=CacheConfig(block_size=4, num_blocks=256))
        executor = HangingExecutor(ModelConfig.from_pretrained(qwen3_moe_path), 256,
                                   lambda ids: tokenizer.encode("one two three four five six seven eight"),
                                   fallback_token=tokenizer.token_to_id("<|im_end|>"))
        engine = AsyncEngine(EngineCore(config, executor, tokenizer), idle_wait_s=0.05)
        engines.append(engine)
        serving = OpenAIServing(client_cls(engine), tokenizer, ServingSettings("tiny", MAX_MODEL_LEN))
        app = build_http_app(serving, auth, **app_kwargs)
        return SimpleNamespace(app=app, engine=engine, executor=executor, serving=serving,
                               call=lambda *a, **k: run(loop, asgi(app, *a, **k)))

    yield build
    for engine in engines:
        with contextlib.suppress(Exception):
            engine.shutdown()


def run(loop, coro, timeout: float = 60):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=timeout)


async def asgi(app, method: str, path: str, body: bytes | list[bytes] | None = None, *, key: str | None = KEY,
               headers: dict[str, str] | None = None, endless_chunk: bytes | None = None,
               stall_after_first: bool = False, root_path: str = "") -> SimpleNamespace:
    """One request straight into the ASGI app. `body`: bytes (sent with its Content-Length) or a
    list of chunks (sent chunked); `endless_chunk`: sent again and again, never ending. Returns the
    status, headers, body and how many body chunks the app pulled."""
    chunks = [body] if isinstance(body, bytes) else list(body or [b""])
    hdrs = {"content-type": "application/json", **(headers or {})}
    if key:
        hdrs["authorization"] = f"Bearer {key}"
    if isinstance(body, bytes) and "content-length" not in hdrs:
        hdrs["content-length"] = str(len(body))
    pulled = 0
    done = asyncio.Event()

    async def receive():
        nonlocal pulled
        if endless_chunk is not None:
            pulled += 1
            await asyncio.sleep(0)
            return {"type": "http.request", "body": endless_chunk, "more_body": True}
        if pulled < len(chunks):
            pulled += 1
            if stall_after_first and pulled > 1:
                await asyncio.sleep(3600)
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await done.wait()
        return {"type": "http.disconnect"}

    response = SimpleNamespace(status=None, headers={}, body=b"")

    async def send(message):
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": root_path + path, "raw_path": (root_path + path).encode(), "query_string": b"",
             "root_path": root_path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 1234), "server": ("gateway", 80)}
    try:
        await app(scope, receive, send)
    finally:
        done.set()
    response.pulled = pulled
    return response


def error_of(response, status: int) -> dict:
    assert response.status == status, response.body[:500]
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- item 3: key before body, body limit, templates off the loop ------------------------------------

def test_unauthenticated_requests_get_401_before_the_body_is_read(gateway):
    g = gateway(Authenticator([KEY]), max_body_bytes=64 * 1024)
    malformed = g.call("POST", "/v1/chat/completions", b'{"messages": [', key=None)
    assert error_of(malformed, 401)["code"] == "invalid_api_key"
    assert malformed.pulled == 0, "the body of a caller without a key is never read"
    huge = g.call("POST", "/v1/chat/completions", None, key="sk-wrong", headers={"content-length": str(50 << 20)})
    assert error_of(huge, 401)["code"] == "invalid_api_key" and huge.pulled == 0
    assert huge.headers["www-authenticate"] == "Bearer"
    assert g.call("POST", "/v1/chat/completions", json.dumps(CHAT).encode()).status == 200


def test_every_path_but_the_open_ones_needs_the_key_under_any_route_prefix(gateway):
    g = gateway(Authenticator([KEY]))
    for root in ("", "/api"):
        assert g.call("GET", "/v1/models", key=None, root_path=root).status == 401
        assert g.call("POST", "/v1/no-such-route", b"{}", key=None, root_path=root).status == 401
        assert g.call("GET", "/v1/models", root_path=root).status == 200
        for open_path in ("/health", "/livez", "/metrics", "/openapi.json"):
            assert g.call("GET", open_path, key=None, root_path=root).status == 200, (root, open_path)


def test_content_length_over_the_limit_gets_413_at_once(gateway):
    g = gateway(Authenticator([KEY]), max_body_bytes=64 * 1024)
    r = g.call("POST", "/v1/chat/completions", None, headers={"content-length": str(50 << 20)})
    error = error_of(r, 413)
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "65536 bytes" in error["message"] and "max_request_body_bytes" in error["message"]
    assert r.pulled == 0 and r.headers["connection"] == "close"


def test_a_chunked_body_is_counted_as_it_arrives_and_cut_off(gateway):
    g = gateway(None, max_body_bytes=64 * 1024)
    r = g.call("POST", "/v1/completions", endless_chunk=b"x" * 16384)
    assert error_of(r, 413)["code"] == "request_too_large"
    assert r.pulled == 5, "reading stops at the first chunk past the limit"


def test_a_body_that_stalls_gets_408(gateway):
    g = gateway(None, body_timeout_s=0.3)
    t0 = time.perf_counter()
    r = g.call("POST", "/v1/completions", [b'{"prompt": ', b'"hi"}'], stall_after_first=True)
    assert error_of(r, 408)["code"] == "request_timeout" and time.perf_counter() - t0 < 5


def test_the_default_limit_is_sized_by_max_model_len(gateway):
    limit = default_max_request_body_bytes(MAX_MODEL_LEN)
    assert limit == (1 << 20) + 32 * MAX_MODEL_LEN
    g = gateway(None)
    big = {"prompt": "x" * (limit - 200), "max_tokens": 1}
    ok = g.call("POST", "/v1/completions", json.dumps(big).encode())
    assert error_of(ok, 400)["code"] == "context_length_exceeded", "within the limit: read, then judged"
    over = g.call("POST", "/v1/completions", json.dumps({**big, "prompt": "x" * (limit + 1)}).encode())
    assert error_of(over, 413)["code"] == "request_too_large"


def test_health_answers_while_a_huge_prompt_is_tokenized(gateway, loop):
    """A prompt of megabytes takes seconds to render and tokenize; meanwhile /health (the same
    event loop) answers within a fraction of that."""
    g = gateway(None, max_body_bytes=64 << 20)
    prompt = "expert routing, all to all; " * 90_000  # ~2.5 MB: seconds of tokenization on this machine
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": prompt}]}).encode()

    async def scenario():
        chat = asyncio.create_task(asgi(g.app, "POST", "/v1/chat/completions", body))
        answered = [time.perf_counter()]  # when each /health answer came back
        while not chat.done():
            assert (await asgi(g.app, "GET", "/health")).status == 200
            answered.append(time.perf_counter())
            await asyncio.sleep(0.05)
        return await chat, answered + [time.perf_counter()]

    chat, answered = run(loop, scenario(), timeout=300)
    assert error_of(chat, 400)["code"] == "context_length_exceeded"
    took = answered[-1] - answered[0]
    assert took > 1.0, f"the prompt took only {took:.2f} s: too small to show anything"
    longest_wait = max(b - a for a, b in itertools.pairwise(answered))
    assert longest_wait < min(1.5, took / 3), (took, longest_wait, len(answered))


# ---- item 5: /health follows the engine's heartbeat; /livez is the gateway's alone ------------------------

def test_judge_idle_busy_stalled_dead():
    assert judge(EngineHeartbeat(True, False, 3600.0, 0), 30).healthy, "idle for an hour is healthy"
    assert judge(EngineHeartbeat(True, True, 2.0, 3), 30).healthy
    stalled = judge(EngineHeartbeat(True, True, 31.2, 3), 30)
    assert not stalled.healthy and stalled.body["status"] == "unhealthy"
    assert stalled.body["reason"].startswith("engine has not completed a step for 31 s with 3 requests waiting")
    dead = judge(EngineHeartbeat(False, False, 1.0, 0, error="boom"), 30)
    assert not dead.healthy and "not running: boom" in dead.body["reason"]


def test_health_is_503_while_the_engine_hangs_and_livez_stays_200(gateway, loop):
    g = gateway(None, health_stall_timeout_s=1.0)
    time.sleep(1.5)  # idle longer than the limit: still healthy
    r = g.call("GET", "/health")
    assert r.status == 200 and json.loads(r.body)["status"] == "ok"
    g.executor.release.clear()
    g.executor.hang.set()
    stream = asyncio.run_coroutine_threadsafe(
        asgi(g.app, "POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}).encode()), loop)
    t0 = time.perf_counter()
    while (r := g.call("GET", "/health")).status == 200 and time.perf_counter() - t0 < 10:
        assert g.call("GET", "/livez").status == 200
        time.sleep(0.1)
    assert r.status == 503 and 1.0 <= time.perf_counter() - t0 < 4
    body = json.loads(r.body)
    assert body["status"] == "unhealthy" and "has not completed a step" in body["reason"]
    assert "1 requests waiting" in body["reason"] and body["engine"]["busy"]
    assert g.call("GET", "/livez").status == 200
    g.executor.release.set()  # the step finishes: healthy again, and the stream completes
    assert stream.result(timeout=30).status == 200
    assert g.call("GET", "/health").status == 200


def test_health_is_503_at_once_when_the_engine_died(gateway):
    g = gateway(None)
    crash_on_next_step(g.engine)
    r = g.call("POST", "/v1/chat/completions", json.dumps(CHAT).encode())
    assert error_of(r, 503)["code"] == "engine_unavailable"
    t0 = time.perf_counter()
    r = g.call("GET", "/health")
    assert r.status == 503 and time.perf_counter() - t0 < 1
    assert "not running" in json.loads(r.body)["reason"] and "fell off the bus" in json.loads(r.body)["reason"]
    assert g.call("GET", "/livez").status == 200


class SilentClient(LocalEngineClient):
    """An engine replica that never answers (dead, partitioned, or its loop blocked)."""

    async def heartbeat(self):
        await asyncio.sleep(3600)

    async def stats(self):
        await asyncio.sleep(3600)


def test_health_is_503_when_the_engine_does_not_answer(gateway):
    g = gateway(None, client_cls=SilentClient, health_call_timeout_s=0.5)
    t0 = time.perf_counter()
    r = g.call("GET", "/health")
    assert r.status == 503 and time.perf_counter() - t0 < 3
    assert "did not answer within 0.5 s" in json.loads(r.body)["reason"]
    t0 = time.perf_counter()
    metrics = g.call("GET", "/metrics")
    assert metrics.status == 200 and time.perf_counter() - t0 < 3
    assert b"expertmesh_requests_total" in metrics.body and b"expertmesh_num_requests_running" not in metrics.body


# ---- item 10: a stream whose engine dies ends with an error event and [DONE] ---------------------------------

def test_a_stream_whose_engine_dies_ends_with_an_error_event_then_done(gateway, loop):
    g = gateway(None)
    g.executor.hang_after_step = g.executor.steps + 3  # a few chunks out, then the engine stalls and dies
    g.executor.release.clear()
    g.executor.hang.set()
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 50}).encode()
    stream = asyncio.run_coroutine_threadsafe(asgi(g.app, "POST", "/v1/chat/completions", body), loop)
    time.sleep(0.5)
    crash_on_next_step(g.engine)
    g.executor.release.set()
    r = stream.result(timeout=30)
    events = [line[len("data: "):] for line in r.body.decode().split("\n\n") if line.startswith("data: ")]
    assert r.status == 200 and events[-1] == "[DONE]", events
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_unavailable"


# ---- item 14: every request counted, refusals included ----------------------------------------------------

def test_every_refusal_is_counted_with_its_status(gateway):
    g = gateway(Authenticator([KEY]), max_body_bytes=64 * 1024)
    assert g.call("POST", "/v1/chat/completions", json.dumps(CHAT).encode()).status == 200
    assert g.call("POST", "/v1/chat/completions", json.dumps(CHAT).encode(), key=None).status == 401
    assert g.call("POST", "/v1/chat/completions", b'{"messages": [').status == 400
    assert g.call("POST", "/v1/chat/completions", json.dumps({"messages": "hi"}).encode()).status == 400
    assert g.call("POST", "/v1/chat/completions", json.dumps({**CHAT, "model": "gpt-9"}).encode()).status == 404
    assert g.call("POST", "/v1/chat/completions", json.dumps({**CHAT, "n": 99}).encode()).status == 400
    assert g.call("POST", "/v1/completions", None, headers={"content-length": str(1 << 30)}).status == 413
    assert g.call("GET", "/v1/models/nope").status == 404
    text = g.call("GET", "/metrics").body.decode()

    def count(endpoint: str, status: int) -> float:
        match = re.search(rf'expertmesh_requests_total\{{endpoint="{endpoint}",status="{status}"\}} (\S+)', text)
        return float(match.group(1)) if match else 0.0

    assert (count("chat", 200), count("chat", 401), count("chat", 400), count("chat", 404)) == (1, 1, 3, 1)
    assert (count("completions", 413), count("models", 404)) == (1, 1)
