"""The served application under attack and failure: Ray Serve started in this process (so the test can
kill replicas with `ray.kill`), the tiny Qwen3-MoE checkpoint, short timeouts.

In file order, on one module-scoped app: the proxy closes slow-header and idle sockets, the gRPC
server drops stalled handshakes and idle connections; bodies over the limit get 413 before they are
read and callers without a key 401; `/health` follows the engine and `/livez` the gateway; streams
whose engine replica is killed end with an error event (gRPC: UNAVAILABLE) and `/health` turns 503;
requests of a killed gateway replica are aborted in the engine.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import select
import socket
import time

import grpc
import httpx
import pytest
from serve_app_helper import running_app, wait_for

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.app_config import default_max_request_body_bytes
from expertmesh.gateway.proxy_callback import proxy_env
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

KEY = "sk-resilience"
MAX_MODEL_LEN = 4096
HEADER_TIMEOUT_S = KEEP_ALIVE_S = GRPC_IDLE_S = 2
APP = "expertmesh"


@pytest.fixture(scope="module")
def served(qwen3_moe_path):
    port, grpc_port = free_port(), free_port()
    args = {"model": str(qwen3_moe_path), "api_keys": [KEY], "max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 2048,
            "grpc_port": grpc_port, "health_stall_timeout_s": 10, "http_keep_alive_timeout_s": KEEP_ALIVE_S,
            "http_header_timeout_s": HEADER_TIMEOUT_S, "grpc_max_connection_idle_s": GRPC_IDLE_S,
            "max_resumptions": 0}  # a stream whose replica dies ends (tests/test_serve_failover.py: resumed)
    with running_app(args, env=proxy_env(HEADER_TIMEOUT_S), port=port) as base:
        yield {"base": base, "port": port, "grpc_port": grpc_port}


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closed `sock` (reading whatever it sent first); fails past `limit`."""
    t0 = time.time()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"the server kept the socket open for more than {limit} s") from None
    except ConnectionResetError:
        pass
    return time.time() - t0


