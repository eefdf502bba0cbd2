"""`/v1/responses` with REAL tool servers: the runner of gateway/tools/ (not a fake) over an MCP server
built with the `mcp` package on streamable HTTP, another on stdio, and a webhook receiver that checks
signatures (tests/tool_servers.py), behind the HTTP app on uvicorn and driven by the official `openai`
client, with the tiny model on the CPU.

With `tool_choice` forcing a tool, the model's arguments reach the server (which records them), the
response holds the call's item with the server's own output, then a final message (a tiny
`text.format`, so the random model finishes in a few tokens); streaming gives the same items. The
refusals of issue 15 (request-supplied URLs to loopback, private and metadata addresses, a public name
that redirects to a private one, a tool past its timeout, a 10 MB answer, a loop past the round limit)
each end as a 4xx or a documented error item, and afterwards the server is healthy and holds no KV
block.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import local_serving
from responses_rig import ANSWER, wait_idle
from tool_servers import STDIO_SERVER, McpHttpServer, WebhookServer

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.http import build_http_app
from expertmesh.gateway.responses import ResponsesServing
from expertmesh.gateway.tools.netguard import NetGuard, is_public_address
from expertmesh.gateway.tools.registry import parse_registry
from expertmesh.gateway.tools.runner import ToolRunner

KEY = "sk-responses-tools"
SECRET = "whsec-test-secret"
PUBLIC = "127.0.0.2"
"""The address this test's resolver gives `public.test`, and the one loopback address its netguard
predicate counts as public: every other loopback, private or metadata address is refused as in
production (the predicate is the production one otherwise)."""
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Valencia", "Leeds"]}}, "required": ["city"]}
BASE = dict(model="tiny", input="Please use the tool.", max_output_tokens=200, temperature=0,
            reasoning={"effort": "none"}, text={"format": ANSWER})


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


async def _names(host: str, port: int) -> list[str]:
    """The test's DNS: `public.test` is the MCP server's second address; IPs are themselves."""
    if host == "public.test":
        return [PUBLIC]
    return [host]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    if not _can_bind(PUBLIC):
        pytest.skip(f"{PUBLIC} cannot be bound here (not Linux)")
    log = tmp_path_factory.mktemp("stdio") / "calls.jsonl"
    with McpHttpServer(hosts=("127.0.0.1", PUBLIC)) as mcp_http, WebhookServer(SECRET) as hooks, \
            local_serving(max_model_len=1024) as rig:
        registry = parse_registry({
            "mcp_servers": [
                {"server_label": "calc", "url": mcp_http.url(), "allowed_tools": ["paint", "nap", "flood"]},
                {"server_label": "io", "command": [sys.executable, str(STDIO_SERVER)],
                 "env": {"STDIO_TOOL_LOG": str(log)}, "allowed_tools": ["shout"]}],
            "webhooks": [{"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER,
                          "url": hooks.url("/weather"), "secret_env": "HOOK_SECRET", "timeout_s": 5}]})
        guard = NetGuard(resolver=_names, is_public=lambda ip: str(ip) == PUBLIC or is_public_address(ip))

        async def start() -> ToolRunner:
            runner = ToolRunner(registry, tokenizer=rig.tokenizer, metrics=rig.serving.metrics, timeout_s=2,
                                max_bytes=1 << 20, allow_request_urls=True, netguard=guard,
                                environ={"HOOK_SECRET": SECRET})
            await runner.start()
            return runner

        runner = rig.run(start())
        responses = ResponsesServing(rig.serving, runner)
        try:
            # uvicorn on the loop the runner started on (its stdio session and pools live there), as in a
            # gateway replica, where the replica's loop builds the runner and serves the requests
            with _served_on(rig, build_http_app(rig.serving, Authenticator([KEY]), responses=responses)) as base:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
                yield SimpleNamespace(client=client, base=base, engine=rig.engine, mcp=mcp_http, hooks=hooks,
                                      log=log)
        finally:
            rig.run(runner.close())


@contextlib.contextmanager
def _served_on(rig, app) -> Iterator[str]:
    """`app` served by uvicorn as a task of the rig's event loop, on a free port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))

    async def start():
        task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        return task

    task = rig.run(start())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True

        async def stop():
            await asyncio.wait_for(task, 10)

        rig.run(stop())


def _forced(label: str, name: str) -> dict:
    return {**BASE, "tools": [{"type": "mcp", "server_label": label, "require_approval": "never"}],
            "tool_choice": {"type": "mcp", "server_label": label, "name": name}}


def _plain(output) -> list[dict]:
    return [{k: v for k, v in i.model_dump().items() if k != "id" and v is not None} for i in output]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_reaches_the_http_mcp_server_with_the_models_arguments(live, stream):
    calls_before = len(live.mcp.recorder.calls)
    if stream:
        events = list(live.client.responses.create(stream=True, **_forced("calc", "paint")))
        assert events[-1].type == "response.completed"
        assert {"response.mcp_call.in_progress", "response.mcp_call.completed"} <= {e.type for e in events}
        r = events[-1].response
    else:
        r = live.client.responses.create(**_forced("calc", "paint"))
    assert r.status == "completed" and [i.type for i in r.output] == ["mcp_call", "message"]
    call = r.output[0]
    assert live.mcp.recorder.calls[calls_before:] == [("paint", json.loads(call.arguments))], call
    color = json.loads(call.arguments)["color"]
    assert (call.server_label, call.name, call.status, call.error) == ("calc", "paint", "completed", None)
    assert call.output == f"the wall is {color} now"  # the server's own answer
    assert json.loads(r.output_text)["answer"] in ("yes", "no")  # the final message follows the call


