"""The attacks of issue 10 that reached the engine, replayed against `expertmesh serve` (Ray Serve,
HTTP proxy, gateway and model deployments) started by the test:

- a JSON schema that compiles for minutes, sent while another chat streams (item 2);
- thousands of stop strings (item 7);
- strict json_schema output sampled over 32 seeds (item 12);
- tool_choice "required" cut by max_tokens (item 13).

After them the server is healthy and idle: /health 200, no request running or waiting, no KV
block in use. The caps are raised on this server so the slow schema reaches the compiler, whose
budget is 2 s (tests/test_request_limits.py checks the default caps in-process).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

from expertmesh.bench.serve import wait_healthy
from expertmesh.cluster.collective import free_port

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
HOSTILE = {"type": "object", "properties": {"c": {"enum": [f"value-{i:06d}-{'x' * 29}" for i in range(8000)]}},
           "required": ["c"]}
"""An enum of 8,000 values: about a minute of compiling on the tiny model's vocabulary."""
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}
STRICT = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["name", "tags", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(qwen3_moe_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-guards") / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "expertmesh", "serve", str(qwen3_moe_path), "--port", str(port), "--grpc-port", "0",
           "--max-model-len", "2048", "--num-kv-blocks", "512", "--served-model-name", "tiny",
           "--grammar-compile-timeout-s", str(TIMEOUT_S), "--grammar-max-enum-values", "1000000",
           "--grammar-max-bytes", "100000000"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 180, log)
    except RuntimeError as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(str(exc))
    yield {"base": base, "log": log}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server["base"] + path, json=body, timeout=120)


def chat(server, **body) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **NO_THINK, **body})


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def assert_400(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_slow_schema_gets_a_400_at_its_budget_while_another_chat_streams(server):
    async def run():
        async with httpx.AsyncClient(base_url=server["base"], timeout=300) as http:
            warm = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_json": {
                "type": "integer"}})
            assert warm.status_code == 200, warm.text  # the compiler process is up
            body = {"messages": [{"role": "user", "content": "Stream"}], "max_tokens": 1900, "stream": True,
                    "ignore_eos": True, "temperature": 1.0, "seed": 3, **NO_THINK}
            arrivals, hostile, done_at = [], None, None

            async def attack():
                began = time.perf_counter()
                r = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **NO_THINK,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": HOSTILE}}})
                return began, time.perf_counter(), r

            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 5:
                        hostile = asyncio.create_task(attack())
                    if done_at is None and hostile is not None and hostile.done():
                        done_at = len(arrivals)
                    if done_at is not None and len(arrivals) >= done_at + 3:
                        break  # leaving the stream closes the connection: the request is aborted
            return arrivals, await hostile

    arrivals, (began, ended, response) = asyncio.run(run())
    assert_400(response, "response_format", "grammar_compile_timeout_s")
    assert ended - began >= TIMEOUT_S
    window = [t1 - t0 for t0, t1 in itertools.pairwise(arrivals) if t1 >= began and t0 <= ended]
    assert len(window) >= 3, window
    assert max(window) < TIMEOUT_S / 2, window  # the engine never waited for the compile
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200


def test_stop_string_and_regex_caps(server):
    assert_400(chat(server, max_tokens=4, stop=["x" * 40] * 10_000), "stop", "max_stop_strings")
    assert_400(chat(server, max_tokens=4, stop=["y" * 300]), "stop", "max_stop_string_chars")
    assert_400(post(server, "/v1/completions", {"prompt": "x", "guided_regex": "a" * 5000}), "guided_regex",
               "grammar_max_regex_chars")
    r = chat(server, max_tokens=4, stop=[f"{i:02d}" * 8 for i in range(16)])
    assert r.status_code == 200, r.text


def test_strict_json_schema_output_parses_for_every_seed(server):
    async def one(http: httpx.AsyncClient, seed: int) -> httpx.Response:
        return await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Reply in JSON"}], "max_tokens": 200, "temperature": 1.0,
            "seed": seed, **NO_THINK,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": STRICT, "strict": True}}})

    async def run():
        async with httpx.AsyncClient(base_url=server["base"], timeout=300) as http:
            return await asyncio.gather(*(one(http, seed) for seed in range(32)))

    for seed, r in enumerate(asyncio.run(run())):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice["message"]["content"], strict=True), STRICT)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_cut_by_max_tokens_leaves_no_markup_in_content(server, stream):
    cut = 0
    for seed, max_tokens in itertools.product(range(4), (3, 8, 14, 20)):
        r = chat(server, tools=[WEATHER], tool_choice="required", max_tokens=max_tokens, temperature=1.0,
                 seed=seed, stream=stream)
        assert r.status_code == 200, r.text
        if stream:
            chunks = sse(r)
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            calls = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls") or []]
            finish = next(c["choices"][0]["finish_reason"] for c in chunks[::-1]
                          if c["choices"] and c["choices"][0]["finish_reason"])
        else:
            choice = r.json()["choices"][0]
            content, calls, finish = choice["message"]["content"] or "", choice["message"].get("tool_calls") or [], \
                choice["finish_reason"]
        assert "tool_call" not in content and "<" not in content, (seed, max_tokens, content)
        assert content == "", (seed, max_tokens, content)  # "required": the reply is calls only
        for call in calls:
            assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
        assert finish in ("length", "tool_calls")
        cut += finish == "length"
    assert cut >= 4  # the cuts did land inside calls


def test_after_the_attacks_the_server_is_healthy_and_idle(server):
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200
    deadline = time.time() + 30
    names = ("expertmesh_num_requests_running", "expertmesh_num_requests_waiting", "expertmesh_kv_cache_usage_ratio")
    while time.time() < deadline and any(metric(server["base"], n) for n in names):
        time.sleep(0.5)
    assert [metric(server["base"], n) for n in names] == [0.0, 0.0, 0.0]
    r = chat(server, max_tokens=4)
    assert r.status_code == 200, r.text
    assert "Traceback" not in server["log"].read_text()
