"""`/v1/responses` with the tiny model (CPU) through the official `openai` client against the HTTP app
served by uvicorn on a free port, and the gRPC Responses RPCs beside it; server-side tools come from
a fake runner (the runner's contract, no network: tests/responses_rig.py).

With `tool_choice` forcing a tool, the loop calls it with the model's arguments and the response
holds the call's item, then a final message (its `text.format` a tiny enum, so the random model
finishes it in a few tokens); a client function call comes back as a function_call item and the
conversation goes on through previous_response_id; limits, owners and hostile values end as
documented items or 4xx OpenAI errors, and a stream the client cuts frees every KV block.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
from conftest import local_serving
from responses_rig import ANSWER, LOOKUP, FakeRunner, http_server, wait_idle

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.grpc_server import build_grpc_server
from expertmesh.gateway.http import build_http_app
from expertmesh.gateway.responses import ResponsesServing
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

KEY_A, KEY_B = "sk-responses-a", "sk-responses-b"
AUTH = (("authorization", f"Bearer {KEY_A}"),)
CALC = {"type": "mcp", "server_label": "calc", "require_approval": "never"}
FORCE_ADD = {"type": "mcp", "server_label": "calc", "name": "add"}
INTERNAL_NAMES = re.compile(r"\b\w*(Error|Exception)\b|Traceback|<class |File \"|pydantic|\.py\b")
# Forced call, then a final message in a tiny format: greedy, no thinking, a budget far above what it takes.
BASE = dict(model="tiny", input="What is 1+2?", tools=[CALC], tool_choice=FORCE_ADD, max_output_tokens=200,
            temperature=0, reasoning={"effort": "none"}, text={"format": ANSWER})


@pytest.fixture(scope="module")
def live():
    with local_serving(max_model_len=1024) as rig:
        runner = FakeRunner()
        auth = Authenticator([KEY_A, KEY_B])
        responses = ResponsesServing(rig.serving, runner)
        port = free_port()

        async def start():
            server = build_grpc_server(rig.serving, auth, port, responses=responses)
            await server.start()
            return server

        server = rig.run(start())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with http_server(build_http_app(rig.serving, auth, responses=responses)) as base:
            def client(key: str) -> openai.OpenAI:
                return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120)
            try:
                yield SimpleNamespace(a=client(KEY_A), b=client(KEY_B), http=http, runner=runner, engine=rig.engine,
                                      stub=pb_grpc.ExpertMeshStub(channel), tokenizer=rig.tokenizer)
            finally:
                http.close()
                channel.close()
                rig.run(server.stop(None))


def items(output) -> list[dict]:
    """Output items as plain dicts, without their ids (fresh in every response) and None values (the
    client's models add fields of their own, such as a parsed text)."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        return [plain(v) for v in value] if isinstance(value, list) else value

    dumped = [i if isinstance(i, dict) else i.model_dump() for i in output]
    return [{k: v for k, v in plain(i).items() if k != "id"} for i in dumped]


def test_a_forced_mcp_call_runs_and_a_final_message_follows(live):
    r = live.a.responses.create(**BASE)
    assert r.status == "completed" and [i.type for i in r.output] == ["mcp_call", "message"]
    call = r.output[0]
    assert live.runner.calls[-1] == ("add", call.arguments)  # the runner got the model's arguments
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"a", "b"} and {arguments["a"], arguments["b"]} <= {1, 2, 3}
    assert (call.server_label, call.name, call.status) == ("calc", "add", "completed")
    assert call.output == f"add ok: {call.arguments}" and call.error is None
    assert json.loads(r.output_text)["answer"] in ("yes", "no")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 200
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.store and r.model == "tiny" and r.id.startswith("resp_")

    events = list(live.a.responses.create(stream=True, **BASE))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert {"response.mcp_call_arguments.delta", "response.mcp_call.in_progress", "response.mcp_call.completed",
            "response.output_text.delta", "response.output_text.done"} <= set(types)
    assert items(events[-1].response.output) == items(r.output)  # stream and unary: the same items

    with live.a.responses.stream(**BASE) as stream:  # the client's helper accumulates the response
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert items(final.output) == items(r.output) and final.output_text == text == r.output_text
    assert wait_idle(live.engine)["kv_usage"] == 0.0


