"""The gRPC front end against a real server on a free port, over the in-process engine (tiny default model, CPU).

The server runs on its own event loop in a background thread; the tests use blocking stubs.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from conftest import local_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.grpc_server import (
    HEALTH_SERVICE_NAME,
    REPLICA_METADATA,
    SERVICE_NAME,
    GrpcHealth,
    GrpcOptions,
    build_grpc_server,
    chat_chunk,
    chat_request,
    chat_response,
    completion_response,
)
from expertmesh.proto import generate
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

KEY = "test-key-123"
AUTH = (("authorization", f"Bearer {KEY}"),)


# ---- stubs ---------------------------------------------------------------------------------

# Lines that name the protoc / grpcio-tools release that wrote the file: all a different release of
# the same tools legitimately changes. Everything else must match byte for byte.
_VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)"),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
]


def _normalized(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    written = generate.generate(out=tmp_path)
    assert written
    stale = []
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = generate.ROOT / rel
        if not committed.exists() or _normalized(committed) != _normalized(path):
            stale.append(str(rel))
    assert not stale, f"stale gRPC stubs {stale}: regenerate with `python -m expertmesh.proto.generate`"
    generated = {p.relative_to(tmp_path) for p in written}
    committed = {p.relative_to(generate.ROOT) for p in generate.ROOT.rglob("*_pb2*.py*")}
    assert committed == generated, f"stubs without a .proto: {sorted(map(str, committed - generated))}"


def test_request_conversion():
    """Every proto field reaches the pydantic request under its OpenAI name."""
    req = pb.ChatCompletionRequest(
        model="tiny",
        messages=[pb.ChatMessage(role="user", content="weather?"),
                  pb.ChatMessage(role="assistant", reasoning_content="think", tool_calls=[pb.ToolCall(
                      id="call_1", function=pb.FunctionCall(name="get", arguments='{"city": "Paris"}'))]),
                  pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1")],
        sampling=pb.SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=7, stop=["x"],
                                   stop_token_ids=[3], max_tokens=9, min_tokens=1, logprobs=True, top_logprobs=2,
                                   repetition_penalty=1.1),
        tools=[pb.Tool(function=pb.FunctionDefinition(
            name="get", description="d",
            parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}'))],
        tool_choice=pb.ToolChoice(function_name="get"),
        chat_template_kwargs=pb.ChatTemplateKwargs(enable_thinking=False, extra_json='{"x": 1}'),
        thinking_budget=32, guided_choice=["a", "b"])
    r = chat_request(req, stream=True)
    assert r.stream and r.stream_options.include_usage
    assert (r.model, r.n, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.stop_token_ids, r.max_tokens) == (
        "tiny", 2, 0.7, 0.9, 5, 7, ["x"], [3], 9)
    assert (r.min_tokens, r.logprobs, r.top_logprobs, r.repetition_penalty, r.thinking_budget) == (1, True, 2, 1.1, 32)
    assert r.messages[0] == {"role": "user", "content": "weather?"}
    assert "content" not in r.messages[1]  # absent, not "": an assistant turn of tool calls only
    assert r.messages[1]["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"city": "Paris"}'}
    assert r.messages[2]["tool_call_id"] == "call_1"
    assert r.tools[0].function.parameters["properties"]["city"] == {"type": "string"}
    assert r.tool_choice.function.name == "get"
    assert r.chat_template_kwargs == {"x": 1, "enable_thinking": False}
    assert r.guided_choice == ["a", "b"]
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                            json_schema=pb.JsonSchemaFormat(name="r", schema_json='{"type": "integer"}', strict=True))
    r = chat_request(pb.ChatCompletionRequest(messages=req.messages[:1], response_format=fmt,
                                              tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)))
    assert r.response_format.json_schema.schema_ == {"type": "integer"} and r.response_format.json_schema.strict
    assert r.tool_choice == "none" and r.temperature is None and r.max_tokens is None


def test_response_conversion():
    """OpenAI-shaped dicts (as serving.py builds them) become proto messages field for field."""
    call = {"id": "call_9", "type": "function", "function": {"name": "get", "arguments": '{"city": "Oslo"}'}}
    r = chat_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "tiny", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "reasoning_content": "hmm",
                                 "tool_calls": [call]},
         "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97],
                                   "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}]},
         "finish_reason": "tool_calls", "stop_reason": 151645}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 2}}})
    (c,) = r.choices
    assert not c.message.HasField("content") and c.message.reasoning_content == "hmm"
    assert (c.message.tool_calls[0].id, c.message.tool_calls[0].function.arguments) == ("call_9", '{"city": "Oslo"}')
    assert c.finish_reason == "tool_calls" and c.stop_reason.stop_token_id == 151645
    assert c.logprobs.content[0].bytes == b"a" and c.logprobs.content[0].top_logprobs[0].logprob == -0.5
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens, r.usage.cached_tokens) == (
        3, 4, 7, 2)
    chunk = chat_chunk({"id": "x", "created": 1, "model": "tiny", "choices": [
        {"index": 1, "delta": {"tool_calls": [{"index": 2, **call}]}, "logprobs": None, "finish_reason": None}]})
    (cc,) = chunk.choices
    assert cc.index == 1 and cc.delta.tool_calls[0].index == 2 and not cc.HasField("finish_reason")
    assert not chunk.HasField("usage") and not cc.delta.HasField("content")
    r = completion_response({"id": "cmpl-1", "created": 1, "model": "tiny", "choices": [
        {"index": 0, "text": "hi", "finish_reason": "stop", "stop_reason": "\n\n",
         "logprobs": {"tokens": ["h", "i"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"h": -1.0}, {"i": -2.0}],
                      "text_offset": [0, 1]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    (c,) = r.choices
    assert c.stop_reason.stop_str == "\n\n" and [t.text_offset for t in c.logprobs.content] == [0, 1]
    assert c.logprobs.content[1].top_logprobs[0].token == "i"


# ---- a live server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live():
    from expertmesh.gateway.auth import Authenticator

    with local_serving(max_model_len=512) as rig:
        async def start():
            health = GrpcHealth()
            server = build_grpc_server(rig.serving, Authenticator([KEY]), port, host="127.0.0.1", health=health)
            await server.start()
            return server, health

        port = free_port()
        server, health = rig.run(start())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield SimpleNamespace(stub=pb_grpc.ExpertMeshStub(channel), channel=channel, engine=rig.engine,
                                  serving=rig.serving, tokenizer=rig.tokenizer, health=health, run=rig.run)
        finally:
            channel.close()
            rig.run(server.stop(None))


MESSAGES = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hello there!")]


def _chat(**sampling) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(model="tiny", messages=MESSAGES, sampling=pb.SamplingParams(**sampling))


def test_chat_unary(live):
    r = live.stub.ChatCompletion(_chat(max_tokens=10, temperature=0, ignore_eos=True), metadata=AUTH)
    (choice,) = r.choices
    text = choice.message.content + choice.message.reasoning_content
    assert choice.message.role == "assistant" and text
    assert choice.finish_reason == "length"
    prompt = live.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in MESSAGES],
                                                add_generation_prompt=True, enable_thinking=True)
    assert r.usage.prompt_tokens == len(live.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "tiny" and r.id.startswith("chatcmpl-")

    r = live.stub.ChatCompletion(_chat(max_tokens=6, temperature=0.8, seed=3, n=2), metadata=AUTH)
    assert [c.index for c in r.choices] == [0, 1]
    assert 0 < r.usage.completion_tokens <= 12


def _collect_chat(chunks) -> tuple[dict[int, str], dict[int, str], pb.Usage]:
    content: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for i, chunk in enumerate(chunks):
        if chunk.HasField("usage"):
            assert not chunk.choices
            usage = chunk.usage
            continue
        assert usage is None, "the usage chunk comes last"
        for c in chunk.choices:
            if c.index not in content:
                assert c.delta.role == "assistant", f"chunk {i}: a choice's first chunk carries the role"
            content[c.index] = content.get(c.index, "") + c.delta.reasoning_content + c.delta.content
            if c.HasField("finish_reason"):
                finish[c.index] = c.finish_reason
    assert usage is not None
    return content, finish, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=1234)], ids=["greedy", "seeded"])
def test_chat_stream_matches_unary(live, sampling):
    req = _chat(max_tokens=12, **sampling)
    unary = live.stub.ChatCompletion(req, metadata=AUTH)
    content, finish, usage = _collect_chat(live.stub.ChatCompletionStream(req, metadata=AUTH))
    message = unary.choices[0].message
    assert content == {0: message.reasoning_content + message.content}
    assert finish == {0: unary.choices[0].finish_reason}
    assert (usage.prompt_tokens, usage.completion_tokens) == (unary.usage.prompt_tokens,
                                                              unary.usage.completion_tokens)


def test_completion_unary_and_stream(live):
    prompt = "The capital of France is"
    req = pb.CompletionRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=8, temperature=0))
    r = live.stub.Completion(req, metadata=AUTH)
    (choice,) = r.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(live.tokenizer.encode(prompt))
    assert 0 < r.usage.completion_tokens <= 8

    text, finish, usage = "", None, None
    for chunk in live.stub.CompletionStream(req, metadata=AUTH):
        if chunk.HasField("usage"):
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            if c.HasField("finish_reason"):
                finish = c.finish_reason
    assert (text, finish) == (choice.text, choice.finish_reason)
    assert usage == r.usage

    ids = live.tokenizer.encode(prompt)
    by_ids = live.stub.Completion(pb.CompletionRequest(prompt_token_ids=[pb.TokenIds(ids=ids)] * 2,
                                                       sampling=req.sampling, echo=True), metadata=AUTH)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert by_ids.choices[0].text == live.tokenizer.decode(ids, skip_special_tokens=False) + choice.text


def test_a_string_prompt_is_one_prompt_and_prompts_are_a_batch(live):
    """`prompt` is one string (a repeated field took a Python string as one prompt per character);
    several prompts go in `prompts`; a list for `prompt` is refused by protobuf itself."""
    prompt = "The capital of France is"
    sampling = pb.SamplingParams(max_tokens=4, temperature=0)
    one = live.stub.Completion(pb.CompletionRequest(prompt=prompt, sampling=sampling), metadata=AUTH)
    assert len(one.choices) == 1 and one.usage.prompt_tokens == len(live.tokenizer.encode(prompt))
    batch = live.stub.Completion(pb.CompletionRequest(prompts=pb.PromptList(texts=[prompt, "Hello"]),
                                                      sampling=sampling), metadata=AUTH)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == one.choices[0].text
    with pytest.raises(TypeError):
        pb.CompletionRequest(prompt=[prompt, "Hello"])
    # The old field 2 (`repeated string prompt`) with one prompt reads as the same request.
    old_wire = b"\x12" + bytes([len(prompt)]) + prompt.encode()
    assert pb.CompletionRequest.FromString(old_wire).prompt == prompt
    err = _error(live.stub.Completion, pb.CompletionRequest(prompt="x", prompt_token_ids=[pb.TokenIds(ids=[1])]),
                 metadata=AUTH)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in err.details()


def test_the_readme_grpc_example_runs(live, capsys):
    """The README's Python example (one prompt, then two) against a server without keys."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "pb.PromptList" in block]

    async def start():
        server = build_grpc_server(live.serving, None, port, host="127.0.0.1")
        await server.start()
        return server

    port, namespace = free_port(), {}
    server = live.run(start())
    try:
        exec(code.replace("127.0.0.1:50051", f"127.0.0.1:{port}"), namespace)
    finally:
        live.run(server.stop(None))
    assert (len(namespace["one"].choices), len(namespace["two"].choices)) == (1, 2)
    assert capsys.readouterr().out.strip()


