"""The served application end to end: `expertmesh serve` (Ray Serve, HTTP proxy, gateway and model
deployments, gRPC) started by the test, driven with the official `openai` client.

The model is the tiny Qwen3-MoE checkpoint with a Qwen3-2507-style template (thinking on puts
`<think>\\n` into the prompt), so a random-weight model still exercises reasoning_content and the
thinking budget. Constrained decoding is what makes its tool calls and JSON valid.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest

from expertmesh.bench.serve import wait_healthy
from expertmesh.cluster.collective import free_port
from expertmesh.model.tokenizer import Tokenizer

KEY = "sk-expertmesh-test"
MAX_MODEL_LEN = 1024
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(thinking_model_path, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "expertmesh", "serve", str(thinking_model_path), "--port", str(port),
           "--grpc-port", str(grpc_port), "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN),
           "--num-kv-blocks", "1024", "--served-model-name", "tiny-qwen3"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 180, log)
    except RuntimeError as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(str(exc))
    yield {"base": base, "grpc_port": grpc_port, "log": log}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(thinking_model_path):
    return Tokenizer.from_pretrained(thinking_model_path)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


# ---- models, chat, completions -----------------------------------------------------------------

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen3"]
    assert client.models.retrieve("tiny-qwen3").id == "tiny-qwen3"


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Hello"), max_tokens=12, temperature=0,
                                       extra_body=NO_THINK)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    kwargs = dict(model="tiny-qwen3", messages=user("Tell me about experts"), max_completion_tokens=16,
                  temperature=0, extra_body=NO_THINK)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_n_seed_logprobs_and_stop(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Hi"), n=3, max_tokens=8, seed=7,
                                       temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                       logprobs=True, top_logprobs=3, extra_body=NO_THINK)
    again = client.chat.completions.create(model="tiny-qwen3", messages=user("Hi"), n=3, max_tokens=8, seed=7,
                                           temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                           extra_body=NO_THINK)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    for c in r.choices:
        assert len(c.logprobs.content) == 8 or c.finish_reason == "stop"
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)

    text = client.chat.completions.create(model="tiny-qwen3", messages=user("Hi"), max_tokens=24, temperature=0,
                                          extra_body=NO_THINK).choices[0].message.content
    stop = text[4:7]
    stopped = client.chat.completions.create(model="tiny-qwen3", messages=user("Hi"), max_tokens=24, temperature=0,
                                             stop=[stop], extra_body=NO_THINK).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == text[:text.index(stop)]


def test_completions(client):
    r = client.completions.create(model="tiny-qwen3", prompt=["Experts are", "Routing is"], max_tokens=6,
                                  temperature=0, logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Experts are") and r.choices[1].text.startswith("Routing is")
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens // 2
    stream = client.completions.create(model="tiny-qwen3", prompt="Experts are", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "Experts are" + streamed == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens // 2


# ---- thinking --------------------------------------------------------------------------------

def test_thinking_on_goes_to_reasoning_content(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Think first"), max_tokens=10,
                                       temperature=0)
    message = r.choices[0].message
    reasoning = message.model_extra.get("reasoning_content")
    assert reasoning, "with thinking on, the output starts inside <think>"
    assert "<think>" not in (message.content or "") and "</think>" not in (message.content or "")


def test_thinking_off_has_no_reasoning(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Answer directly"), max_tokens=10,
                                       temperature=0, extra_body=NO_THINK)
    assert r.choices[0].message.model_extra.get("reasoning_content") is None
    assert r.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_budget_of_8_tokens(client, tokenizer, stream):
    kwargs = dict(model="tiny-qwen3", messages=user("Think, then answer"), max_tokens=40, temperature=0,
                  logprobs=True, extra_body={"thinking_budget": 8})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        tokens = [t.token for t in r.choices[0].logprobs.content]
        reasoning, content = r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content
    assert tokens.index("</think>") == 8  # exactly 8 thinking tokens, then the engine closed the block
    assert reasoning and content is not None and "</think>" not in content
    assert len(tokens) > 9  # the answer followed


# ---- tools -----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 16}, "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["query", "limit"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}


def check_calls(message, names: set[str]) -> None:
    assert message.tool_calls, f"expected tool calls, got content {message.content!r}"
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required_always_calls_a_tool(client, seed):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Weather in Paris?"), tools=[WEATHER, SEARCH],
                                       tool_choice="required", max_tokens=160, temperature=1.0, seed=seed,
                                       extra_body=NO_THINK)
    check_calls(r.choices[0].message, {"get_weather", "search"})
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_that_tool(client, stream):
    kwargs = dict(model="tiny-qwen3", messages=user("Find something"), tools=[WEATHER, SEARCH],
                  tool_choice={"type": "function", "function": {"name": "search"}}, max_tokens=160, temperature=0.8,
                  seed=3, extra_body=NO_THINK)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        check_calls(r.choices[0].message, {"search"})
        return
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and all(tc.function.name == "search" for tc in calls)
    for tc in calls:
        jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS["search"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_required_tool_call_after_thinking_budget(client):
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Weather?"), tools=[WEATHER],
                                       tool_choice="required", max_tokens=200, temperature=0,
                                       extra_body={"thinking_budget": 4})
    assert r.choices[0].message.model_extra["reasoning_content"]
    check_calls(r.choices[0].message, {"get_weather"})


def test_tool_results_round_trip(client):
    messages = [*user("Weather in Oslo?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'}]
    r = client.chat.completions.create(model="tiny-qwen3", messages=messages, tools=[WEATHER], max_tokens=8,
                                       extra_body=NO_THINK)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- structured output -------------------------------------------------------------------------

JSON_SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "tags": {
            "type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
        "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                     "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"], "additionalProperties": False},
    "numeric_bounds": {"type": "object", "properties": {
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
        "required": ["ratio", "count"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False},
    "ref": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
    "booleans_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
                          "required": ["ok", "nothing"], "additionalProperties": False},
    "const_and_pattern": {"type": "object", "properties": {
        "kind": {"const": "point"}, "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
        "required": ["kind", "code"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 4},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5},
                                                         "b": {"type": "string", "maxLength": 3}},
                        "required": ["a"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(JSON_SCHEMAS))
def test_strict_json_schema_output_validates(client, name):
    schema = JSON_SCHEMAS[name]
    r = client.chat.completions.create(
        model="tiny-qwen3", messages=user("Reply in JSON"), max_tokens=200, temperature=0.7, seed=11,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_after_thinking(client):
    schema = JSON_SCHEMAS["enum"]
    r = client.chat.completions.create(
        model="tiny-qwen3", messages=user("Think, then reply in JSON"), max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema, "strict": True}},
        extra_body={"thinking_budget": 6})
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"]  # the grammar left the thinking free
    jsonschema.validate(json.loads(message.content), schema)


def test_json_object_regex_choice_and_grammar(client):
    # Any JSON object: nothing bounds its strings, so a random model may run out of tokens inside one;
    # every reply that ends must parse, and some do.
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("JSON please"), max_tokens=300,
                                       temperature=0.3, seed=1, n=4, response_format={"type": "json_object"},
                                       extra_body=NO_THINK)
    ended = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(r.choices) == 4 and ended, [c.message.content for c in r.choices]
    assert all(isinstance(json.loads(text), dict) for text in ended)
    assert all(c.message.content.lstrip().startswith("{") for c in r.choices)
    r = client.completions.create(model="tiny-qwen3", prompt="Code:", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"guided_regex": "[A-Z]{3}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", r.choices[0].text)
    r = client.chat.completions.create(model="tiny-qwen3", messages=user("Pick"), max_tokens=20, temperature=1.0,
                                       extra_body={"guided_choice": ["alpha", "beta", "gamma"], **NO_THINK})
    assert r.choices[0].message.content in ("alpha", "beta", "gamma")
    grammar = 'root ::= "yes" | "no" | ("maybe " [0-9])'
    r = client.completions.create(model="tiny-qwen3", prompt="Answer:", max_tokens=10, temperature=1.0, seed=5,
                                  extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"yes|no|maybe [0-9]", r.choices[0].text)


# ---- errors and auth -----------------------------------------------------------------------------

def post(server, path: str, body, key: str | None = KEY, raw: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["base"] + path, content=body, headers=headers, timeout=60)
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None = None, words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"] and words.lower() in error["message"].lower()
    if param is not None:
        assert error["param"] == param
    return error


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_bad_requests_get_openai_errors(server):
    long_prompt = "expert " * 1500
    assert_error(post(server, "/v1/chat/completions", b'{"messages": [', raw=True), 400, words="JSON")
    assert_error(post(server, "/v1/chat/completions", {"messages": "hi"}), 400, param="messages")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "temperature": "hot"}), 400, param="temperature")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-5"}), 404, param="model",
                 words="does not exist")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "messages": user(long_prompt)}), 400,
                 param="messages", words="maximum context length")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 100_000}), 400, param="max_tokens",
                 words="too large")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "n": 64}), 400, param="n")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "logit_bias": {"5": 10}}), 400, param="logit_bias")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "response_format": bad_schema}), 400,
                 param="response_format")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "guided_regex": "([a-z"}), 400,
                 param="guided_regex")
    named = {"type": "function", "function": {"name": "nope"}}
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": named}), 400,
                 param="tool_choice", words="nope")
    orphan = [*user("hi"), {"role": "tool", "tool_call_id": "call_9", "content": "42"}]
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "messages": orphan}), 400, words="tool")
    assert_error(post(server, "/v1/nothing", {}), 404)


def test_api_keys(server):
    assert_error(post(server, "/v1/chat/completions", CHAT, key=None), 401, words="API key")
    assert_error(post(server, "/v1/chat/completions", CHAT, key="sk-wrong"), 401, words="Incorrect API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(server["base"] + "/health").status_code == 200  # open
    assert httpx.get(server["base"] + "/metrics").status_code == 200  # open


def test_metrics(server, client):
    client.chat.completions.create(model="tiny-qwen3", messages=user("count me"), max_tokens=4, extra_body=NO_THINK)
    text = httpx.get(server["base"] + "/metrics").text
    for name in ("expertmesh_requests_total", "expertmesh_time_to_first_token_seconds_bucket",
                 "expertmesh_inter_token_latency_seconds_bucket", "expertmesh_prompt_tokens_total",
                 "expertmesh_generation_tokens_total", "expertmesh_num_requests_running",
                 "expertmesh_num_requests_waiting", "expertmesh_kv_cache_usage_ratio",
                 'expertmesh_expert_load_imbalance{layer="0"}', 'expertmesh_expert_routed_tokens_total{expert="0"'):
        assert name in text, name
    assert re.search(r'expertmesh_requests_total\{endpoint="chat",status="200"\} [1-9]', text)
    assert re.search(r'expertmesh_requests_total\{endpoint="chat",status="40[04]"\} [1-9]', text)


def requests_total(base: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(e, s): float(v) for e, s, v in
            re.findall(r'^expertmesh_requests_total\{endpoint="([^"]+)",status="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_refused_requests_are_counted_with_their_status(server, client):
    """Refusals the serving layer raises before the engine (400, 404) and the auth's 401 are counted."""
    before = requests_total(server["base"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-qwen3", messages=user("hi"), max_tokens=2, n=64)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
            model="tiny-qwen3", messages=user("hi"), max_tokens=2)
    after = requests_total(server["base"])
    for status in ("400", "404", "401"):
        assert after.get(("chat", status), 0) - before.get(("chat", status), 0) == 1, (status, after)


# ---- many streams, half of them cancelled ------------------------------------------------------------

def test_100_concurrent_streams_half_disconnected_free_every_block(server):
    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"messages": user(f"Stream number {i}"), "max_tokens": 48, "stream": True, "temperature": 1.0,
                "seed": i, "ignore_eos": True, "stream_options": {"include_usage": True}, **NO_THINK}
        chunks = tokens = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done", tokens
                chunk = json.loads(line[len("data: "):])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                chunks += 1
                if i % 2 == 1 and chunks == 3:
                    return "left", chunks  # leaves the `async with`: the connection is closed mid-stream
        return "cut", chunks

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server["base"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(100)))

    results = asyncio.run(run())
    assert [r[0] for r in results[0::2]] == ["done"] * 50
    assert [n for _, n in results[0::2]] == [48] * 50  # every finished stream got all its tokens
    assert [r[0] for r in results[1::2]] == ["left"] * 50
    deadline = time.time() + 30
    while time.time() < deadline:
        if (metric(server["base"], "expertmesh_kv_cache_usage_ratio") == 0.0
                and metric(server["base"], "expertmesh_num_requests_running") == 0.0):
            break
        time.sleep(0.5)
    assert metric(server["base"], "expertmesh_kv_cache_usage_ratio") == 0.0
    assert metric(server["base"], "expertmesh_num_requests_running") == 0.0
    assert metric(server["base"], "expertmesh_num_requests_waiting") == 0.0
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]


