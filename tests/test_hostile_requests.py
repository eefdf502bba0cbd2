"""Hostile requests (issue 10, item 8, and a sweep around it): each gets a 4xx with OpenAI's error
object naming the field (gRPC: the matching status with a clear message), none names an internal
exception type, and afterwards the engine still answers and holds nothing (0 running, 0 waiting,
0 KV usage).

The app is built in-process over the embedded model (no Ray Serve): HTTP through httpx's ASGI
transport with raw bytes (so NaN, duplicate keys and invalid UTF-8 reach the server as sent) and
through the official `openai` client, gRPC through a real server on a free port, also with raw
bytes. `tests/test_serve_hostile.py` replays a subset against `expertmesh serve`.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import grpc
import httpx
import openai
import pytest
from conftest import local_serving

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.auth import Authenticator
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

KEY = "sk-hostile-test"
MAX_MODEL_LEN = 256
INTERNAL_NAMES = re.compile(r"\b\w*(Error|Exception)\b|Traceback|<class |File \"|pydantic|\.py\b")
"""What no error message may show: exception types, tracebacks, library internals."""


def nested(depth: int) -> dict:
    """A JSON schema whose objects and arrays nest `depth` levels deep."""
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def body(text: str) -> bytes:
    return text.encode()


def raw_chat(fields: str) -> bytes:
    """A chat body with `fields` (JSON text, written as is) appended."""
    return body('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + fields + "}")


DEEP = nested(900)
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def with_call(arguments: str) -> dict:
    return chat(messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f",
                                                                                     "arguments": arguments}}]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "ok"}])


def with_tool_call_id(call_id) -> dict:
    """A tool result whose tool_call_id is `call_id` (as sent), answering the call `call_1`."""
    return chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": call_id, "content": "ok"}])


# (id, path, body (a dict sent as JSON, or raw bytes), status, param (None: not checked))
CASES = [
    # ---- the cases of item 8 ----
    ("lone-surrogate-content", "chat", chat(messages=[{"role": "user", "content": "a\ud800b"}]), 400, "messages"),
    ("lone-surrogate-raw-escape", "chat", body('{"messages": [{"role": "user", "content": "\\udc00"}]}'), 400,
     "messages"),
    ("template-kwargs-tools", "chat", chat(chat_template_kwargs={"tools": [{"x": 1}]}), 400, "chat_template_kwargs"),
    ("template-kwargs-messages", "chat", chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs"),
    ("template-kwargs-generation-prompt", "chat", chat(chat_template_kwargs={"add_generation_prompt": False}), 400,
     "chat_template_kwargs"),
    ("guided-json-900-deep", "chat", chat(guided_json=DEEP), 400, "guided_json"),
    ("guided-json-900-deep-text", "chat", chat(guided_json=json.dumps(DEEP)), 400, "guided_json"),
    ("temperature-infinity", "chat", raw_chat('"temperature": Infinity'), 400, "temperature"),
    ("temperature-1e309", "chat", raw_chat('"temperature": 1e309'), 400, "temperature"),
    ("repetition-penalty-infinity", "chat", raw_chat('"repetition_penalty": Infinity'), 400, "repetition_penalty"),
    ("repetition-penalty-1e309", "chat", raw_chat('"repetition_penalty": 1e309'), 400, "repetition_penalty"),
    ("top-k-2**63", "chat", chat(top_k=2**63), 400, "top_k"),
    ("thinking-budget-2**63", "chat", chat(thinking_budget=2**63), 400, "thinking_budget"),
    # ---- numbers: NaN, out of range, negative ----
    ("temperature-nan", "chat", raw_chat('"temperature": NaN'), 400, "temperature"),
    ("temperature-above-2", "chat", chat(temperature=2.5), 400, "temperature"),
    ("temperature-negative", "chat", chat(temperature=-1), 400, "temperature"),
    ("top-p-nan", "chat", raw_chat('"top_p": NaN'), 400, "top_p"),
    ("top-p-zero", "chat", chat(top_p=0), 400, "top_p"),
    ("top-p-above-1", "chat", chat(top_p=1.5), 400, "top_p"),
    ("min-p-negative-infinity", "chat", raw_chat('"min_p": -Infinity'), 400, "min_p"),
    ("presence-penalty-3", "chat", chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-huge", "chat", chat(frequency_penalty=10**400), 400, "frequency_penalty"),
    ("repetition-penalty-3", "chat", chat(repetition_penalty=3), 400, "repetition_penalty"),
    ("repetition-penalty-zero", "chat", chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("top-k-above-vocab", "chat", chat(top_k=10**6), 400, "top_k"),
    ("top-k-minus-2", "chat", chat(top_k=-2), 400, "top_k"),
    ("seed-negative", "chat", chat(seed=-1), 400, "seed"),
    ("seed-2**64", "chat", chat(seed=2**64), 400, "seed"),
    ("max-tokens-zero", "chat", chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-2**63", "chat", chat(max_tokens=2**63), 400, "max_tokens"),
    ("max-completion-tokens-over-context", "chat", chat(max_completion_tokens=10**6), 400, "max_completion_tokens"),
    ("n-zero", "chat", chat(n=0), 400, "n"),
    ("n-over-max-n", "chat", chat(n=17), 400, "n"),
    ("n-2**63", "chat", chat(n=2**63), 400, "n"),
    ("top-logprobs-21", "chat", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top-logprobs-negative", "chat", chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    ("thinking-budget-over-context", "chat", chat(thinking_budget=10**6), 400, "thinking_budget"),
    ("thinking-budget-negative", "chat", chat(thinking_budget=-1), 400, "thinking_budget"),
    ("min-tokens-over-max-tokens", "chat", chat(min_tokens=3), 400, "min_tokens"),
    ("min-tokens-negative", "chat", chat(min_tokens=-1), 400, "min_tokens"),
    ("stop-token-ids-negative", "chat", chat(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop-token-ids-2**63", "chat", chat(stop_token_ids=[2**63]), 400, "stop_token_ids"),
    ("stop-token-ids-outside-vocab", "chat", chat(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    ("logit-bias-infinity", "chat", raw_chat('"logit_bias": {"5": Infinity}'), 400, "logit_bias.5"),
    ("logit-bias-set", "chat", chat(logit_bias={"5": 10}), 400, "logit_bias"),
    # ---- wrong JSON types ----
    ("n-as-string", "chat", chat(n="2"), 400, "n"),
    ("n-as-bool", "chat", chat(n=True), 400, "n"),
    ("n-fractional", "chat", chat(n=1.5), 400, "n"),
    ("temperature-as-string", "chat", chat(temperature="0.5"), 400, "temperature"),
    ("stream-as-string", "chat", chat(stream="true"), 400, "stream"),
    ("logprobs-as-string", "chat", chat(logprobs="yes"), 400, "logprobs"),
    ("max-tokens-as-string", "chat", chat(max_tokens="10"), 400, "max_tokens"),
    ("messages-as-string", "chat", chat(messages="hi"), 400, "messages"),
    ("messages-empty", "chat", chat(messages=[]), 400, "messages"),
    ("message-as-number", "chat", chat(messages=[5]), 400, None),
    ("message-without-role", "chat", chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("role-as-number", "chat", chat(messages=[{"role": 5, "content": "hi"}]), 400, "messages"),
    ("unknown-role", "chat", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("content-as-number", "chat", chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("content-image-part", "chat", chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                                                 "image_url": {"url": "x"}}]}]),
     400, "messages"),
    ("content-parts-900-deep", "chat", chat(messages=[{"role": "user", "content": json.loads(
        "[" * 900 + '{"type": "text", "text": "x"}' + "]" * 900)}]), 400, "messages"),
    ("reasoning-as-object", "chat", chat(messages=[{"role": "assistant", "reasoning_content": {"a": 1}},
                                                   {"role": "user", "content": "hi"}]), 400, "messages"),
    ("tools-as-object", "chat", chat(tools={}), 400, "tools"),
    ("tool-choice-unknown", "chat", chat(tool_choice="maybe"), 400, None),
    ("response-format-as-string", "chat", chat(response_format="json"), 400, "response_format"),
    ("stop-as-number", "chat", chat(stop=5), 400, None),
    ("model-as-number", "chat", chat(model=5), 400, "model"),
    ("template-kwargs-as-list", "chat", chat(chat_template_kwargs=[]), 400, "chat_template_kwargs"),
    ("guided-json-as-number", "chat", chat(guided_json=5), 400, None),
    # ---- empty strings and lists ----
    ("stop-empty-string", "chat", chat(stop=[""]), 400, "stop"),
    ("guided-regex-empty", "chat", chat(guided_regex=""), 400, "guided_regex"),
    ("guided-choice-empty", "chat", chat(guided_choice=[]), 400, "guided_choice"),
    ("model-empty", "chat", chat(model=""), 404, "model"),
    ("tool-name-empty", "chat", chat(tools=[{"type": "function", "function": {"name": ""}}]), 400, None),
    # ---- nesting and size of the JSON-valued fields ----
    ("tool-parameters-900-deep", "chat", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": DEEP}}], tool_choice="required"), 400, "tools[0].function.parameters"),
    ("response-format-schema-900-deep", "chat", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": DEEP}}), 400, "response_format.json_schema.schema"),
    ("template-kwargs-900-deep", "chat", chat(chat_template_kwargs={"x": DEEP}), 400, "chat_template_kwargs"),
    ("tool-arguments-900-deep", "chat", with_call(json.dumps(DEEP)), 400, "messages"),
    ("tool-arguments-past-python-recursion", "chat", with_call("[" * 5000 + "]" * 5000), 400, "messages"),
    ("tool-arguments-not-json", "chat", with_call("{{{"), 400, "messages"),
    ("tool-call-id-as-list", "chat", with_tool_call_id(["call_1"]), 400, "messages[2].tool_call_id"),
    ("tool-call-id-as-object", "chat", with_tool_call_id({"id": "call_1"}), 400, "messages[2].tool_call_id"),
    ("tool-call-id-as-number", "chat", with_tool_call_id(1), 400, "messages[2].tool_call_id"),
    ("tool-call-id-64k-unknown", "chat", with_tool_call_id("x" * 65536), 400, "messages[2].tool_call_id"),
    ("template-kwargs-too-many-values", "chat", chat(chat_template_kwargs={"x": [0] * 250_001}), 400,
     "chat_template_kwargs"),
    ("guided-json-nan-inside", "chat", raw_chat('"guided_json": {"type": "number", "maximum": NaN}'), 400,
     "guided_json"),
    ("guided-json-huge-integer", "chat", chat(guided_json={"type": "integer", "maximum": 10**4000}), 400,
     "guided_json"),
    ("body-nested-past-python-recursion", "chat", raw_chat('"x": ' + "[" * 5000 + "]" * 5000), 400, None),
    # ---- the body itself ----
    ("invalid-utf8", "chat", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("truncated-json", "chat", b'{"messages": [', 400, None),
    ("body-array", "chat", b"[1, 2]", 400, None),
    ("body-string", "chat", b'"hi"', 400, None),
    ("body-null", "chat", b"null", 400, None),
    ("body-number", "chat", b"5", 400, None),
    ("body-empty", "chat", b"", 400, None),
    ("duplicate-key", "chat", raw_chat('"max_tokens": 1, "max_tokens": 3'), 400, None),
    ("duplicate-key-nested", "chat", body('{"messages": [{"role": "user", "role": "system", "content": "x"}]}'),
     400, None),
    ("model-name-64k", "chat", chat(model="m" * 65536), 404, "model"),
    # ---- completions ----
    ("prompt-empty-list", "completions", {"prompt": []}, 400, "prompt"),
    ("prompt-empty-string", "completions", {"prompt": ""}, 400, "prompt"),
    ("prompt-token-negative", "completions", {"prompt": [-1]}, 400, None),
    ("prompt-token-2**63", "completions", {"prompt": [2**63]}, 400, None),
    ("prompt-lone-surrogate", "completions", {"prompt": "\ud800"}, 400, "prompt"),
    ("prompt-mixed-types", "completions", {"prompt": [[1, 2], "x"]}, 400, "prompt"),
    ("stop-as-list-of-numbers", "chat", chat(stop=[1]), 400, "stop"),
    ("tool-choice-named-without-name", "chat", chat(tool_choice={"type": "function"}), 400, "tool_choice"),
    ("completion-logprobs-21", "completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("completion-temperature-nan", "completions", body('{"prompt": "x", "temperature": NaN}'), 400, "temperature"),
    ("completion-suffix", "completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("completion-best-of", "completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
]

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert len(error["message"]) < 400, "an error quotes the request only briefly"
    assert not INTERNAL_NAMES.search(error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_idle(stats: dict) -> None:
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0), stats


@pytest.fixture(scope="module")
def rig():
    from expertmesh.gateway.grpc_server import build_grpc_server
    from expertmesh.gateway.http import build_http_app

    with local_serving(max_model_len=MAX_MODEL_LEN) as serving_rig:
        run = serving_rig.run
        auth = Authenticator([KEY])
        app = build_http_app(serving_rig.serving, auth)
        # raise_app_exceptions=False: a 500 must reach the test as the response a client sees
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://gateway", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=KEY, http_client=http, max_retries=0)
        port = free_port()

        async def start():
            server = build_grpc_server(serving_rig.serving, auth, port, host="127.0.0.1")
            await server.start()
            return server

        server = run(start())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")

        def post(path: str, payload: dict | bytes, headers: dict | None = None) -> httpx.Response:
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            return run(http.post(path, content=content, headers={"Content-Type": "application/json",
                                                                 **(headers or {})}))

        try:
            yield SimpleNamespace(run=run, post=post, http=http, client=client, channel=channel,
                                  stub=pb_grpc.ExpertMeshStub(channel), serving=serving_rig.serving,
                                  engine=serving_rig.engine)
        finally:
            channel.close()
            run(server.stop(None))
            run(http.aclose())


# ---- HTTP, raw bytes ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_http_hostile_request_gets_an_openai_error(rig, case):
    _, path, payload, status, param = case
    assert_openai_error(rig.post(PATHS[path], payload), status, param)


def test_http_body_that_is_not_json_typed(rig):
    r = rig.post(PATHS["chat"], json.dumps(chat()).encode(), headers={"Content-Type": "text/plain"})
    assert_openai_error(r, 400)


def test_http_unknown_route_and_method(rig):
    assert_openai_error(rig.run(rig.http.post("/v1/nothing", json={})), 404)
    assert_openai_error(rig.run(rig.http.get(PATHS["chat"])), 405)


def test_http_huge_authorization_header(rig):
    r = rig.run(rig.http.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 65536}))
    assert_openai_error(r, 401)


def test_http_messages_name_the_field_and_location(rig):
    error = assert_openai_error(rig.post(PATHS["chat"], chat(messages=[
        {"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}])),
        400, "messages")
    assert "messages[1].content[0].text" in error["message"] and "surrogate" in error["message"]
    error = assert_openai_error(rig.post(PATHS["chat"], chat(guided_json=DEEP)), 400, "guided_json")
    assert "64" in error["message"] and error["code"] == "too_deeply_nested"
    error = assert_openai_error(rig.post(PATHS["chat"], raw_chat('"n": 1, "n": 9')), 400)
    assert "'n' appears twice" in error["message"]
    error = assert_openai_error(rig.post(PATHS["chat"], b'{"messages": "\xc3\x28"}'), 400)
    assert "UTF-8" in error["message"]


def test_json_limits_are_inclusive(rig):
    """64 levels and 250,000 values are allowed; one more of either is not."""
    ok = rig.post(PATHS["chat"], chat(guided_json=nested(64), max_tokens=1, temperature=0))
    assert ok.status_code == 200, ok.text
    assert_openai_error(rig.post(PATHS["chat"], chat(guided_json=nested(65))), 400, "guided_json")
    many = {"x": [0] * (250_000 - 2)}  # the object, its list and the list's values
    assert rig.post(PATHS["chat"], chat(chat_template_kwargs=many, max_tokens=1)).status_code == 200


# ---- the official openai client -----------------------------------------------------------------

# The client itself refuses to send NaN, Infinity or a lone surrogate (allow_nan=False, UTF-8):
# those cases are above, in raw bytes.
OPENAI_CASES = [
    ("temperature-above-2", dict(temperature=2.5), "temperature"),
    ("top-k-2**63", dict(extra_body={"top_k": 2**63}), "top_k"),
    ("thinking-budget-2**63", dict(extra_body={"thinking_budget": 2**63}), "thinking_budget"),
    ("repetition-penalty-3", dict(extra_body={"repetition_penalty": 3.0}), "repetition_penalty"),
    ("template-kwargs-tools", dict(extra_body={"chat_template_kwargs": {"tools": []}}), "chat_template_kwargs"),
    ("guided-json-900-deep", dict(extra_body={"guided_json": DEEP}), "guided_json"),
    ("seed-negative", dict(seed=-5), "seed"),
    ("top-logprobs-21", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("unknown-role", dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ("n-as-string", dict(n="2"), "n"),
]


@pytest.mark.parametrize("case", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_client_gets_bad_request(rig, case):
    _, kwargs, param = case
    kwargs = {"model": rig.serving.settings.model_name, "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        rig.run(rig.client.chat.completions.create(**kwargs))
    assert info.value.status_code == 400 and info.value.param == param
    assert not INTERNAL_NAMES.search(info.value.body["message"]), info.value.body


# ---- gRPC -----------------------------------------------------------------------------------------

def grpc_chat(**fields) -> pb.ChatCompletionRequest:
    fields = {"messages": [pb.ChatMessage(role="user", content="hi")], **fields}
    request = pb.ChatCompletionRequest(**fields)
    request.sampling.max_tokens = 2
    return request


def sampling(**fields) -> pb.ChatCompletionRequest:
    request = grpc_chat()
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request.sampling, name).extend(value)
        else:
            setattr(request.sampling, name, value)
    return request


def call_to(arguments: str) -> pb.ChatCompletionRequest:
    call = pb.ToolCall(id="call_1", function=pb.FunctionCall(name="f", arguments=arguments))
    return grpc_chat(messages=[pb.ChatMessage(role="user", content="hi"),
                               pb.ChatMessage(role="assistant", tool_calls=[call]),
                               pb.ChatMessage(role="tool", tool_call_id="call_1", content="ok")])


GOOD_BYTES = grpc_chat(messages=[pb.ChatMessage(role="user", content="MARK")]).SerializeToString()
DEEP_TEXT = json.dumps(DEEP)
GRPC_CASES = [
    # (id, request (a message, or raw bytes), param trailer or None)
    ("lone-surrogate-in-json-text", grpc_chat(guided_json='{"enum": ["\\ud800"]}'), "guided_json"),
    ("string-field-not-utf8", GOOD_BYTES.replace(b"MARK", b"\xed\xa0\x80!"), None),
    ("wire-format-corrupt", b"\xff\xff\xff\xff", None),
    ("message-truncated", GOOD_BYTES[:-2], None),
    ("template-kwargs-tools", grpc_chat(chat_template_kwargs=pb.ChatTemplateKwargs(extra_json='{"tools": []}')),
     "chat_template_kwargs"),
    ("template-kwargs-messages", grpc_chat(chat_template_kwargs=pb.ChatTemplateKwargs(
        extra_json='{"messages": []}')), "chat_template_kwargs"),
    ("template-kwargs-generation-prompt", grpc_chat(chat_template_kwargs=pb.ChatTemplateKwargs(
        extra_json='{"add_generation_prompt": true}')), "chat_template_kwargs"),
    ("template-kwargs-duplicate-key", grpc_chat(chat_template_kwargs=pb.ChatTemplateKwargs(
        extra_json='{"a": 1, "a": 2}')), "chat_template_kwargs.extra_json"),
    ("template-kwargs-900-deep", grpc_chat(chat_template_kwargs=pb.ChatTemplateKwargs(
        extra_json=json.dumps({"x": DEEP}))), "chat_template_kwargs"),
    ("guided-json-900-deep", grpc_chat(guided_json=DEEP_TEXT), "guided_json"),
    ("guided-json-past-python-recursion", grpc_chat(guided_json="[" * 5000 + "]" * 5000), "guided_json"),
    ("tool-parameters-900-deep", grpc_chat(tools=[pb.Tool(function=pb.FunctionDefinition(
        name="f", parameters_json=DEEP_TEXT))], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
     "tools[0].function.parameters"),
    ("response-format-900-deep", grpc_chat(response_format=pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchemaFormat(name="x", schema_json=DEEP_TEXT))),
     "response_format.json_schema.schema"),
    ("tool-arguments-900-deep", call_to(DEEP_TEXT), "messages"),
    ("temperature-infinity", sampling(temperature=float("inf")), "temperature"),
    ("temperature-nan", sampling(temperature=float("nan")), "temperature"),
    ("repetition-penalty-infinity", sampling(repetition_penalty=float("inf")), "repetition_penalty"),
    ("top-k-int32-max", sampling(top_k=2**31 - 1), "top_k"),
    ("thinking-budget-int32-max", grpc_chat(thinking_budget=2**31 - 1), "thinking_budget"),
    ("seed-negative", sampling(seed=-1), "seed"),
    ("n-zero", sampling(n=0), "n"),
    ("max-tokens-negative", sampling(max_tokens=-1), "max_tokens"),
    ("top-logprobs-21", sampling(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("stop-token-ids-negative", sampling(stop_token_ids=[-1]), "stop_token_ids"),
    ("unknown-role", grpc_chat(messages=[pb.ChatMessage(role="wizard", content="x")]), "messages"),
    ("no-messages", grpc_chat(messages=[]), "messages"),
    ("model-unknown", grpc_chat(model="m" * 100_000), "model"),
]


def grpc_error(rig, request, method: str = "ChatCompletion") -> grpc.RpcError:
    call = rig.channel.unary_unary(f"/expertmesh.v1.ExpertMesh/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        call(data, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    err = info.value
    assert not INTERNAL_NAMES.search(err.details() or ""), err.details()
    return err


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_hostile_request_gets_invalid_argument(rig, case):
    _, request, param = case
    err = grpc_error(rig, request)
    expected = grpc.StatusCode.NOT_FOUND if case[0] == "model-unknown" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.code() == expected, (err.code(), err.details())
    assert err.details() and len(err.details()) < 400
    if param is not None:
        assert dict(err.trailing_metadata() or ())["error-param"] == param


def test_grpc_streaming_and_completion_refuse_the_same(rig):
    assert grpc_error(rig, grpc_chat(guided_json=DEEP_TEXT), "ChatCompletionStream").code() == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_error(rig, b"\xff\xff\xff\xff", "CompletionStream").code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_ids = pb.CompletionRequest(prompt_token_ids=[pb.TokenIds(ids=[-1])])
    assert grpc_error(rig, bad_ids, "Completion").code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_error(rig, b"\xff\xff\xff\xff", "ListModels").code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prompts_per_completion_request_are_capped(rig):
    """One completions request batches at most max_prompts prompts, each its own engine request of
    n sequences: uncapped, a 5 KB body of 1,000 one-token prompts with n=16 queued 16,000 sequences
    and held a concurrent request up for seconds (a 1 MiB body, 260,000 prompts). One over the cap
    is a 400 naming `prompt` before any of them runs, on HTTP and gRPC; the cap itself still runs."""
    limit = rig.serving.settings.max_prompts
    for prompt in ([[1]] * (limit + 1), ["a"] * (limit + 1)):
        error = assert_openai_error(rig.post(PATHS["completions"], {"prompt": prompt, "max_tokens": 1, "n": 16}),
                                    400, "prompt")
        assert str(limit) in error["message"] and error["code"] == "too_many_prompts", error
    for request in (pb.CompletionRequest(prompts=pb.PromptList(texts=["a"] * (limit + 1))),
                    pb.CompletionRequest(prompt_token_ids=[pb.TokenIds(ids=[1])] * (limit + 1))):
        err = grpc_error(rig, request, "Completion")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert dict(err.trailing_metadata() or ())["error-param"] == "prompt"
    ok = rig.post(PATHS["completions"], {"prompt": [[1]] * limit, "max_tokens": 1, "n": 2})
    assert ok.status_code == 200, ok.text[:500]
    assert len(ok.json()["choices"]) == 2 * limit


# ---- what still fails inside is a 500 with the error object, naming no type -------------------------

def test_an_unforeseen_failure_is_a_json_500_naming_no_type(rig, monkeypatch):
    async def broken(_req):
        raise KeyError("internal detail")

    monkeypatch.setattr(rig.serving, "chat", broken)
    error = assert_openai_error(rig.post(PATHS["chat"], chat()), 500)
    assert error["type"] == "server_error" and "internal detail" not in error["message"]
    err = grpc_error(rig, grpc_chat())
    assert err.code() == grpc.StatusCode.INTERNAL and "internal detail" not in err.details()


def test_a_failing_engine_step_is_a_json_500_naming_no_type(rig):
    core = rig.engine.core
    execute = core.executor.execute
    failures = {"left": 2}

    def fail_twice(plan):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("step exploded")
        return execute(plan)

    core.executor.execute = fail_twice
    try:
        error = assert_openai_error(rig.post(PATHS["chat"], chat()), 500)
        assert error["type"] == "server_error"
        assert grpc_error(rig, grpc_chat()).code() == grpc.StatusCode.INTERNAL
    finally:
        core.executor.execute = execute


# ---- afterwards: the engine answers and holds nothing ---------------------------------------------

def test_after_all_of_them_the_engine_answers_and_is_idle(rig):
    r = rig.post(PATHS["chat"], chat(max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    reply = rig.stub.ChatCompletion(grpc_chat(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    assert reply.usage.completion_tokens == 2
    assert rig.run(rig.http.get("/health")).status_code == 200
    assert_idle(rig.engine.stats())
    metrics = rig.run(rig.http.get("/metrics")).text
    for name, value in (("expertmesh_num_requests_running", 0), ("expertmesh_num_requests_waiting", 0),
                        ("expertmesh_kv_cache_usage_ratio", 0)):
        assert float(re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE).group(1)) == value, name
