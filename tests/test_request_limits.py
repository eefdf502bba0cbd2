"""No single request stalls the engine or slows everyone: grammar compiles run in compiler
processes with a time budget, constraints and stop strings are capped, and each refusal is a 400
with OpenAI's error object naming the setting. In-process (no Ray Serve): the serving layer and its
HTTP app over the async engine on the embedded tiny model; tests/test_serve_guards.py replays the
same attacks against `expertmesh serve`.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest
from conftest import local_serving

from expertmesh.engine.sampling_params import GuidedDecodingParams, SamplingParams, ToolCallConstraint
from expertmesh.gateway.http import build_http_app
from expertmesh.gateway.protocol import ChatCompletionRequest

TIMEOUT_S = 2.0
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def enum_schema(n: int) -> dict:
    """A schema whose one property has n enum values: it compiles in about 3 s for 3,000 values,
    and for minutes past 10,000 (superlinear), on the tiny model's vocabulary."""
    return {"type": "object", "properties": {"c": {"enum": [f"value-{i:06d}-{'x' * 29}" for i in range(n)]}},
            "required": ["c"]}


HOSTILE = enum_schema(8000)


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def rig_with_http(**llm_kwargs):
    """local_serving plus `post(path, body)` through the HTTP app (ASGI, in-process). The body limit
    is raised well past the hostile schemas here, so the grammar caps are what answers (the body
    limit has its own tests in test_gateway_guards.py)."""
    cm = local_serving(max_model_len=2048, **llm_kwargs)
    rig = cm.__enter__()
    app = build_http_app(rig.serving, max_body_bytes=64 << 20)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120)
    rig.http = http
    rig.post = lambda path, body: rig.run(http.post(path, json=body))
    return cm, rig


@pytest.fixture(scope="module")
def guarded():
    """The default caps."""
    cm, rig = rig_with_http()
    yield rig
    rig.run(rig.http.aclose())
    cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def lenient():
    """Caps raised so a slow schema reaches the compiler; a 2 s compile budget."""
    cm, rig = rig_with_http(grammar_compile_timeout_s=TIMEOUT_S, grammar_max_enum_values=10**6,
                            grammar_max_bytes=10**8)
    yield rig
    rig.run(rig.http.aclose())
    cm.__exit__(None, None, None)


def assert_400(response: httpx.Response, param: str, *words: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def assert_idle(rig) -> None:
    """Nothing of any request is left in the engine: no request, no KV block, no stream, no compile."""
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = rig.engine.stats()
        if (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0) \
                and not rig.engine.core.has_unfinished():
            break
        time.sleep(0.05)
    stats = rig.engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0), stats
    core = rig.engine.core
    assert not core._parents and not core._sequences and not core._guides
    assert not rig.engine._streams


# ---- stop strings --------------------------------------------------------------------------------------

def test_stop_string_caps_are_a_400_naming_the_limit(guarded):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **NO_THINK}
    assert_400(guarded.post("/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(17)]}),
               "stop", "17 stop strings", "max_stop_strings")
    assert_400(guarded.post("/v1/completions", {"prompt": "x", "stop": ["y" * 257]}),
               "stop", "257 characters", "max_stop_string_chars")
    assert_400(guarded.post("/v1/chat/completions", {**chat, "stop": ["x" * 40] * 10_000}),  # the attack
               "stop", "max_stop_strings")
    ok = guarded.post("/v1/chat/completions", {**chat, "stop": [f"{i:03d}" + "z" * 253 for i in range(16)]})
    assert ok.status_code == 200, ok.text
    assert_idle(guarded)


# ---- grammar caps ---------------------------------------------------------------------------------------

def test_grammar_caps_are_a_400_before_any_compile(guarded):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **NO_THINK}
    began = time.perf_counter()
    assert_400(guarded.post("/v1/chat/completions", {**chat, "response_format": response_format(enum_schema(100_000))}),
               "response_format", "grammar_max_bytes")  # the attack of the issue: 4.6 MB of schema
    short = {"type": "object", "properties": {"a": {"enum": list(range(600))}, "b": {"enum": list(range(400))},
                                              "c": {"const": 1}}}
    assert_400(guarded.post("/v1/chat/completions", {**chat, "response_format": response_format(short)}),
               "response_format", "1001 enum values", "grammar_max_enum_values")
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer", "description": "d" * 100}
                                            for i in range(2000)}}
    assert_400(guarded.post("/v1/chat/completions", {**chat, "response_format": response_format(big)}),
               "response_format", "bytes", "grammar_max_bytes")
    assert_400(guarded.post("/v1/completions", {"prompt": "x", "guided_regex": "a" * 5000}),
               "guided_regex", "5000 characters", "grammar_max_regex_chars")
    assert_400(guarded.post("/v1/completions", {"prompt": "x", "guided_choice": [f"c{i}" for i in range(1001)]}),
               "guided_choice", "1001 choices", "grammar_max_enum_values")
    assert_400(guarded.post("/v1/completions", {"prompt": "x", "guided_grammar": 'root ::= "a"' + " " * 200_000}),
               "guided_grammar", "grammar_max_bytes")
    # Tools go into the prompt as well (where max_model_len bounds them); the engine caps them on its own.
    tools = ToolCallConstraint([{"name": "f", "parameters": short}, {"name": "g", "parameters": short}])
    with pytest.raises(ValueError, match=r"tool_calls: the tools' parameter schemas together has 2002 enum values.*"
                                         r"grammar_max_enum_values"):
        guarded.engine.core.prepare([1, 2, 3], SamplingParams(guided_decoding=GuidedDecodingParams(tool_calls=tools)))
    assert time.perf_counter() - began < 30  # refused on sight: none of these was compiled
    assert guarded.engine.core.grammar_backend.num_compiling == 0
    assert_idle(guarded)