# ---- gRPC through the served app ------------------------------------------------------------------

def test_grpc_on_the_served_app(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
    from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.ExpertMeshStub(channel)
        request = pb.ChatCompletionRequest(messages=[pb.ChatMessage(role="user", content="hi")])
        request.sampling.max_tokens = 5
        request.sampling.temperature = 0.0
        request.chat_template_kwargs.enable_thinking = False
        reply = stub.ChatCompletion(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 5
        with pytest.raises(grpc.RpcError) as err:
            stub.ChatCompletion(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _listening_hosts(port: int) -> set[str]:
    """Local addresses of the sockets listening on TCP `port` (from `ss`; IPv4-mapped IPv6 as IPv4)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    hosts = {line.split()[3].rpartition(":")[0] for line in out.splitlines() if line.strip()}
    return {h.removeprefix("[::ffff:").removesuffix("]") if h.startswith("[::ffff:") else h for h in hosts}


def _other_interface_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return next((a for a in addresses if not a.startswith("127.")), None)


def test_grpc_binds_the_http_host_and_the_banner_says_so(server):
    """`serve` with the default --host 127.0.0.1: gRPC listens on loopback only, as HTTP does (no other
    interface reaches it), and the banner names the addresses actually bound."""
    import socket

    port = server["grpc_port"]
    assert _listening_hosts(port) == {"127.0.0.1"}
    other = _other_interface_address()
    if other is not None:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((other, port), timeout=5):
            pass
    deadline = time.monotonic() + 120
    while "gRPC  " not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = server["log"].read_text()
    assert f"gRPC  127.0.0.1:{port}  (bound to 127.0.0.1:{port}, this machine only;" in log
    http_port = server["base"].rpartition(":")[2]
    assert f"HTTP  http://127.0.0.1:{http_port}/v1  (bound to 127.0.0.1:{http_port}, this machine only;" in log


# ---- schemathesis ---------------------------------------------------------------------------------

def test_schemathesis_finds_no_server_error(server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server['base']}/openapi.json",
           "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {KEY}", "--max-examples", "25",
           "--max-time", "90", "--workers", "2", "--seed", "20261130", "--request-timeout", "60",
           "--generation-database", "none"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
