"""API keys from the state store over HTTP and gRPC: a revoked key is refused (401 /
UNAUTHENTICATED), a rate-limited key gets 429 with Retry-After / RESOURCE_EXHAUSTED with a
retry-after trailer, an unreachable store gives 503 / UNAVAILABLE (never naming the store), a key
store that lost its keys refuses everyone, and a tokens-per-minute limit holds under concurrent
requests (reserved at admission, settled when a request ends however it ends). The app is built
in-process (no Ray Serve): one event loop in a thread runs the gRPC server and serves HTTP through
httpx's ASGI transport; the Redis tests start a real redis-server.
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest
from conftest import local_serving, start_redis_server

from expertmesh.cluster.collective import free_port
from expertmesh.cluster.state import InProcessStateStore, RedisStateStore
from expertmesh.gateway.auth import Authenticator
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def gateway():
    from expertmesh.gateway.grpc_server import build_grpc_server
    from expertmesh.gateway.http import build_http_app

    with local_serving(max_model_len=256) as rig:
        run = rig.run
        servers, channels, clients = [], [], []

        def front_ends(auth: Authenticator) -> SimpleNamespace:
            """HTTP (an httpx client over the ASGI app) and gRPC (a stub) over the serving layer with `auth`."""
            app = build_http_app(rig.serving, auth)
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
            clients.append(http)
            port = free_port()

            async def start():
                server = build_grpc_server(rig.serving, auth, port, host="127.0.0.1")
                await server.start()
                return server

            servers.append(run(start()))
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)

            def get(path: str, key: str | None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return run(http.get(path, headers=headers))

            def post(path: str, body: dict, key: str | None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return run(http.post(path, json=body, headers=headers))

            def post_many(path: str, body: dict, key: str, n: int) -> list[httpx.Response]:
                """`n` requests at once."""
                async def all_at_once():
                    headers = {"Authorization": f"Bearer {key}"}
                    return await asyncio.gather(*(http.post(path, json=body, headers=headers) for _ in range(n)))

                return run(all_at_once())

            return SimpleNamespace(get=get, post=post, post_many=post_many, stub=pb_grpc.ExpertMeshStub(channel),
                                   auth=auth)

        store = InProcessStateStore()
        main = Authenticator(store=store, keys_cache_s=0)
        rig.serving.limiter = main  # token budgets of the main front end's keys
        try:
            yield SimpleNamespace(store=store, main=front_ends(main), front_ends=front_ends, rig=rig)
        finally:
            for channel in channels:
                channel.close()
            for server in servers:
                run(server.stop(None))
            for http in clients:
                run(http.aclose())


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _rpc_error(call, request, key: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=_metadata(key))
    return info.value


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}


def test_http_rejects_a_revoked_key(gateway):
    raw, _ = gateway.store.create_key("http-revoked")
    g = gateway.main
    assert g.get("/v1/models", raw).status_code == 200
    r = g.post("/v1/chat/completions", CHAT, raw)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert g.get("/v1/models", None).status_code == 401
    assert g.get("/health", None).status_code == 200, "/health stays open"

    gateway.store.revoke_key("http-revoked")
    for r in (g.get("/v1/models", raw), g.post("/v1/chat/completions", CHAT, raw)):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_http_rate_limited_key_gets_429_with_retry_after(gateway):
    raw, _ = gateway.store.create_key("http-limited", requests_per_minute=2)
    g = gateway.main
    assert g.post("/v1/chat/completions", CHAT, raw).status_code == 200
    assert g.get("/v1/models", raw).status_code == 200
    r = g.post("/v1/chat/completions", CHAT, raw)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "http-limited" in error["message"]
    other, _ = gateway.store.create_key("http-unlimited")
    assert g.get("/v1/models", other).status_code == 200, "limits are per key"


def test_grpc_rejects_a_revoked_key(gateway):
    raw, _ = gateway.store.create_key("grpc-revoked")
    stub = gateway.main.stub
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=_metadata(raw)).models] == ["tiny"]
    chat = pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")],
                                    sampling=pb.SamplingParams(max_tokens=2, temperature=0))
    assert stub.ChatCompletion(chat, metadata=_metadata(raw)).usage.completion_tokens == 2

    gateway.store.revoke_key("grpc-revoked")
    for call, request in ((stub.ListModels, pb.ListModelsRequest()), (stub.ChatCompletion, chat)):
        err = _rpc_error(call, request, raw)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(err.trailing_metadata())["error-code"] == "invalid_api_key"
    with pytest.raises(grpc.RpcError) as info:
        stub.ListModels(pb.ListModelsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_rate_limited_key_gets_resource_exhausted(gateway):
    raw, _ = gateway.store.create_key("grpc-limited", requests_per_minute=1)
    stub = gateway.main.stub
    stub.ListModels(pb.ListModelsRequest(), metadata=_metadata(raw))
    err = _rpc_error(stub.ListModels, pb.ListModelsRequest(), raw)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "grpc-limited" in err.details()
    trailers = dict(err.trailing_metadata())
    assert trailers["error-code"] == "rate_limit_exceeded" and 1 <= int(trailers["retry-after"]) <= 60


def test_unreachable_store_gives_503_and_unavailable(gateway):
    """The 503 names no store: the URL (and the password in it) stays in the server's log."""
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2-secret@127.0.0.1:{port}/0"
    g = gateway.front_ends(Authenticator(["static-key"], store=RedisStateStore(url)))
    r = g.get("/v1/models", "em-some-store-key")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "state_store_unavailable"
    assert g.get("/v1/models", "static-key").status_code == 200, "static keys work without the store"
    err = _rpc_error(g.stub.ListModels, pb.ListModelsRequest(), "em-some-store-key")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    health = g.get("/health", None)
    assert health.status_code == 200 and "unreachable" in health.json()["auth"]
    for text in (r.text, err.details(), repr(err.trailing_metadata()), health.text):
        for secret in ("hunter2-secret", str(port), "redis://"):
            assert secret not in text, f"{secret!r} leaked into {text!r}"


