"""gRPC on every gateway replica, on real Ray Serve (CPU, the tiny model, one engine replica and two
gateway replicas on this one node, which share the gRPC port through SO_REUSEPORT).

Each fresh connection lands on one replica (the kernel's choice); every ExpertMesh call's initial
metadata names the replica that answered (`expertmesh-replica`, Serve's replica id). The tests open
fresh connections until both replicas have answered, with the project's own protobuf stubs: real
completions (unary and streamed), refusals, health and reflection on each replica's connection.
"""
from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from serve_app_helper import APP, running_app

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.grpc_server import HEALTH_SERVICE_NAME, REPLICA_METADATA, SERVICE_NAME
from expertmesh.gateway.serve_app import GATEWAY_DEPLOYMENT
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

KEY = "serve-grpc-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
MAX_CONNECTIONS = 64
"""Fresh connections tried before giving up on reaching both replicas (each lands on either with
about even odds: all 64 on one replica is a chance of 2**-63)."""


@pytest.fixture(scope="module")
def served(qwen3_moe_path):
    grpc_port = free_port()
    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": grpc_port, "grpc_host": "127.0.0.1",
            "gateway_replicas": 2, "api_keys": [KEY], "num_kv_blocks": 512}
    with running_app(args, num_cpus=3) as base:
        yield {"base": base, "address": f"127.0.0.1:{grpc_port}", "replicas": _gateway_replicas()}


def _gateway_replicas() -> set[str]:
    """Serve's ids of the running gateway replicas, from their actors' names
    (SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{GATEWAY_DEPLOYMENT}#"
    ids = {a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith(prefix)}
    assert len(ids) == 2, ids
    return ids


def _fresh_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (grpcio shares one between channels to one address)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _replica(call) -> str:
    return dict(call.initial_metadata())[REPLICA_METADATA]


def _on_each_replica(served, check) -> dict[str, object]:
    """check(channel) -> (replica id, result) on fresh connections until every replica has answered."""
    results: dict[str, object] = {}
    for _ in range(MAX_CONNECTIONS):
        with _fresh_channel(served["address"]) as channel:
            replica, result = check(channel)
        assert replica in served["replicas"], (replica, served["replicas"])
        results.setdefault(replica, result)
        if set(results) == served["replicas"]:
            return results
    raise AssertionError(f"only {sorted(results)} of {sorted(served['replicas'])} answered "
                         f"on {MAX_CONNECTIONS} connections")


def test_both_gateway_replicas_answer_real_completions(served):
    request = pb.CompletionRequest(prompt="The capital of France is",
                                   sampling=pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    def complete(channel):
        reply, call = pb_grpc.ExpertMeshStub(channel).Completion.with_call(request, metadata=AUTH, timeout=120)
        return _replica(call), reply

    replies = _on_each_replica(served, complete)
    texts = {r.choices[0].text for r in replies.values()}
    assert len(texts) == 1 and texts != {""}, "both replicas run the same greedy request on the one engine"
    assert all(r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length" for r in replies.values())


def test_both_gateway_replicas_stream(served):
    request = pb.ChatCompletionRequest(messages=[pb.ChatMessage(role="user", content="Hello!")],
                                       sampling=pb.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))

    def stream(channel):
        call = pb_grpc.ExpertMeshStub(channel).ChatCompletionStream(request, metadata=AUTH, timeout=120)
        chunks = list(call)
        return _replica(call), chunks

    for chunks in _on_each_replica(served, stream).values():
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == 5


def test_each_replica_refuses_a_call_without_a_key_and_answers_health_and_reflection(served):
    """Health and reflection stay open on every replica; the call before them on the same
    connection says which replica the connection reached."""
    def check(channel):
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ExpertMeshStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replica = dict(refused.value.initial_metadata())[REPLICA_METADATA]
        health = health_pb2_grpc.HealthStub(channel)
        statuses = {service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
                    for service in ("", SERVICE_NAME)}
        db = ProtoReflectionDescriptorDatabase(channel)
        return replica, (statuses, set(db.get_services()), db.FindFileContainingSymbol(SERVICE_NAME).name)

    for statuses, services, file in _on_each_replica(served, check).values():
        assert set(statuses.values()) == {health_pb2.HealthCheckResponse.SERVING}
        assert {SERVICE_NAME, HEALTH_SERVICE_NAME} <= services
        assert file == "expertmesh/v1/expertmesh.proto"


def test_http_health_names_the_replica_that_answered(served):
    seen = set()
    for _ in range(MAX_CONNECTIONS):  # Serve's proxy picks the replica of each request
        r = httpx.get(f"{served['base']}/health", timeout=30)
        assert r.status_code == 200, r.text
        seen.add(r.json()["replica"])
        if seen == served["replicas"]:
            break
    assert seen == served["replicas"], seen