def test_a_webhook_call_is_its_own_item(live):
    events = list(live.a.responses.create(stream=True, **{
        **BASE, "tools": [{"type": "webhook", "name": "get_weather"}],
        "tool_choice": {"type": "webhook", "name": "get_weather"}}))
    types = [e.type for e in events]
    assert {"response.webhook_call_arguments.done", "response.webhook_call.in_progress",
            "response.webhook_call.completed"} <= set(types) and types[-1] == "response.completed"
    final = events[-1].response
    call = final.output[0]
    assert [i.type for i in final.output] == ["webhook_call", "message"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    assert call.output == f"get_weather ok: {call.arguments}" and live.runner.calls[-1] == ("get_weather",
                                                                                           call.arguments)


def test_a_function_call_goes_back_to_the_client_and_the_conversation_goes_on(live):
    calls_before = len(live.runner.calls)
    first = live.a.responses.create(**{**BASE, "tools": [LOOKUP], "tool_choice": {"type": "function",
                                                                                  "name": "lookup"}})
    assert first.status == "completed" and [i.type for i in first.output] == ["function_call"]
    fc = first.output[0]
    assert fc.name == "lookup" and json.loads(fc.arguments)["word"] in ("moe", "ray")
    assert len(live.runner.calls) == calls_before  # the client runs it, not the server
    second = live.a.responses.create(**{**BASE, "tools": [LOOKUP], "tool_choice": "auto",
                                        "previous_response_id": first.id,
                                        "input": [{"type": "function_call_output", "call_id": fc.call_id,
                                                   "output": "a sparse mixture of experts"}]})
    assert second.status == "completed" and second.previous_response_id == first.id
    assert [i.type for i in second.output] == ["message"]
    assert second.usage.input_tokens > first.usage.input_tokens  # it read the first turn and the output
    listed = live.a.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in listed.data] == ["message", "function_call", "function_call_output"]
    assert listed.data[1].call_id == fc.call_id and listed.data[2].output == "a sparse mixture of experts"
    newest = live.a.responses.input_items.list(second.id, limit=1)  # OpenAI's default order: newest first
    assert [i.type for i in newest.data] == ["function_call_output"] and newest.has_more


