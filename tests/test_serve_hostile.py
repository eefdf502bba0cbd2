"""The hostile requests of `test_hostile_requests.py` replayed against `expertmesh serve` (Ray
Serve's HTTP proxy, the gateway and model deployments, gRPC): each gets the same status, the same
OpenAI error object and the same `param` as in-process, so the Ray Serve path maps errors alike
(where a schema nested 900 deep used to fail pickling on its way to the model deployment). After
all of them `/health` is 200, `/metrics` shows 0 running, 0 waiting and 0 KV usage, and the
server's log holds no traceback.

Bodies over 64 KiB are left to the in-process tests, so a request-body limit sized to this small
model's context cannot answer first.
"""
from __future__ import annotations

import json
import time

import grpc
import httpx
import openai
import pytest
from test_hostile_requests import (
    CASES,
    GRPC_CASES,
    INTERNAL_NAMES,
    OPENAI_CASES,
    PATHS,
    assert_openai_error,
    grpc_chat,
)
from test_serve_openai import KEY, metric, server  # noqa: F401  (this module's own served app)

pytestmark = pytest.mark.slow
SERVED_CASES = [c for c in CASES if len(c[2] if isinstance(c[2], bytes) else json.dumps(c[2])) < 64 * 1024]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("case", SERVED_CASES, ids=[c[0] for c in SERVED_CASES])
def test_served_app_answers_hostile_requests_alike(server, case):  # noqa: F811
    _, path, payload, status, param = case
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = httpx.post(server["base"] + PATHS[path], content=content, timeout=120,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, status, param)


@pytest.mark.parametrize("case", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_served_app_openai_client_gets_bad_request(server, case):  # noqa: F811
    _, kwargs, param = case
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    kwargs = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == 400 and info.value.param == param
    assert not INTERNAL_NAMES.search(info.value.body["message"]), info.value.body


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_served_app_grpc_answers_hostile_requests_alike(server, case):  # noqa: F811
    name, request, param = case
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        call = channel.unary_unary("/expertmesh.v1.ExpertMesh/ChatCompletion", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(request if isinstance(request, bytes) else request.SerializeToString(),
                 metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
    err = info.value
    expected = grpc.StatusCode.NOT_FOUND if name == "model-unknown" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.code() == expected, (err.code(), err.details())
    assert err.details() and not INTERNAL_NAMES.search(err.details()), err.details()
    if param is not None:
        assert dict(err.trailing_metadata() or ())["error-param"] == param


def test_served_proxy_answers_in_openai_errors_too(server):  # noqa: F811
    """A request target no route takes ("*", asterisk-form) is answered by Serve's proxy itself."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server["base"])
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: expertmesh\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"404", data[:500]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "not_found_error"


def test_served_app_is_healthy_and_idle_afterwards(server):  # noqa: F811
    r = httpx.post(server["base"] + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

        reply = pb_grpc.ExpertMeshStub(channel).ChatCompletion(
            grpc_chat(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
        assert reply.usage.completion_tokens == 2
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200
    names = ("expertmesh_num_requests_running", "expertmesh_num_requests_waiting", "expertmesh_kv_cache_usage_ratio")
    deadline = time.time() + 30
    while time.time() < deadline and any(metric(server["base"], n) != 0.0 for n in names):
        time.sleep(0.5)
    assert [metric(server["base"], n) for n in names] == [0.0, 0.0, 0.0]
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