# ---- a slow grammar while another request streams ---------------------------------------------------------

def test_slow_grammar_is_refused_at_its_budget_while_other_tokens_keep_flowing(lenient):
    """The attack of the issue (an enum that compiles for minutes), with a stream running: the
    stream's gaps stay far below the compile time, the engine keeps stepping, the hostile request
    gets a 400 naming grammar_compile_timeout_s once its budget is spent, and nothing is left."""
    rig = lenient
    warm = rig.post("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                        "response_format": response_format({"type": "integer"})})
    assert warm.status_code == 200, warm.text  # the compiler process is up (its start is not the budget)

    async def scenario():
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "Stream please"}], stream=True,
                                    max_tokens=2000, temperature=1.0, seed=1, ignore_eos=True, **NO_THINK)
        chunks = await rig.serving.chat(req)
        arrivals, hostile, steps, done_at = [], None, [], None

        async def attack():
            began = time.perf_counter()
            response = await rig.http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
                "response_format": response_format(HOSTILE), **NO_THINK})
            return began, time.perf_counter(), response

        try:
            async for _ in chunks:
                arrivals.append(time.perf_counter())
                steps.append(rig.engine.core.num_steps)
                if len(arrivals) == 5:
                    hostile = asyncio.create_task(attack())
                if done_at is None and hostile is not None and hostile.done():
                    done_at = len(arrivals)
                if done_at is not None and len(arrivals) >= done_at + 3:
                    break
        finally:
            await chunks.aclose()  # leaving early aborts the stream's request
        return arrivals, steps, await hostile

    arrivals, steps, (began, ended, response) = rig.run(scenario())
    assert_400(response, "response_format", "grammar_compile_timeout_s", f"{TIMEOUT_S:g} s")
    assert ended - began >= TIMEOUT_S
    window = [(t1 - t0) for t0, t1 in itertools.pairwise(arrivals) if t1 >= began and t0 <= ended]
    assert len(window) >= 3, window  # the stream went on while the schema compiled
    assert max(window) < TIMEOUT_S / 2, window  # far below the compile's time: nobody waited for it
    assert steps[-1] > steps[4]
    assert rig.engine.core.grammar_backend.pool.num_killed >= 1  # the compile was abandoned, not left running
    assert_idle(rig)
    ok = rig.post("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                      "response_format": response_format(enum_schema(3))})
    assert ok.status_code == 200, ok.text  # a fresh compiler process took over


def test_request_aborted_while_its_grammar_compiles_leaves_nothing(lenient):
    rig = lenient
    backend = rig.engine.core.grammar_backend
    schema = enum_schema(2900)  # about 3 s, within a budget raised for this test
    backend.pool.timeout_s = 120.0
    try:
        async def leave_early():
            req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        response_format=response_format(schema), **NO_THINK)
            task = asyncio.create_task(rig.serving.chat(req))
            for _ in range(200):
                if backend.num_compiling:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert not task.done() and backend.num_compiling == 1  # still compiling
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        rig.run(leave_early())
        deadline = time.time() + 60
        while backend.num_compiling and time.time() < deadline:
            time.sleep(0.1)
        assert backend.num_compiling == 0
        assert_idle(rig)  # the compiled grammar went to the cache only: no request, guide or stream
    finally:
        backend.pool.timeout_s = TIMEOUT_S
