"""MCP servers through ToolRunner (gateway/tools/runner.py, mcp_client.py), against real servers:
an `mcp` MCPServer over streamable HTTP on a free port and one over stdio (tests/data/).

Listing and allowed_tools, calls that reach the server with the model's arguments, the stdio
process spawned once and started again after it dies, and every failure as an error result with
its outcome in the metrics: timeout, a 10 MB answer (cut as it streams), the concurrency cap,
bad arguments, garbage; output truncated to the model's tokens.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx2
import pytest
from tool_servers import STDIO_SERVER, McpHttpServer, run_runner

from expertmesh.gateway.metrics import Metrics
from expertmesh.gateway.tools.mcp_client import CallState, HttpMcpServer, ToolFailure
from expertmesh.gateway.tools.runner import ServerTool, ToolRequestError, ToolRunner


@pytest.fixture(scope="module")
def server():
    with McpHttpServer() as s:
        yield s


def run(registry: dict, body, **kwargs):
    """asyncio.run(body(runner, metrics)) with a started runner over `registry`."""
    return run_runner(registry, body, **kwargs)


def series(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_tools_are_listed_filtered_by_allowed_tools_and_called(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(),
                                 "allowed_tools": ["add", "echo", "weather", "fail"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        assert runner.servers == ["calc"]
        tools = await runner.mcp_tools("calc")
        assert [t.name for t in tools] == ["add", "echo", "fail", "weather"]  # the server's order
        add = tools[0]
        assert (add.kind, add.server, add.description) == ("mcp", "calc", "Add two integers.")
        assert set(add.parameters["properties"]) == {"a", "b"} and add.parameters["type"] == "object"
        assert [t.name for t in await runner.mcp_tools("calc", allowed_tools=["echo", "add"])] == ["add", "echo"]
        with pytest.raises(ToolRequestError, match="allowed_tools names 'big'") as exc:
            await runner.mcp_tools("calc", allowed_tools=["big"], param="tools[2]")  # not allowed by the registry
        assert exc.value.status == 400 and exc.value.param == "tools[2].allowed_tools"
        with pytest.raises(ToolRequestError, match=r"unknown MCP server_label 'calz' \(registered: 'calc'\)") as exc:
            await runner.mcp_tools("calz")
        assert exc.value.param == "tools.server_label"
        with pytest.raises(ToolRequestError, match="headers are for a request-supplied server_url"):
            await runner.mcp_tools("calc", headers={"Authorization": "Bearer x"})

        result = await runner.call(add, json.dumps({"a": 2, "b": 40}))
        assert (result.output, result.error) == ("42", None) and result.duration_s > 0
        assert server.recorder.calls[-1] == ("add", {"a": 2, "b": 40})  # the model's arguments, server-side
        weather = await runner.call(tools[3], '{"city": "Oslo"}')  # structured content only: as JSON
        assert json.loads(weather.output) == {"city": "Oslo", "sky": "clear"}
        failed = await runner.call(tools[2], '{"message": "no luck today"}')  # isError: the model sees it
        assert failed.output is None and "no luck today" in failed.error
        assert series(metrics, "expertmesh_tool_calls_total", server="calc", outcome="ok") == 2
        assert series(metrics, "expertmesh_tool_calls_total", server="calc", outcome="error") == 1

    run(registry, body)


def test_stdio_server_is_spawned_once_kept_and_started_again_after_it_dies(tmp_path):
    log = tmp_path / "calls.jsonl"
    registry = {"mcp_servers": [{"server_label": "io", "command": [sys.executable, str(STDIO_SERVER)],
                                 "env": {"STDIO_TOOL_LOG": str(log)}, "env_from": {"TOOL_SECRET": "EM_TEST_SECRET"},
                                 "timeout_s": 20}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in await runner.mcp_tools("io")}
        assert set(tools) == {"add", "shout", "pid", "secret", "big", "crash"}
        first = (await runner.call(tools["pid"], "")).output
        assert (await runner.call(tools["pid"], "{}")).output == first  # one process, kept
        assert (await runner.call(tools["add"], '{"a": 5, "b": 6}')).output == "11"
        assert json.loads(log.read_text()) == {"a": 5, "b": 6}
        assert (await runner.call(tools["secret"], "")).output == "from-a-secret"  # env_from
        crashed = await runner.call(tools["crash"], "")
        assert crashed.output is None and "connection closed" in crashed.error
        again = await runner.call(tools["pid"], "")  # waits for the new process
        assert again.error is None and again.output != first
        assert runner._mcp["io"].mcp.starts == 2
        assert series(metrics, "expertmesh_tool_calls_total", server="io", outcome="ok") == 5

    run(registry, body, environ={"EM_TEST_SECRET": "from-a-secret"})


def test_a_tool_sleeping_past_its_timeout_is_an_error_and_the_server_stays_usable(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "timeout_s": 0.5}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in await runner.mcp_tools("calc")}
        started = time.monotonic()
        result = await runner.call(tools["sleep"], '{"seconds": 10}')
        assert time.monotonic() - started < 3
        assert result.output is None and result.error == "the tool 'sleep' did not finish within 0.5 s"
        assert series(metrics, "expertmesh_tool_calls_total", server="calc", outcome="timeout") == 1
        assert (await runner.call(tools["add"], '{"a": 1, "b": 1}')).output == "2"

    run(registry, body)


def test_a_10_mb_answer_is_refused_without_being_held(server, tmp_path):
    cap = 64 * 1024
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "timeout_s": 20},
                                {"server_label": "io", "command": [sys.executable, str(STDIO_SERVER)],
                                 "env": {"STDIO_TOOL_LOG": str(tmp_path / "log")}, "allowed_tools": ["crash"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in await runner.mcp_tools("calc")}
        result = await runner.call(tools["big"], json.dumps({"size": 10_000_000}))
        assert result.output is None and result.error == f"the tool's response exceeded {cap} bytes"
        assert series(metrics, "expertmesh_tool_calls_total", server="calc", outcome="too_large") == 1
        # what the transport read of that answer: nothing of it (its Content-Length is over the cap; a body
        # without one is cut as it streams: test_tools_webhooks.py's /big)
        direct = HttpMcpServer(server.url(), {}, httpx2.AsyncHTTPTransport(), cap)
        state = CallState(cap)
        with pytest.raises(ToolFailure, match="exceeded"):
            await direct.call_tool("big", {"size": 10_000_000}, 20, state)
        await direct.aclose()
        assert state.too_large and state.largest_body < cap
        chunked = HttpMcpServer(server.url(), {"X-Chunked": "1"}, httpx2.AsyncHTTPTransport(), cap)
        state = CallState(cap)
        with pytest.raises(ToolFailure, match="exceeded"):
            await chunked.call_tool("big", {"size": 10_000_000}, 20, state)
        await chunked.aclose()
        assert state.too_large and cap < state.largest_body < cap + 256 * 1024  # the cap and a chunk or two
        assert (await runner.call(tools["big"], '{"size": 1000}')).output == "x" * 1000

    run(registry, body, max_bytes=cap)


def test_a_stdio_result_over_the_cap_is_refused(tmp_path):
    registry = {"mcp_servers": [{"server_label": "io", "command": [sys.executable, str(STDIO_SERVER)],
                                 "env": {"STDIO_TOOL_LOG": str(tmp_path / "log")}}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in await runner.mcp_tools("io")}
        result = await runner.call(tools["big"], '{"size": 200000}')
        assert result.error == "the tool's response exceeded 65536 bytes"
        assert series(metrics, "expertmesh_tool_calls_total", server="io", outcome="too_large") == 1
        assert (await runner.call(tools["big"], '{"size": 100}')).output == "z" * 100

    run(registry, body, max_bytes=65536)


def test_the_concurrency_cap_holds_and_waiting_counts_in_the_timeout(server):
    registry = {"mcp_servers": [{"server_label": "two", "url": server.url(), "max_concurrency": 2,
                                 "allowed_tools": ["hold"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        (hold,) = await runner.mcp_tools("two")
        server.recorder.max_in_flight = 0
        results = await asyncio.gather(*(runner.call(hold, '{"seconds": 0.5}') for _ in range(3)))
        assert [r.output for r in results] == ["held"] * 3
        assert server.recorder.max_in_flight == 2  # N + 1 calls, at most N in flight server-side
        assert max(r.duration_s for r in results) >= 0.95  # the third waited for a slot

    run(registry, body)
    one = {"mcp_servers": [{"server_label": "one", "url": server.url(), "max_concurrency": 1, "timeout_s": 1.2,
                            "allowed_tools": ["hold"]}]}

    async def waiting(runner: ToolRunner, metrics: Metrics):
        (hold,) = await runner.mcp_tools("one")
        results = await asyncio.gather(*(runner.call(hold, '{"seconds": 0.7}') for _ in range(2)))
        assert sorted(r.output or "timeout" for r in results) == ["held", "timeout"]
        assert series(metrics, "expertmesh_tool_calls_total", server="one", outcome="timeout") == 1

    run(one, waiting)


def test_bad_arguments_and_garbage_are_error_results(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "allowed_tools": ["add"]},
                                {"server_label": "garbage", "url": server.url(), "headers": {"X-Garbage": "1"},
                                 "allowed_tools": ["echo"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        (add,) = await runner.mcp_tools("calc")
        calls = len(server.recorder.calls)
        for bad, message in (('{"a": 1,', "not valid JSON"), ("[1, 2]", "must be a JSON object, not list"),
                             ('"text"', "not str"), ('{"a": ' * 100_000, "not valid JSON")):
            result = await runner.call(add, bad)
            assert result.output is None and message in result.error
        assert len(server.recorder.calls) == calls  # refused before reaching the server
        wrong = await runner.call(add, '{"a": "one", "b": 2}')  # the server's own validation, as an error result
        assert wrong.output is None and "a" in wrong.error
        (echo,) = await runner.mcp_tools("garbage")
        result = await runner.call(echo, '{"text": "hi"}')
        assert result.output is None and result.error.startswith("MCP error")
        unknown = await runner.call(ServerTool("mcp", "calc", "big", "", {}), "{}")  # not in allowed_tools
        assert "not available" in unknown.error
        assert series(metrics, "expertmesh_tool_calls_total", server="calc", outcome="error") == 6
        assert series(metrics, "expertmesh_tool_calls_total", server="garbage", outcome="error") == 1

    run(registry, body)


def test_metrics_series_and_labels(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "timeout_s": 0.5}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        tools = {t.name: t for t in await runner.mcp_tools("calc")}
        await runner.call(tools["add"], '{"a": 1, "b": 2}')
        await runner.call(tools["sleep"], '{"seconds": 5}')
        text = metrics.render().decode()
        assert 'expertmesh_tool_calls_total{outcome="ok",server="calc"} 1.0' in text
        assert 'expertmesh_tool_calls_total{outcome="timeout",server="calc"} 1.0' in text
        assert 'expertmesh_tool_call_duration_seconds_count{server="calc"} 2.0' in text
        assert 'expertmesh_tool_call_duration_seconds_bucket{le="1.0",server="calc"} 2.0' in text
        assert "# TYPE expertmesh_tool_call_duration_seconds histogram" in text

    run(registry, body)


def test_output_is_truncated_to_the_models_tokens(server, qwen3_moe_path):
    from expertmesh.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(qwen3_moe_path)
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "allowed_tools": ["echo"]}]}
    text = "the quick brown fox jumps over the lazy dog " * 200

    async def body(runner: ToolRunner, metrics: Metrics):
        (echo,) = await runner.mcp_tools("calc")
        result = await runner.call(echo, json.dumps({"text": text}))
        kept, marker = result.output.split("\n[... truncated: ", 1)
        assert marker == f"the tool's output was {len(text)} characters; the first 32 tokens are shown]"
        assert text.startswith(kept) and len(tokenizer.encode(kept)) <= 32 and len(kept) > 32
        short = await runner.call(echo, '{"text": "short"}')
        assert short.output == "short"

    run(registry, body, tokenizer=tokenizer, max_output_tokens=32)


def test_a_cancelled_call_propagates_and_the_server_goes_on(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "allowed_tools": ["sleep", "add"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        sleep, add = sorted(await runner.mcp_tools("calc"), key=lambda t: t.name != "sleep")
        task = asyncio.create_task(runner.call(sleep, '{"seconds": 10}'))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await runner.call(add, '{"a": 3, "b": 4}')).output == "7"

    run(registry, body)