def test_list_models(live):
    (model,) = live.stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models
    assert model.id == "tiny" and model.max_model_len == 512 and model.owned_by == "expertmesh"


def test_health(live):
    stub = health_pb2_grpc.HealthStub(live.channel)  # open: no key
    for service in ("", SERVICE_NAME):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    live.run(live.health.set_serving(False))
    try:
        assert stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        live.run(live.health.set_serving(True))
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection(live):
    db = ProtoReflectionDescriptorDatabase(live.channel)  # open: no key
    services = set(db.get_services())
    assert {SERVICE_NAME, HEALTH_SERVICE_NAME} <= services
    assert db.FindFileContainingSymbol(SERVICE_NAME).name == "expertmesh/v1/expertmesh.proto"


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.ChatCompletionResponse | pb.CompletionResponse | pb.ListModelsResponse):
            list(result)  # a stream fails when read
    return err.value


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", KEY),)],
                         ids=["no-key", "wrong-key", "no-bearer"])
def test_unauthenticated(live, metadata):
    for call, req in ((live.stub.ChatCompletion, _chat(max_tokens=2)), (live.stub.ChatCompletionStream, _chat()),
                      (live.stub.CompletionStream, pb.CompletionRequest(prompt="x")),
                      (live.stub.ListModels, pb.ListModelsRequest())):
        err = _error(call, req, metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in err.details()


@pytest.mark.parametrize(("request_", "code", "named"), [
    (_chat(temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.ChatCompletionRequest(model="tiny"), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (_chat(max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.ChatCompletionRequest(messages=MESSAGES, tools=[pb.Tool(function=pb.FunctionDefinition(
        name="f", parameters_json="{not json"))]), grpc.StatusCode.INVALID_ARGUMENT, "parameters_json"),
    (pb.ChatCompletionRequest(messages=MESSAGES, tool_choice=pb.ToolChoice(function_name="missing")),
     grpc.StatusCode.INVALID_ARGUMENT, "missing"),
    (pb.ChatCompletionRequest(model="no-such-model", messages=MESSAGES), grpc.StatusCode.NOT_FOUND, "no-such-model"),
], ids=["temperature", "no-messages", "max-tokens", "bad-json", "unknown-tool", "unknown-model"])
def test_errors(live, request_, code, named):
    for call in (live.stub.ChatCompletion, live.stub.ChatCompletionStream):
        err = _error(call, request_, metadata=AUTH)
        assert err.code() == code, err.details()
        assert named in err.details()


def test_completion_errors(live):
    err = _error(live.stub.Completion, pb.CompletionRequest(model="nope", prompt="x"), metadata=AUTH)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()
    err = _error(live.stub.Completion, pb.CompletionRequest(), metadata=AUTH)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.details()
    err = _error(live.stub.CompletionStream, pb.CompletionRequest(
        prompt="x", sampling=pb.SamplingParams(top_p=2)), metadata=AUTH)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.details()
    param = dict(err.trailing_metadata())["error-param"]
    assert param == "top_p"


def test_cancelled_stream_aborts_the_request(live):
    """A client that cancels mid-stream frees the engine at once: the request does not run on to max_tokens."""
    stream = live.stub.ChatCompletionStream(_chat(max_tokens=480, ignore_eos=True, temperature=0), metadata=AUTH)
    next(stream), next(stream), next(stream)
    steps_at_cancel = live.engine.stats()["num_steps"]
    stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = live.engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.02)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["num_steps"] - steps_at_cancel < 100, "the request kept running after the cancel"


def test_json_text_fields_stay_exact():
    """JSON documents travel as text: big integers and key order survive (a Struct would not)."""
    schema = '{"type": "object", "properties": {"z": {"maximum": 12345678901234567890}, "a": {}}}'
    req = pb.ChatCompletionRequest(messages=MESSAGES[1:], tools=[pb.Tool(function=pb.FunctionDefinition(
        name="f", parameters_json=schema))])
    params = chat_request(req).tools[0].function.parameters
    assert params == json.loads(schema) and list(params["properties"]) == ["z", "a"]


def test_guided_choice_and_engine_refusals(live):
    """Guided decoding reaches the engine; a grammar the engine refuses fails the call, streamed or not."""
    r = live.stub.Completion(pb.CompletionRequest(prompt="Answer:", guided_choice=["yes", "no"],
                                                  sampling=pb.SamplingParams(max_tokens=8, seed=5)), metadata=AUTH)
    assert r.choices[0].text in ("yes", "no")
    bad = pb.ChatCompletionRequest(messages=MESSAGES, guided_regex="(unclosed",
                                   sampling=pb.SamplingParams(max_tokens=4))
    for call in (live.stub.ChatCompletion, live.stub.ChatCompletionStream):
        err = _error(call, bad, metadata=AUTH)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "regex" in err.details()


def test_a_message_over_the_body_limit_is_refused_unparsed(live):
    """The HTTP body limit (sized for max_model_len 512) holds for gRPC messages too."""
    from expertmesh.gateway.app_config import default_max_request_body_bytes

    limit = default_max_request_body_bytes(512)
    request = _chat(max_tokens=1)
    request.messages[1].content = "x" * (limit + 1)
    with pytest.raises(grpc.RpcError) as info:
        live.stub.ChatCompletion(request, metadata=AUTH, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    request.messages[1].content = "x" * (limit - 4096)  # within the limit: read, rendered, refused for its length
    with pytest.raises(grpc.RpcError) as info:
        live.stub.ChatCompletion(request, metadata=AUTH, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum context length" in info.value.details()


def settled(read, quiet_s: float = 0.5, timeout_s: float = 10.0):
    """`read()` once it has stopped changing for `quiet_s` (the server counts a call in its
    `finally`, which on a busy machine may run well after the client has its status)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def test_refused_calls_are_counted(live):
    def count(status: str) -> float:
        return live.serving.metrics.requests.labels("chat", status)._value.get()

    before = settled(lambda: (count("401"), count("400")))  # earlier tests' calls may still be counting
    with pytest.raises(grpc.RpcError):
        live.stub.ChatCompletion(_chat(max_tokens=1))
    with pytest.raises(grpc.RpcError):
        live.stub.ChatCompletion(_chat(max_tokens=1, n=99), metadata=AUTH)
    # the server counts in the call's `finally`, which may run just after the client has its status
    deadline = time.monotonic() + 10
    while (count("401"), count("400")) != (before[0] + 1, before[1] + 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (count("401"), count("400")) == (before[0] + 1, before[1] + 1)


def fresh_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (grpcio shares one between channels to one address)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_servers_that_reuse_the_port_share_it_and_name_themselves(live):
    """Two servers with `reuse_port` (two gateway replicas on one node) bind one port; the kernel
    deals new connections to both, and each call's initial metadata names the server that answered,
    refused calls too. Without `reuse_port` a port in use stays an error."""
    async def start(replica: str, reuse: bool):
        server = build_grpc_server(live.serving, None, port, host="127.0.0.1", replica=replica,
                                   options=GrpcOptions(reuse_port=reuse))
        await server.start()
        return server

    port = free_port()
    servers = [live.run(start("replica-a", True)), live.run(start("replica-b", True))]
    try:
        with pytest.raises(RuntimeError, match=f"cannot serve gRPC on 127.0.0.1:{port}"):
            live.run(start("replica-c", False))
        seen: dict[str, int] = {}
        for _ in range(64):
            with fresh_channel(f"127.0.0.1:{port}") as channel:
                reply, call = pb_grpc.ExpertMeshStub(channel).ListModels.with_call(pb.ListModelsRequest(), timeout=30)
                assert reply.models[0].id == "tiny"
                replica = dict(call.initial_metadata())[REPLICA_METADATA]
                seen[replica] = seen.get(replica, 0) + 1
            if len(seen) == 2:
                break
        assert set(seen) == {"replica-a", "replica-b"}, seen
        with fresh_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.ExpertMeshStub(channel).ChatCompletionStream(_chat(temperature=-1))
            assert dict(stream.initial_metadata())[REPLICA_METADATA] in seen
            assert _error(lambda: stream).code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for server in servers:
            live.run(server.stop(None))


def test_no_replica_metadata_outside_serve(live):
    """A server built without `replica` (the fixture's) sends no `expertmesh-replica` metadata."""
    _, call = live.stub.ListModels.with_call(pb.ListModelsRequest(), metadata=AUTH)
    assert REPLICA_METADATA not in dict(call.initial_metadata())