def test_the_round_limit_ends_the_response_with_an_error_item(live):
    calls_before = len(live.runner.calls)
    r = live.a.responses.create(**BASE, max_tool_calls=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"
    (call,) = r.output
    assert call.type == "mcp_call" and call.status == "incomplete" and "max_tool_calls" in call.error
    assert len(live.runner.calls) == calls_before


def test_max_output_tokens_counts_every_turn(live):
    first_turn = live.a.responses.create(**BASE, max_tool_calls=0).usage.output_tokens
    r = live.a.responses.create(**{**BASE, "max_output_tokens": first_turn + 4})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == first_turn + 4
    assert [(i.type, i.status) for i in r.output] == [("mcp_call", "completed"), ("message", "incomplete")]


def test_another_owners_response_is_not_found(live):
    r = live.a.responses.create(**BASE)
    assert live.a.responses.retrieve(r.id).output_text == r.output_text
    for call in (lambda: live.b.responses.retrieve(r.id), lambda: live.b.responses.delete(r.id),
                 lambda: live.b.responses.input_items.list(r.id),
                 lambda: live.b.responses.create(**{**BASE, "previous_response_id": r.id})):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert r.id in info.value.message or "not found" in info.value.message
    live.a.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        live.a.responses.retrieve(r.id)
    unstored = live.a.responses.create(**BASE, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        live.a.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as info:
        live.a.responses.create(**{**BASE, "previous_response_id": unstored.id})
    assert info.value.body["param"] == "previous_response_id"


# ---- hostile values ------------------------------------------------------------------------------

def nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth - 1):
        value = {"type": "array", "items": value}
    return value


FN = {"type": "function", "name": "f", "parameters": {"type": "object"}}
HOSTILE = [  # (id, body (dict, or raw bytes), status, param (None: not checked))
    ("deep-parameters", {"input": "x", "tools": [{**FN, "parameters": nested(900)}]}, 400, None),
    ("deep-arguments", {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                   "arguments": json.dumps(nested(200))},
                                  {"type": "function_call_output", "call_id": "c", "output": "ok"}]}, 400, "input"),
    ("unknown-item-type", {"input": [{"type": "computer_call", "id": "x"}]}, 400, "input[0]"),
    ("image-part", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input[0].content[0]"),
    ("empty-input", {"input": []}, 400, "input"),
    ("context-overflow", {"input": "word " * 3000}, 400, "input"),
    ("tool-choice-absent-function", {"input": "x", "tools": [LOOKUP], "tool_choice": {"type": "function",
                                                                                      "name": "nope"}},
     400, "tool_choice"),
    ("tool-choice-absent-webhook", {"input": "x", "tool_choice": {"type": "webhook", "name": "get_weather"}}, 400,
     "tool_choice"),
    ("tool-choice-absent-mcp-tool", {"input": "x", "tools": [CALC], "tool_choice": {**FORCE_ADD, "name": "mul"}},
     400, "tool_choice"),
    ("tool-choice-unknown", {"input": "x", "tool_choice": "maybe"}, 400, "tool_choice"),
    ("previous-id-garbage", {"input": "x", "previous_response_id": "../../etc"}, 404, "previous_response_id"),
    ("previous-id-unknown", {"input": "x", "previous_response_id": "resp_" + "0" * 48}, 404, "previous_response_id"),
    ("previous-id-100kb", {"input": "x", "previous_response_id": "resp_" + "a" * 100_000}, 400,
     "previous_response_id"),
    ("previous-id-number", {"input": "x", "previous_response_id": 7}, 400, "previous_response_id"),
    ("call-id-100kb", {"input": [{"type": "function_call_output", "call_id": "c" * 100_000, "output": "x"}]}, 400,
     "input[0].call_id"),
    ("output-answers-no-call", {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "x"}]},
     400, "input[0].call_id"),
    ("unknown-mcp-server", {"input": "x", "tools": [{**CALC, "server_label": "nope"}]}, 400, "tools[0]"),
    ("request-supplied-mcp-url", {"input": "x", "tools": [{**CALC, "server_url": "http://127.0.0.1:1/mcp"}]}, 400,
     "tools[0]"),
    ("unknown-allowed-tool", {"input": "x", "tools": [{**CALC, "allowed_tools": ["mul"]}]}, 400, "tools[0]"),
    ("approval-always", {"input": "x", "tools": [{**CALC, "require_approval": "always"}]}, 400,
     "tools[0].require_approval"),
    ("unknown-webhook", {"input": "x", "tools": [{"type": "webhook", "name": "nope"}]}, 400, "tools[0]"),
    ("unknown-tool-type", {"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0]"),
    ("name-collision", {"input": "x", "tools": [{**FN, "name": "add"}, CALC]}, 400, "tools[1]"),
    ("max-output-tokens-0", {"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ("max-output-tokens-string", {"input": "x", "max_output_tokens": "5"}, 400, "max_output_tokens"),
    ("max-output-tokens-huge", {"input": "x", "max_output_tokens": 2**63}, 400, "max_output_tokens"),
    ("temperature-3", {"input": "x", "temperature": 3.0}, 400, "temperature"),
    ("budget-tokens-0", {"input": "x", "reasoning": {"budget_tokens": 0}}, 400, "reasoning.budget_tokens"),
    ("effort-max", {"input": "x", "reasoning": {"effort": "max"}}, 400, "reasoning.effort"),
    ("schema-missing", {"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, 400,
     "text.format.schema"),
    ("metadata-17", {"input": "x", "metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
    ("background", {"input": "x", "background": True}, 400, "background"),
    ("model-unknown", {"input": "x", "model": "nope"}, 404, "model"),
    ("body-a-list", b"[1, 2]", 400, None),
    ("lone-surrogate", b'{"input": "a\\ud800b"}', 400, "input"),
    ("nan", b'{"input": "x", "temperature": NaN}', 400, None),
    ("duplicate-key", b'{"input": "x", "input": "y"}', 400, None),
    ("not-utf8", b'{"input": "\xc3\x28"}', 400, None),
    ("too-large", b'{"input": "' + b"x" * (3 << 20) + b'"}', 413, None),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert len(error["message"]) < 600 and not INTERNAL_NAMES.search(error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_request_gets_an_openai_error(live, case):
    _, body, status, param = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = live.http.post("/v1/responses", content=content, headers={"Content-Type": "application/json"})
    error = assert_openai_error(r, status, param)
    if case[0] == "name-collision":
        assert "tools[0]" in error["message"] and "tools[1]" in error["message"]


def test_hostile_ids_and_listing_values(live):
    for path in ("/v1/responses/" + "resp_" + "a" * 4000, "/v1/responses/nope", "/v1/responses/resp_%00x",
                 "/v1/responses/resp_" + "0" * 48 + "/input_items"):
        assert_openai_error(live.http.get(path), 404)
        assert_openai_error(live.http.delete(path.removesuffix("/input_items")), 404)
    r = live.a.responses.create(**BASE, max_tool_calls=0)
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=sideways", "order"),
                         ("after=nope", "after"), ("limit=x", "limit")):
        assert_openai_error(live.http.get(f"/v1/responses/{r.id}/input_items?{query}"), 400, param)
    assert wait_idle(live.engine)["kv_usage"] == 0.0


# ---- a client that hangs up ----------------------------------------------------------------------

def test_a_stream_cut_by_the_client_frees_every_kv_block(live):
    """Cut while the model writes, and while a tool runs: the turn is aborted in the engine (its KV
    blocks freed at once, not after max_output_tokens) and the running call is cancelled."""
    steps = live.engine.stats()["num_steps"]
    stream = live.a.responses.create(model="tiny", input="Tell me a long story.", max_output_tokens=700,
                                     temperature=1.0, reasoning={"effort": "none"}, stream=True)
    deltas = 0
    for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas == 5:
            break
    stream.close()
    stats = wait_idle(live.engine)
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_steps"] - steps < 400, "the turn ran on after the client left"

    _cut_while_the_tool_runs(live, lambda: live.a.responses.create(stream=True, **BASE), lambda s: s.close())
    assert live.a.responses.create(**BASE).status == "completed"  # and the server goes on serving


# ---- gRPC ----------------------------------------------------------------------------------------

def grpc_body(**extra) -> pb.ResponsesRequest:
    return pb.ResponsesRequest(body_json=json.dumps({**BASE, **extra}))


def test_grpc_gives_the_same_items_as_http(live):
    http = live.http.post("/v1/responses", json=BASE).json()
    unary = live.stub.Responses(grpc_body(), metadata=AUTH, timeout=120)
    assert (unary.status, unary.model, unary.store) == ("completed", "tiny", True)
    assert items(json.loads(unary.response_json)["output"]) == items(http["output"])
    typed = [(i.type, i.status, i.name, i.arguments, i.server_label, i.output if i.HasField("output") else None,
              i.text) for i in unary.output]
    call, message = http["output"]
    assert typed == [("mcp_call", "completed", "add", call["arguments"], "calc", call["output"], ""),
                     ("message", "completed", "", "", "", None, message["content"][0]["text"])]
    assert unary.usage.input_tokens == http["usage"]["input_tokens"]
    assert unary.usage.output_tokens == http["usage"]["output_tokens"]

    events = list(live.stub.ResponsesStream(grpc_body(stream=False), metadata=AUTH, timeout=120))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert all(json.loads(e.event_json)["type"] == e.type for e in events)
    assert items(json.loads(events[-1].event_json)["response"]["output"]) == items(http["output"])

    # the same owner across transports: an HTTP response continued over gRPC
    go_on = live.stub.Responses(grpc_body(previous_response_id=http["id"], input="And 2+2?"), metadata=AUTH,
                                timeout=120)
    assert go_on.previous_response_id == http["id"] and go_on.usage.input_tokens > unary.usage.input_tokens


def test_grpc_refusals(live):
    def error(request, metadata=AUTH, stream=False) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            if stream:
                list(live.stub.ResponsesStream(request, metadata=metadata, timeout=60))
            else:
                live.stub.Responses(request, metadata=metadata, timeout=60)
        return info.value

    for stream in (False, True):
        err = error(pb.ResponsesRequest(body_json="{not json"), stream=stream)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "body_json" in err.details()
        err = error(grpc_body(tool_choice={"type": "function", "name": "nope"}), stream=stream)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.trailing_metadata())["error-param"] == "tool_choice"
        err = error(grpc_body(previous_response_id="resp_" + "1" * 48), stream=stream)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert error(grpc_body(), metadata=None, stream=stream).code() == grpc.StatusCode.UNAUTHENTICATED
        err = error(pb.ResponsesRequest(body_json=json.dumps({"input": [{"type": "nope"}]})), stream=stream)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input[0]" in err.details()
    assert wait_idle(live.engine)["kv_usage"] == 0.0


def test_a_cancelled_grpc_stream_cancels_its_tool_call(live):
    _cut_while_the_tool_runs(live, lambda: live.stub.ResponsesStream(grpc_body(), metadata=AUTH, timeout=120),
                             lambda s: s.cancel())


def _cut_while_the_tool_runs(live, start, cut) -> None:
    """Open a stream (`start()`), `cut(stream)` once its tool call runs (a call that would take 60 s):
    the call is cancelled and every KV block comes back."""
    async def slow(arguments):
        await asyncio.sleep(60)

    live.runner.behaviour["add"] = slow
    try:
        cancelled = live.runner.cancelled
        stream = start()
        for event in stream:
            if event.type == "response.mcp_call.in_progress":
                break
        cut(stream)
        deadline = time.monotonic() + 10
        while live.runner.cancelled == cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.runner.cancelled == cancelled + 1 and live.runner.running == 0
    finally:
        del live.runner.behaviour["add"]
    assert wait_idle(live.engine)["kv_usage"] == 0.0
