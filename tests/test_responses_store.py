"""Stored responses: the state store's response records (in-process and a real redis-server), and
previous_response_id continuing a conversation through each, over HTTP with the official `openai`
client (a scripted engine: the test reads the prompt the model was given).
"""
from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import start_redis_server
from responses_rig import LOOKUP, FakeRunner, http_server, scripted_serving, tool_call

from expertmesh.cluster.state import (
    MAX_RESPONSE_RECORD_BYTES,
    InProcessStateStore,
    RedisStateStore,
    ResponseTooLarge,
    response_json,
)
from expertmesh.gateway.auth import Authenticator, current_identity, hash_key
from expertmesh.gateway.http import build_http_app
from expertmesh.gateway.responses import ResponsesServing, ResponsesSettings

KEY = "sk-store-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis_server(tmp_path_factory.mktemp("redis-responses"))
    yield server
    server.stop()


@pytest.fixture(params=["in-process", "redis"])
def store(request):
    if request.param == "in-process":
        yield InProcessStateStore()
        return
    server = request.getfixturevalue("redis_server")
    server.flush()
    s = RedisStateStore(server.url, prefix="test:")
    yield s
    s.close()


RECORD = {"response": {"id": "resp_1", "output": [{"type": "message", "text": "héllo 👋"}]},
          "input": [{"type": "message", "role": "user"}], "owner": "key:key_1"}


def test_put_get_delete(store):
    assert store.get_response("resp_1") is None and store.delete_response("resp_1") is False
    store.put_response("resp_1", RECORD, 60)
    got = store.get_response("resp_1")
    assert got == RECORD and got is not RECORD  # a copy, as JSON keeps it
    got["owner"] = "someone else"
    assert store.get_response("resp_1")["owner"] == "key:key_1"
    store.put_response("resp_1", {**RECORD, "owner": None}, 60)  # replaced
    assert store.get_response("resp_1")["owner"] is None
    assert store.delete_response("resp_1") is True
    assert store.get_response("resp_1") is None and store.delete_response("resp_1") is False
    with pytest.raises(ValueError, match="ttl_s"):
        store.put_response("resp_2", RECORD, 0)
    with pytest.raises(ResponseTooLarge):
        store.put_response("resp_3", {"text": "x" * MAX_RESPONSE_RECORD_BYTES}, 60)
    assert store.get_response("resp_3") is None


def test_redis_keeps_a_record_for_its_ttl(redis_server):
    store = RedisStateStore(redis_server.url, prefix="ttl:")
    store.put_response("resp_t", RECORD, 30 * 86400)
    with redis_server.client() as c:
        assert 30 * 86400 - 5 <= c.ttl("ttl:resp:resp_t") <= 30 * 86400
        c.set("ttl:resp:resp_bad", "{not json")
    store.put_response("resp_short", RECORD, 0.2)  # whole seconds in Redis: at least one
    with redis_server.client() as c:
        assert c.ttl("ttl:resp:resp_short") == 1
    assert store.get_response("resp_bad") is None  # a value that is not JSON is no record
    store.close()


def test_in_process_records_expire_and_the_oldest_are_evicted():
    clock = Clock()
    store = InProcessStateStore(clock, max_responses=3, max_response_bytes=10_000)
    store.put_response("resp_a", RECORD, 10)
    clock.now += 10
    assert store.get_response("resp_a") is None and store.delete_response("resp_a") is False
    for name in "bcde":
        store.put_response(f"resp_{name}", RECORD, 100)
    assert store.get_response("resp_b") is None  # four records, room for three: the oldest went
    assert all(store.get_response(f"resp_{n}") is not None for n in "cde")
    size = len(response_json(RECORD))
    big = {"text": "y" * (10_000 - size - 20)}  # fits beside one record of the three, not two
    store.put_response("resp_big", big, 100)  # the bytes bound: the oldest make room
    assert store.get_response("resp_big") == big
    assert [store.get_response(f"resp_{n}") is None for n in "cde"] == [True, True, False]


def test_the_owner_is_the_callers_key():
    """What stored responses are scoped by: a store key's id, a static key's digest (never the key),
    nobody on an open API."""
    store = InProcessStateStore()
    raw, record = store.create_key("app")

    async def who(auth: Authenticator, token: str | None) -> str | None:
        await auth.check(token)
        return current_identity.get()

    auth = Authenticator(["static-key"], store=store)
    assert asyncio.run(who(auth, raw)) == f"key:{record.id}"
    assert asyncio.run(who(auth, "static-key")) == f"static:{hash_key('static-key')}"
    assert "static-key" not in asyncio.run(who(auth, "static-key"))
    assert asyncio.run(who(Authenticator(), "anything")) is None


# ---- previous_response_id over HTTP --------------------------------------------------------------

class Script:
    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if "<tool_response>" in prompt:
            return "Found it."
        return tool_call("lookup", '{"word": "moe"}')


@pytest.fixture(scope="module")
def scripted(qwen3_moe_path):
    with scripted_serving(qwen3_moe_path, Script()) as rig:
        yield rig


@pytest.mark.parametrize("backend", ["in-process", "redis"])
def test_previous_response_id_continues_the_conversation(scripted, request, backend):
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        stores = [RedisStateStore(server.url, prefix="conv:"), RedisStateStore(server.url, prefix="conv:")]
    else:
        stores = [InProcessStateStore()] * 2
    auth = Authenticator([KEY])

    def app(store):
        return build_http_app(scripted.serving, auth, responses=ResponsesServing(
            scripted.serving, FakeRunner(), store, ResponsesSettings(store_ttl_s=3600)))

    # two gateways over one store (with Redis, two replicas): the second continues the first's response
    with http_server(app(stores[0])) as one, http_server(app(stores[1])) as two:
        first_client = openai.OpenAI(base_url=f"{one}/v1", api_key=KEY, max_retries=0)
        second_client = openai.OpenAI(base_url=f"{two}/v1", api_key=KEY, max_retries=0)
        first = first_client.responses.create(model="tiny", input="What does MoE mean?", tools=[LOOKUP],
                                              instructions="Answer in one word.")
        (call,) = first.output
        assert call.type == "function_call" and call.arguments == '{"word":"moe"}'
        second = second_client.responses.create(model="tiny", previous_response_id=first.id, tools=[LOOKUP],
                                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                                        "output": "mixture of experts"}])
        assert second.output_text == "Found it." and second.previous_response_id == first.id
        prompt = scripted.script.prompts[-1]
        assert "What does MoE mean?" in prompt and "<tool_response>\nmixture of experts\n</tool_response>" in prompt
        assert '{"name": "lookup", "arguments": {"word": "moe"}}' in prompt
        assert "Answer in one word." not in prompt  # instructions are not carried over
        assert second_client.responses.retrieve(first.id).output[0].call_id == call.call_id
        third = first_client.responses.create(model="tiny", previous_response_id=second.id, input="Thanks!",
                                              tools=[LOOKUP])
        listed = [i.type for i in first_client.responses.input_items.list(third.id, order="asc").data]
        assert listed == ["message", "function_call", "function_call_output", "message", "message"]
        assert scripted.script.prompts[-1].count("mixture of experts") == 1
    for s in stores:
        s.close()


def test_stored_response_paths_count_under_the_responses_endpoint():
    from expertmesh.gateway.metrics import endpoint_of

    assert endpoint_of("/v1/responses") == endpoint_of("/v1/responses/resp_1") == "responses"
    assert endpoint_of("/v1/responses/resp_1/input_items") == "responses"
    assert endpoint_of("/v1/responsesX") == "other" and endpoint_of("/v1/models/x") == "models"
