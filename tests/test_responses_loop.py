"""The Responses API's tool loop on exact replies (a scripted engine, the real tokenizer, template,
parsers and serving layer; a fake tool runner): rounds, the round limit, concurrent calls, mixed
client and server calls, reasoning, the token budget over turns, engine failure mid-loop, and the
conversation the model sees. `tests/test_responses.py` runs the real tiny model over HTTP and gRPC.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from responses_rig import LOOKUP, FakeRunner, Script, scripted_serving, tool_call, wait_idle

from expertmesh.gateway.protocol import APIError
from expertmesh.gateway.responses import ResponsesServing, ResponsesSettings
from expertmesh.gateway.responses_protocol import parse_request, to_messages
from expertmesh.gateway.tools.types import ToolResult

CALC = {"type": "mcp", "server_label": "calc", "require_approval": "never"}


@pytest.fixture(scope="module")
def rig(qwen3_moe_path):
    with scripted_serving(qwen3_moe_path, Script()) as s:
        yield s


@pytest.fixture
def runner(rig):
    rig.script.prompts.clear()
    return FakeRunner()


def serve(rig, runner, max_tool_rounds: int = 8) -> ResponsesServing:
    return ResponsesServing(rig.serving, runner, settings=ResponsesSettings(max_tool_rounds=max_tool_rounds))


def create(responses: ResponsesServing, **body):
    """The response (unary), or the list of events (stream)."""
    async def go():
        result = await responses.create(parse_request({"input": "What is 1+2?", **body}))
        if isinstance(result, dict):
            return result
        return [event async for event in result]

    return asyncio.run(go())


def kinds(response) -> list[str]:
    return [item["type"] for item in response["output"]]


def rounds_then_answer(prompt: str) -> str:
    """One call of `add` per turn until the prompt holds two tool responses, then the answer. (Spaced
    as the grammar of a forced turn writes JSON; the parser hands the arguments on compact.)"""
    return "It is 3." if prompt.count("<tool_response>") >= 2 else tool_call("add", '{"a": 1, "b": 2}')


def test_calls_run_until_a_final_message_and_the_model_sees_every_output(rig, runner):
    rig.script.reply = rounds_then_answer
    r = create(serve(rig, runner), tools=[CALC])
    assert r["status"] == "completed" and kinds(r) == ["mcp_call", "mcp_call", "message"]
    assert runner.calls == [("add", '{"a":1,"b":2}')] * 2
    call = r["output"][0]
    assert (call["server_label"], call["name"], call["status"], call["error"]) == ("calc", "add", "completed", None)
    assert call["output"] == 'add ok: {"a":1,"b":2}'
    assert r["output"][2]["content"] == [{"type": "output_text", "text": "It is 3.", "annotations": []}]
    # turn 2 read turn 1's call and its output; turn 3 both rounds
    assert len(rig.script.prompts) == 3
    assert rig.script.prompts[2].count('<tool_response>\nadd ok: {"a":1,"b":2}\n</tool_response>') == 2
    assert r["usage"]["input_tokens"] > 0 and r["usage"]["total_tokens"] == (
        r["usage"]["input_tokens"] + r["usage"]["output_tokens"])
    assert wait_idle(rig.engine)["kv_usage"] == 0.0


def test_the_round_limit_leaves_calls_unrun_as_error_items(rig, runner):
    rig.script.reply = lambda prompt: tool_call("add", '{"a":1,"b":1}')  # a model that never stops calling
    r = create(serve(rig, runner, max_tool_rounds=2), tools=[CALC])
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_tool_rounds"}
    assert kinds(r) == ["mcp_call"] * 3 and len(runner.calls) == 2
    unrun = r["output"][2]
    assert unrun["status"] == "incomplete" and unrun["output"] is None
    assert "max_tool_rounds" in unrun["error"] and "2 rounds" in unrun["error"]
    # the request's max_tool_calls counts calls over every turn (OpenAI's meaning)
    runner.calls.clear()
    r = create(serve(rig, runner, max_tool_rounds=2), tools=[CALC], max_tool_calls=1)
    assert kinds(r) == ["mcp_call"] * 2 and len(runner.calls) == 1
    assert r["incomplete_details"] == {"reason": "max_tool_calls"} and "max_tool_calls" in r["output"][1]["error"]
    runner.calls.clear()  # two calls in one turn, one allowed: the first runs, the second does not
    rig.script.reply = lambda prompt: (tool_call("add", '{"a":1,"b":1}') + "\n" + tool_call("add", '{"a":2,"b":2}')
                                       if "<tool_response>" not in prompt else "done")
    r = create(serve(rig, runner, max_tool_rounds=2), tools=[CALC], max_tool_calls=1)
    assert [(i["status"], i["arguments"]) for i in r["output"]] == [
        ("completed", '{"a":1,"b":1}'), ("incomplete", '{"a":2,"b":2}')]
    assert runner.calls == [("add", '{"a":1,"b":1}')] and r["incomplete_details"] == {"reason": "max_tool_calls"}


def test_a_turns_calls_run_concurrently(rig, runner):
    both = tool_call("add", '{"a":1,"b":2}') + "\n" + tool_call("echo", '{"word":"hello"}')
    rig.script.reply = lambda prompt: "Done." if "<tool_response>" in prompt else both
    started: list[str] = []

    async def meet(name: str):
        started.append(name)
        while len(started) < 2:  # returns only once the other call has started too
            await asyncio.sleep(0.01)
        return ToolResult(f"{name} met", None, 0.01)

    runner.behaviour = {"add": lambda a: asyncio.wait_for(meet("add"), 5), "echo": lambda a: asyncio.wait_for(
        meet("echo"), 5)}
    r = create(serve(rig, runner), tools=[CALC])
    assert kinds(r) == ["mcp_call", "mcp_call", "message"] and r["status"] == "completed"
    assert [i["output"] for i in r["output"][:2]] == ["add met", "echo met"]
    # parallel_tool_calls false: the turn's first call only
    started.clear()
    runner.behaviour = {}
    r = create(serve(rig, runner), tools=[CALC], parallel_tool_calls=False)
    assert kinds(r) == ["mcp_call", "message"] and r["output"][0]["name"] == "add"


def test_a_client_function_call_ends_the_response_after_the_server_calls_of_its_turn(rig, runner):
    both = tool_call("lookup", '{"word":"moe"}') + "\n" + tool_call("echo", '{"word":"world"}')
    rig.script.reply = lambda prompt: both
    r = create(serve(rig, runner), tools=[CALC, LOOKUP])
    assert r["status"] == "completed" and kinds(r) == ["function_call", "mcp_call"]
    fc = r["output"][0]
    assert (fc["name"], fc["arguments"], fc["status"]) == ("lookup", '{"word":"moe"}', "completed")
    assert fc["call_id"].startswith("call_") and fc["id"].startswith("fc_")
    assert runner.calls == [("echo", '{"word":"world"}')] and len(rig.script.prompts) == 1


def test_reasoning_is_an_item_and_counted(rig, runner):
    rig.script.reply = lambda prompt: ("<think>\nAdd them with the tool.\n</think>\n\n"
                                       + (tool_call("add", '{"a":1,"b":2}') if "<tool_response>" not in prompt
                                          else "Three."))
    r = create(serve(rig, runner), tools=[CALC])
    assert kinds(r) == ["reasoning", "mcp_call", "reasoning", "message"]
    assert r["output"][0]["content"] == [{"type": "reasoning_text", "text": "Add them with the tool.\n"}]
    assert r["output"][0]["summary"] == [] and r["output"][3]["content"][0]["text"] == "Three."
    details = r["usage"]["output_tokens_details"]
    assert 0 < details["reasoning_tokens"] < r["usage"]["output_tokens"]


def test_stream_events_build_the_unary_response(rig, runner):
    rig.script.reply = lambda prompt: ("<think>\nhm\n</think>\n\n" + ("Three." if "<tool_response>" in prompt
                                                                     else tool_call("add", '{"a":1,"b":2}')))
    unary = create(serve(rig, runner), tools=[CALC])
    events = create(serve(rig, runner), tools=[CALC], stream=True)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    strip = [{k: v for k, v in item.items() if k != "id"} for item in final["output"]]
    assert strip == [{k: v for k, v in item.items() if k != "id"} for item in unary["output"]]
    for key in ("input_tokens", "output_tokens", "output_tokens_details", "total_tokens"):  # (cached: the
        assert final["usage"][key] == unary["usage"][key]  # prefix cache now holds the unary's prompts)
    # each item: added, its deltas, done (the done event carries the final item)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    call = [t for t in types if "mcp_call" in t]
    assert call == ["response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
                    "response.mcp_call.in_progress", "response.mcp_call.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Three."


def test_max_output_tokens_is_one_budget_over_every_turn(rig, runner):
    call = tool_call("add", '{"a":1,"b":2}')
    rig.script.reply = lambda prompt: "One two three four five six seven eight nine ten." \
        if "<tool_response>" in prompt else call
    first = len(rig.tokenizer.encode(call)) + 1  # the call and the end-of-turn token
    r = create(serve(rig, runner), tools=[CALC], max_output_tokens=first + 3)
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["usage"]["output_tokens"] == first + 3
    assert kinds(r) == ["mcp_call", "message"] and r["output"][1]["status"] == "incomplete"
    # a budget spent exactly by a turn of calls stops before the next turn
    runner.calls.clear()
    r = create(serve(rig, runner), tools=[CALC], max_output_tokens=first)
    assert r["incomplete_details"] == {"reason": "max_output_tokens"} and len(runner.calls) == 1
    assert len(rig.script.prompts) == 3 and kinds(r) == ["mcp_call"]


def test_a_tool_that_fails_is_an_error_item_the_model_reads(rig, runner):
    rig.script.reply = lambda prompt: "Sorry." if "<tool_response>" in prompt else tool_call("add", '{"a":1,"b":2}')
    runner.behaviour = {"add": lambda a: ToolResult(None, "timed out after 30 s", 30.0)}
    r = create(serve(rig, runner), tools=[CALC])
    item = r["output"][0]
    assert (item["status"], item["error"], item["output"]) == ("failed", "timed out after 30 s", None)
    assert r["status"] == "completed" and "Error: timed out after 30 s" in rig.script.prompts[-1]

    def broken(arguments):
        raise RuntimeError("runner bug")

    runner.behaviour = {"add": broken}
    r = create(serve(rig, runner), tools=[CALC])
    assert r["output"][0]["status"] == "failed" and "runner bug" not in r["output"][0]["error"]
    # a stream says so with response.mcp_call.failed
    types = [e["type"] for e in create(serve(rig, runner), tools=[CALC], stream=True)]
    assert "response.mcp_call.failed" in types and types[-1] == "response.completed"


def test_an_engine_failure_mid_loop_is_an_error(rig, runner):
    rig.script.reply = lambda prompt: "x" if "<tool_response>" in prompt else tool_call("add", '{"a":1,"b":2}')
    core = rig.engine.core
    execute = core.executor.execute

    def fail_after_tools(plan):
        if any(rig.tokenizer.decode(list(r.prompt_token_ids)).count("<tool_response>") for r in plan.new_requests):
            raise RuntimeError("step exploded")
        return execute(plan)

    core.executor.execute = fail_after_tools
    try:
        with pytest.raises(APIError) as info:
            create(serve(rig, runner), tools=[CALC])
        assert info.value.status == 500 and info.value.type == "server_error"
        events = create(serve(rig, runner), tools=[CALC], stream=True)
    finally:
        core.executor.execute = execute
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert [i["type"] for i in failed["output"]] == ["mcp_call"]
    assert wait_idle(rig.engine)["kv_usage"] == 0.0


def test_a_forcing_choice_binds_the_first_turn_only(rig, runner):
    """Turn 1 is forced (the chat layer gets a named choice), later turns choose freely (auto)."""
    seen: list = []
    chat = rig.serving.chat

    async def spy(req):
        seen.append(req.tool_choice)
        return await chat(req)

    rig.script.reply = rounds_then_answer
    rig.serving.chat = spy
    try:
        r = create(serve(rig, runner), tools=[CALC], tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
    finally:
        del rig.serving.chat
    assert r["status"] == "completed"
    assert seen[0].function.name == "add" and seen[1:] == [None, None]


def test_to_messages_rebuilds_the_chat_of_a_conversation():
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}], "summary": []},
        {"type": "mcp_call", "id": "mcp_1", "server_label": "calc", "name": "add", "arguments": "{}",
         "output": None, "error": "boom"},
        {"type": "function_call", "call_id": "call_2", "name": "lookup", "arguments": '{"word":"moe"}'},
        {"type": "function_call_output", "call_id": "call_2", "output": "found"},
        {"type": "reasoning", "summary": []},  # nothing to carry
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
    ]
    assert to_messages("Sys.", items) == [
        {"role": "system", "content": "Sys."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "reasoning_content": "think", "tool_calls": [
            {"id": "mcp_1", "type": "function", "function": {"name": "add", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": '{"word":"moe"}'}}]},
        {"role": "tool", "tool_call_id": "mcp_1", "content": "Error: boom"},
        {"role": "tool", "tool_call_id": "call_2", "content": "found"},
        {"role": "assistant", "content": "done"},
    ]
    assert json.loads(json.dumps(items)) == items  # (what the store keeps round-trips)