def test_stream_and_unary_give_the_same_items(live):
    unary = live.client.responses.create(**_forced("calc", "paint"))
    streamed = list(live.client.responses.create(stream=True, **_forced("calc", "paint")))[-1].response
    assert _plain(streamed.output) == _plain(unary.output)


def test_a_forced_call_reaches_the_stdio_mcp_server(live):
    r = live.client.responses.create(**_forced("io", "shout"))
    assert [i.type for i in r.output] == ["mcp_call", "message"]
    call = r.output[0]
    logged = [json.loads(line) for line in live.log.read_text().splitlines()]
    assert logged[-1] == json.loads(call.arguments)  # the stdio server logged the model's arguments
    assert call.server_label == "io" and call.output == logged[-1]["word"].upper() + "!"


def test_a_forced_webhook_call_is_signed_and_a_replay_is_refused(live):
    before = len(live.hooks.requests)
    r = live.client.responses.create(**{**BASE, "tools": [{"type": "webhook", "name": "get_weather"}],
                                        "tool_choice": {"type": "webhook", "name": "get_weather"}})
    assert [i.type for i in r.output] == ["webhook_call", "message"]
    call = r.output[0]
    (path, headers, body, refusal), = live.hooks.requests[before:]
    assert refusal is None and path == "/weather"  # the receiver verified the signature
    sent = json.loads(body)
    assert sent["name"] == "get_weather" and sent["arguments"] == json.loads(call.arguments)
    assert call.output == f"sunny in {sent['arguments']['city']}"
    replay = httpx.post(live.hooks.url("/weather"), content=body, timeout=10, headers={
        k: v for k, v in headers.items() if k.lower().startswith(("x-expertmesh-", "content-type"))})
    assert replay.status_code == 401 and "replay" in replay.json()["error"].lower()


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/mcp", "http://10.0.0.1/mcp",
                                 "http://169.254.169.254/latest/meta-data/",
                                 "http://public.test:{port}/redirect?to=http://127.0.0.1:{port}/mcp"])
def test_request_supplied_urls_to_private_addresses_are_refused(live, url):
    url = url.format(port=live.mcp.port)
    with pytest.raises(openai.BadRequestError) as exc:
        live.client.responses.create(**{**BASE, "tools": [{"type": "mcp", "server_label": "mine",
                                                           "server_url": url}]})
    error = exc.value.body if isinstance(exc.value.body, dict) else {}
    assert exc.value.status_code == 400 and error.get("param", "").startswith("tools[0]")


def test_the_public_address_itself_is_reachable(live):
    """The control of the test above: the same server by its public name answers, so the refusals are
    the guard's, not an unreachable address."""
    r = live.client.responses.create(**{**BASE, "tools": [{"type": "mcp", "server_label": "mine",
                                                           "server_url": f"http://public.test:{live.mcp.port}/mcp",
                                                           "allowed_tools": ["paint"]}],
                                        "tool_choice": {"type": "mcp", "server_label": "mine", "name": "paint"}})
    assert [i.type for i in r.output] == ["mcp_call", "message"] and r.output[0].output.startswith("the wall is")


@pytest.mark.parametrize("tool, words", [("nap", "did not finish within 2 s"), ("flood", "bytes")])
def test_a_tool_past_its_timeout_or_size_cap_is_an_error_item(live, tool, words):
    r = live.client.responses.create(**_forced("calc", tool))
    assert r.status == "completed" and [i.type for i in r.output] == ["mcp_call", "message"]
    call = r.output[0]
    assert call.status == "failed" and call.output is None and words in call.error


def test_a_loop_past_the_round_limit_ends_incomplete(live):
    calls_before = len(live.mcp.recorder.calls)
    r = live.client.responses.create(**_forced("calc", "paint"), max_tool_calls=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"
    (call,) = r.output
    assert call.type == "mcp_call" and call.status == "incomplete" and "max_tool_calls" in call.error
    assert len(live.mcp.recorder.calls) == calls_before  # it never ran


def test_afterwards_the_server_is_healthy_and_holds_no_kv_block(live):
    stats = wait_idle(live.engine)
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0)
    assert httpx.get(f"{live.base}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{live.base}/metrics", timeout=10).text
    assert 'expertmesh_tool_calls_total{outcome="ok",server="calc"}' in metrics
    assert 'expertmesh_tool_calls_total{outcome="timeout",server="calc"}' in metrics
    assert 'expertmesh_tool_calls_total{outcome="too_large",server="calc"}' in metrics
    assert 'expertmesh_tool_calls_total{outcome="ok",server="get_weather"}' in metrics
    assert "expertmesh_kv_cache_usage_ratio 0.0" in metrics