@pytest.fixture
def redis_server(tmp_path):
    server = start_redis_server(tmp_path)
    yield server
    server.stop()


def test_redis_restarted_empty_refuses_everyone(gateway, redis_server):
    """`--redis-url` as the only key source: keys created, Redis restarted with no data (and, again,
    FLUSHALL). No key and any key get 401 / UNAUTHENTICATED, and /health says why."""
    from expertmesh.gateway.auth import NO_STORE_KEYS

    store = RedisStateStore(redis_server.url)
    raw, _ = store.create_key("before-the-restart")
    g = gateway.front_ends(Authenticator(store=store, keys_cache_s=0))
    assert g.post("/v1/chat/completions", CHAT, raw).status_code == 200
    assert g.stub.ListModels(pb.ListModelsRequest(), metadata=_metadata(raw)).models

    chat = pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")],
                                    sampling=pb.SamplingParams(max_tokens=2, temperature=0))
    for lose_the_keys in (redis_server.restart_empty, redis_server.flush):
        lose_the_keys()
        for key in (None, "anything", raw):
            for r in (g.get("/v1/models", key), g.post("/v1/chat/completions", CHAT, key)):
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            for call, request in ((g.stub.ListModels, pb.ListModelsRequest()), (g.stub.ChatCompletion, chat)):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=_metadata(key) if key else ())
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = g.get("/health", None)
        assert health.status_code == 200 and health.json()["auth"] == NO_STORE_KEYS
        raw, _ = store.create_key(f"after-{lose_the_keys.__name__}")  # a new key works at once
        assert g.get("/v1/models", raw).status_code == 200


LONG = {**CHAT, "max_tokens": 100}  # reserves the prompt (well under 40 tokens) + 100: two fit in 300


def test_token_limit_holds_under_concurrent_requests(gateway):
    """A key of 300 tokens per minute sends 10 requests of max_tokens 100 at once: two run, eight get
    429 with Retry-After (each reserves its most tokens before the engine sees it)."""
    raw, _ = gateway.store.create_key("tpm-300", tokens_per_minute=300)
    replies = gateway.main.post_many("/v1/chat/completions", LONG, raw, 10)
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert (len(ok), len(refused)) == (2, 8), [r.status_code for r in replies]
    assert sum(r.json()["usage"]["total_tokens"] for r in ok) <= 300
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["Retry-After"]) <= 60


def _until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _open_reservations(store: InProcessStateStore, key_id: str) -> int:
    with store._lock:
        window = store._windows.get(key_id)
        return 0 if window is None else len(window.reserved)


def test_cancelled_and_failed_requests_settle(gateway):
    """A stream cancelled mid-way and a request the engine refuses give their reservation back."""
    raw, rec = gateway.store.create_key("tpm-settle", tokens_per_minute=300)
    cancelled = gateway.rig.serving.metrics.requests.labels("chat", "499")
    before = cancelled._value.get()
    stream = gateway.main.stub.ChatCompletionStream(
        pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")],
                                 sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)),
        metadata=_metadata(raw))
    next(stream)  # running: it holds the prompt + 200 tokens
    held = gateway.main.post("/v1/chat/completions", LONG, raw)
    assert held.status_code == 429 and "Retry-After" in held.headers, "the running stream's tokens are held"
    stream.cancel()
    assert _until(lambda: _open_reservations(gateway.store, rec.id) == 0), "the cancelled stream settled"
    assert cancelled._value.get() == before + 1, "the stream ended by its cancellation, not by finishing"
    assert gateway.main.post("/v1/chat/completions", LONG, raw).status_code == 200, "its unused tokens came back"

    raw, rec = gateway.store.create_key("tpm-refused", tokens_per_minute=300)
    bad = {**CHAT, "max_tokens": 200, "guided_regex": "(unclosed"}
    for _ in range(3):  # each would hold 200+ tokens if a refusal leaked its reservation
        assert gateway.main.post("/v1/chat/completions", bad, raw).status_code == 400
    assert _open_reservations(gateway.store, rec.id) == 0
    assert gateway.main.post("/v1/chat/completions", {**CHAT, "max_tokens": 200}, raw).status_code == 200


def test_refused_prompt_stops_its_siblings(gateway):
    """A completion of three prompts whose third does not fit the key's budget gets 429, and the two
    admitted prompts stop at once (cancelled, settled) rather than generating for nobody."""
    raw, rec = gateway.store.create_key("tpm-siblings", tokens_per_minute=300)
    generated = gateway.rig.serving.metrics.generation_tokens
    before = generated._value.get()
    body = {"model": "tiny", "prompt": ["one", "two", "three"], "max_tokens": 100, "ignore_eos": True}
    r = gateway.main.post("/v1/completions", body, raw)
    assert r.status_code == 429 and "Retry-After" in r.headers, r.text
    assert _until(lambda: _open_reservations(gateway.store, rec.id) == 0)
    assert _until(lambda: gateway.rig.engine.stats()["num_running"] == 0), "the admitted prompts were aborted"
    # run to the end they would have made 2 x 100 tokens (the request counter sees the one 429: a
    # request is counted once, with its final status)
    assert generated._value.get() - before < 100, "the two admitted prompts were cancelled, not run to the end"
