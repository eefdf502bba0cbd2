"""The Responses API in the served application: `expertmesh serve` (Ray Serve: the gateway builds
ResponsesServing and its tool runner) driven with the official `openai` client and the gRPC
Responses RPC, with a tool registry (`--tool-registry`: a real MCP server on streamable HTTP in this
process, one on stdio that the gateway replica spawns, a signed webhook) and stored responses in a
real redis-server (`--redis-url`). The loop itself is tested in-process (tests/test_responses*.py).
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
import yaml
from conftest import start_redis_server
from responses_rig import ANSWER, LOOKUP
from tool_servers import STDIO_SERVER, McpHttpServer, WebhookServer

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
    folder = tmp_path_factory.mktemp("serve-responses")
    log = folder / "serve.log"
    redis_server = start_redis_server(folder)
    mcp, hooks = McpHttpServer(), WebhookServer("whsec-serve")
    registry = {"mcp_servers": [{"server_label": "calc", "url": mcp.url(), "allowed_tools": ["paint"]},
                                {"server_label": "io", "command": [sys.executable, str(STDIO_SERVER)],
                                 "env": {"STDIO_TOOL_LOG": str(folder / "stdio.jsonl")}, "allowed_tools": ["shout"]}],
                "webhooks": [{"name": "get_weather", "url": hooks.url("/weather"), "secret_env": "EM_HOOK_SECRET",
                              "description": "The weather in a city.", "parameters": {
                                  "type": "object", "properties": {"city": {"enum": ["Valencia", "Leeds"]}},
                                  "required": ["city"]}}]}
    (folder / "tools.yaml").write_text(yaml.safe_dump(registry))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "EM_HOOK_SECRET": "whsec-serve"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "expertmesh", "serve", str(qwen3_moe_path), "--port", str(port),
           "--grpc-port", str(grpc_port), "--api-key", KEY, "--max-model-len", "1024", "--num-kv-blocks", "512",
           "--served-model-name", "tiny", "--tool-registry", str(folder / "tools.yaml"),
           "--redis-url", redis_server.url]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(base, proc, 180, log)
        except RuntimeError as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(str(exc))
        yield {"base": base, "grpc_port": grpc_port, "mcp": mcp, "hooks": hooks, "redis": redis_server,
               "stdio_log": folder / "stdio.jsonl"}
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        mcp.close()
        hooks.close()
        redis_server.stop()


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
    assert info.value.body["param"].startswith("tools[0]")  # not in the registry

    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        reply = pb_grpc.ExpertMeshStub(channel).Responses(pb.ResponsesRequest(body_json=json.dumps(FORCED)),
                                                          metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
    assert [(i.type, i.name, i.arguments) for i in reply.output] == [("function_call", "lookup", call.arguments)]

    def count() -> float:  # three POSTs, one GET and one DELETE over HTTP, one gRPC call (counted as it ends)
        found = re.search(r'^expertmesh_requests_total\{endpoint="responses",status="200"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    def kv() -> float:  # the engine's figures reach /metrics within about a second (routing stats)
        return float(re.search(r"^expertmesh_kv_cache_usage_ratio (\S+)$", text, re.M).group(1))

    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(f"{server['base']}/metrics", timeout=10).text
        if (count() >= 6 and kv() == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count() == 6
    assert kv() == 0


def test_registered_tools_through_serve(server):
    """The gateway replica's runner: the HTTP MCP server, the stdio one (spawned in the replica) and the
    webhook each get the model's arguments; the stored response lives in Redis and continues there."""
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    base = dict(model="tiny", input="Use the tool.", max_output_tokens=100, temperature=0,
                reasoning={"effort": "none"}, text={"format": ANSWER})
    for label, name, tool in (("calc", "paint", {"type": "mcp", "server_label": "calc"}),
                              ("io", "shout", {"type": "mcp", "server_label": "io"}),
                              (None, "get_weather", {"type": "webhook", "name": "get_weather"})):
        choice = {**tool, "name": name} if label else tool
        r = client.responses.create(**base, tools=[tool], tool_choice=choice)
        assert r.status == "completed" and [i.type for i in r.output][1:] == ["message"], r.output
        call = r.output[0]
        assert call.status == "completed" and call.error is None, call
        arguments = json.loads(call.arguments)
        if name == "paint":
            assert server["mcp"].recorder.calls[-1] == ("paint", arguments)
        elif name == "shout":
            logged = server["stdio_log"].read_text().splitlines()
            assert json.loads(logged[-1]) == arguments and call.output == arguments["word"].upper() + "!"
        else:
            _, _, body, refusal = server["hooks"].requests[-1]
            assert refusal is None and json.loads(body)["arguments"] == arguments
    with server["redis"].client() as redis_client:
        assert any(k.startswith("em:") and r.id in k for k in redis_client.keys("*"))  # stored in Redis
    follow = client.responses.create(**{**base, "input": "And tomorrow?"}, previous_response_id=r.id)
    assert follow.status == "completed" and follow.previous_response_id == r.id
    alone = client.responses.create(**{**base, "input": "And tomorrow?"})
    assert follow.usage.input_tokens > alone.usage.input_tokens + 20  # it read the stored conversation