def replica_actor(deployment: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if deployment in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


# ---- item 9: connections ----------------------------------------------------------------------------

def test_slow_header_and_silent_sockets_are_closed_within_the_header_timeout(served):
    partial = socket.create_connection(("127.0.0.1", served["port"]))
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")  # ... and stalls
    silent = socket.create_connection(("127.0.0.1", served["port"]))  # connects, says nothing
    assert HEADER_TIMEOUT_S - 0.5 <= closed_within(partial, 10) < HEADER_TIMEOUT_S + 4
    assert closed_within(silent, 10) < HEADER_TIMEOUT_S + 4
    for s in (partial, silent):
        s.close()


def test_idle_keep_alive_connections_are_closed_after_the_keep_alive_timeout(served):
    sock = socket.create_connection(("127.0.0.1", served["port"]))
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert KEEP_ALIVE_S - 0.5 <= closed_within(sock, 10) < KEEP_ALIVE_S + 4
    sock.close()


def test_grpc_drops_stalled_handshakes_and_idle_connections(served):
    stalled = socket.create_connection(("127.0.0.1", served["grpc_port"]))
    stalled.sendall(b"PRI * HTTP/2.0\r\n")  # half of the HTTP/2 preface
    assert closed_within(stalled, 10) < HEADER_TIMEOUT_S + 4
    stalled.close()

    states = []
    with grpc.insecure_channel(f"127.0.0.1:{served['grpc_port']}") as channel:
        channel.subscribe(states.append, try_to_connect=True)
        wait_for(lambda: grpc.ChannelConnectivity.READY in states, 30, "the channel connects")
        ready_at = time.time()
        wait_for(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, GRPC_IDLE_S + 8,
                 "the server closes the idle connection")
        assert time.time() - ready_at >= GRPC_IDLE_S - 0.5


# ---- item 3: body limit and key before the body -------------------------------------------------------------

def raw_head(path: str, headers: dict[str, str]) -> bytes:
    """A POST's request line and headers, as a socket sends them."""
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one response `sock` gets (content-length or a single chunk)."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():  # one chunk: size line, payload
        body = body.split(b"\r\n", 1)[1]
    return int(head.split()[1]), json.loads(body[: body.rindex(b"}") + 1])


def test_a_body_over_the_limit_gets_413_before_it_is_read(served):
    limit = default_max_request_body_bytes(MAX_MODEL_LEN)
    sock = socket.create_connection(("127.0.0.1", served["port"]))
    sock.sendall(raw_head("/v1/chat/completions", {"Authorization": f"Bearer {KEY}", "Content-Length": str(50 << 20)}))
    t0 = time.time()
    status, body = raw_response(sock)  # not one byte of the 50 MiB was sent
    assert status == 413 and body["error"]["code"] == "request_too_large" and time.time() - t0 < 10
    assert str(limit) in body["error"]["message"]
    sock.close()

    # A chunked body of 32 MiB, sent at a steady pace: Serve's proxy buffers whatever arrives, but the
    # 413 comes back (and the connection closes) soon after the limit is passed, not after the body.
    planned = 32 << 20
    sock = socket.create_connection(("127.0.0.1", served["port"]))
    sock.sendall(raw_head("/v1/chat/completions", {"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"}))
    chunk = b"x" * 65536
    framed, sent = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n", 0
    while sent < planned and not select.select([sock], [], [], 0.01)[0]:
        sock.sendall(framed)
        sent += len(chunk)
    status, body = raw_response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert limit < sent < planned / 2, (limit, sent)
    assert closed_within(sock, 10) < 10  # the rest of the body is not waited for
    sock.close()


def test_a_caller_without_a_key_gets_401_whatever_its_body(served):
    sock = socket.create_connection(("127.0.0.1", served["port"]))
    sock.sendall(raw_head("/v1/chat/completions", {"Content-Length": str(50 << 20)}))
    status, body = raw_response(sock)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    sock.close()
    r = httpx.post(served["base"] + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 401, r.text


# ---- items 5 and 10: health, and streams whose engine replica dies -----------------------------------------

def _http_stream(base: str, started: concurrent.futures.Future) -> list[str]:
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "ignore_eos": True,
            "stream": True, "chat_template_kwargs": {"enable_thinking": False}}
    events = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if len(events) == 3 and not started.done():
                    started.set_result(True)
    return events


def _grpc_stream(port: int, started: concurrent.futures.Future) -> grpc.StatusCode:
    request = pb.ChatCompletionRequest(messages=[pb.ChatMessage(role="user", content="go on")],
                                       sampling=pb.SamplingParams(max_tokens=3000, ignore_eos=True))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExpertMeshStub(channel)
        try:
            for i, _ in enumerate(stub.ChatCompletionStream(request, metadata=(("authorization", f"Bearer {KEY}"),),
                                                            timeout=120)):
                if i == 2 and not started.done():
                    started.set_result(True)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_livez_and_health(served):
    assert httpx.get(served["base"] + "/livez").json() == {"status": "ok"}
    health = httpx.get(served["base"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["engine"]["alive"]


def test_streams_end_with_an_error_when_the_engine_replica_dies(served):
    import ray

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        started = [concurrent.futures.Future() for _ in range(3)]
        http = [pool.submit(_http_stream, served["base"], started[i]) for i in range(2)]
        rpc = pool.submit(_grpc_stream, served["grpc_port"], started[2])
        concurrent.futures.wait(started, timeout=60)
        assert all(f.done() for f in started), [f.exception() for f in http + [rpc] if f.done()]
        dead = replica_actor("ExpertMeshEngine")
        ray.kill(dead, no_restart=True)
        killed = time.time()
        for f in http:
            events = f.result(timeout=60)
            assert events[-1] == "[DONE]", events[-3:]
            error = json.loads(events[-2])["error"]
            assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert rpc.result(timeout=60) == grpc.StatusCode.UNAVAILABLE
        assert time.time() - killed < 30

    answers = []  # what /health said meanwhile, for the failure message

    def unhealthy_or_replaced():
        r = httpx.get(served["base"] + "/health", timeout=30)
        answers.append((round(time.time() - killed, 1), r.status_code, r.text[:120]))
        if r.status_code == 503:
            return r
        # Serve may replace the replica before a /health call sees it gone (a call made while no
        # replica exists waits for the new one, within the health call's timeout): a 200 is then
        # the new replica's, never the dead one's
        try:
            replaced = replica_actor("ExpertMeshEngine")._actor_id != dead._actor_id
        except (AssertionError, ValueError):  # no single live replica just now
            return False
        return r.status_code == 200 and replaced and r

    try:
        health = wait_for(unhealthy_or_replaced, 15, "/health reports the dead engine, or its replacement")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; /health said {answers[:3]} ... {answers[-3:]}") from None
    if health.status_code == 503:
        assert health.json()["status"] == "unhealthy" and health.json()["reason"]
    assert httpx.get(served["base"] + "/livez").status_code == 200  # the gateway itself lives
    # Serve replaces the replica; then the app is healthy again, and a chat gets its tokens
    wait_for(lambda: httpx.get(served["base"] + "/health", timeout=10).status_code == 200, 180,
             "a new engine replica is healthy")
    wait_for(lambda: _chat_answers(served["base"]), 60, "a new engine replica serves a chat")


def _chat_answers(base: str) -> bool:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_requests_of_a_dead_gateway_are_aborted_in_the_engine(served):
    import ray

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = [concurrent.futures.Future() for _ in range(4)]
        streams = [pool.submit(_http_stream, served["base"], started[i]) for i in range(4)]
        concurrent.futures.wait(started, timeout=120)  # generous: CI's 2 cores may be busy
        assert all(f.done() for f in started), [f.exception() for f in streams if f.done()]
        seen = []  # the four requests are in the engine (running, or waiting for a slot): say what it held

        def all_four_inside():
            running, waiting, _ = engine_gauges(served["base"])
            seen.append((running, waiting))
            return running + waiting == 4 and running >= 1

        try:
            wait_for(all_four_inside, 60, "the 4 requests are in the engine")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; (running, waiting) seen: {sorted(set(seen))}") from None
        ray.kill(replica_actor("ExpertMeshGateway"), no_restart=True)
        killed = time.time()
        # Read through Serve's replacement gateway (the engine's own gauges, scraped per /metrics call)
        drained = wait_for(lambda: engine_gauges(served["base"]) == (0, 0, 0.0), 60,
                           "the engine aborts the dead gateway's requests")
        took = time.time() - killed
        for f in streams:
            f.exception(timeout=60)  # the connections broke with the gateway
    assert drained and took < 30, f"took {took:.1f} s (Serve's new gateway replica included)"


def engine_gauges(base: str) -> tuple[float, float, float]:
    """(running, waiting, KV usage) of the engine, as the gateway's /metrics reports them. Through
    HTTP, not a driver-side Serve handle: earlier tests' in-process Serve sessions (the CLI's
    `serve` run from test_placement, for one) leave router state in this driver that makes such
    handles hang."""
    r = httpx.get(base + "/metrics", timeout=10)
    if r.status_code != 200:
        raise OSError(f"/metrics answered {r.status_code}")
    values = dict(re.findall(r"^(expertmesh_num_requests_running|expertmesh_num_requests_waiting|"
                             r"expertmesh_kv_cache_usage_ratio) (\S+)$", r.text, re.MULTILINE))
    return (float(values["expertmesh_num_requests_running"]), float(values["expertmesh_num_requests_waiting"]),
            float(values["expertmesh_kv_cache_usage_ratio"]))
