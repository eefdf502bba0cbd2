"""The Responses API in the served application: `expertmesh serve` (Ray Serve: the gateway builds
ResponsesServing and its tool runner) driven with the official `openai` client and the gRPC
Responses RPC. No tool registry, so only client-side function tools; the loop itself is tested
in-process (tests/test_responses.py, tests/test_responses_loop.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from responses_rig import ANSWER, LOOKUP

from expertmesh.bench.serve import wait_healthy
from expertmesh.cluster.collective import free_port
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

KEY = "sk-responses-serve"
pytestmark = pytest.mark.slow
FORCED = dict(model="tiny", input="What is MoE?", tools=[LOOKUP], tool_choice={"type": "function", "name": "lookup"},
              max_output_tokens=100, temperature=0, reasoning={"effort": "none"})


@pytest.fixture(scope="module")
def server(qwen3_moe_path, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-responses") / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "expertmesh", "serve", str(qwen3_moe_path), "--port", str(port),
           "--grpc-port", str(grpc_port), "--api-key", KEY, "--max-model-len", "1024", "--num-kv-blocks", "512",
           "--served-model-name", "tiny"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 180, log)
    except RuntimeError as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(str(exc))
    yield {"base": base, "grpc_port": grpc_port}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_responses_through_serve(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    first = client.responses.create(**FORCED)
    assert first.status == "completed" and [i.type for i in first.output] == ["function_call"]
    call = first.output[0]
    second = client.responses.create(model="tiny", previous_response_id=first.id, tools=[LOOKUP],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "mixture of experts"}],
                                     max_output_tokens=60, temperature=0, reasoning={"effort": "none"},
                                     text={"format": ANSWER})
    assert second.status == "completed" and json.loads(second.output_text)["answer"] in ("yes", "no")
    assert client.responses.retrieve(second.id).output_text == second.output_text
    events = list(client.responses.create(stream=True, **FORCED))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].arguments == call.arguments
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input="x", tools=[{"type": "mcp", "server_label": "nope"}])
    assert info.value.body["param"] == "tools[0]"  # no registry: no MCP server to call

    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        reply = pb_grpc.ExpertMeshStub(channel).Responses(pb.ResponsesRequest(body_json=json.dumps(FORCED)),
                                                          metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
    assert [(i.type, i.name, i.arguments) for i in reply.output] == [("function_call", "lookup", call.arguments)]

    def count() -> float:  # three POSTs over HTTP, one gRPC call (counted as it ends: maybe just after)
        found = re.search(r'^expertmesh_requests_total\{endpoint="responses",status="200"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{server['base']}/metrics", timeout=10).text
        if count() >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count() == 4
    assert float(re.search(r"^expertmesh_kv_cache_usage_ratio (\S+)$", text, re.M).group(1)) == 0
