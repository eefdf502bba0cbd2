"""API keys from the state store over HTTP and gRPC: a revoked key is refused (401 /
UNAUTHENTICATED), a rate-limited key gets 429 with Retry-After / RESOURCE_EXHAUSTED with a
retry-after trailer, and an unreachable store gives 503 / UNAVAILABLE. The app is built in-process
(no Ray Serve): one event loop in a thread runs the gRPC server and serves HTTP through httpx's
ASGI transport.
"""
from __future__ import annotations

from types import SimpleNamespace

import grpc
import httpx
import pytest
from conftest import local_serving

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

            return SimpleNamespace(get=get, post=post, stub=pb_grpc.ExpertMeshStub(channel), auth=auth)

        store = InProcessStateStore()
        try:
            yield SimpleNamespace(store=store, main=front_ends(Authenticator(store=store, keys_cache_s=0)),
                                  front_ends=front_ends)
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
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    g = gateway.front_ends(Authenticator(["static-key"], store=RedisStateStore(url)))
    r = g.get("/v1/models", "em-some-store-key")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "state_store_unavailable" and url in error["message"]
    assert g.get("/v1/models", "static-key").status_code == 200, "static keys work without the store"
    err = _rpc_error(g.stub.ListModels, pb.ListModelsRequest(), "em-some-store-key")
    assert err.code() == grpc.StatusCode.UNAVAILABLE and url in err.details()
