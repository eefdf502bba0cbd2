"""Thinking and tool-call parsers over text deltas split at every position, and through the engine."""
from __future__ import annotations

import json
import random

import pytest

from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.parsers import (
    ParsedDelta,
    ReasoningParser,
    ToolCallParser,
    parse_stream,
    split_reasoning_and_tools,
)
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scripted import ScriptedExecutor
from expertmesh.model.config import ModelConfig
from expertmesh.model.tiny import make_tiny
from expertmesh.model.tokenizer import Tokenizer

SAMPLE = ("<think>\nLet me think about <b>this</b>.\n</think>\n\nThe answer is 4."
          "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
          "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>")
EXPECTED_REASONING = "Let me think about <b>this</b>.\n"
EXPECTED_CONTENT = "The answer is 4."
EXPECTED_CALLS = [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {"tz": "CET"})]


def summary(result):
    reasoning, content, calls = result
    return reasoning, content, [(c.index, c.name, json.loads(c.arguments)) for c in calls]


def chunkings(text, seed=0, rounds=30):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(rounds if len(text) > 3 else 0):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 3)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_sample_gives_the_same_result_under_every_chunking():
    whole = summary(split_reasoning_and_tools(SAMPLE))
    assert whole == (EXPECTED_REASONING, EXPECTED_CONTENT, EXPECTED_CALLS)
    for deltas in chunkings(SAMPLE):
        assert summary(parse_stream(deltas)) == whole, deltas


def test_thinking_2507_output_has_only_the_closing_tag():
    text = "The user wants 2+2.\n</think>\n\nIt is 4."
    for deltas in chunkings(text):
        assert summary(parse_stream(deltas, starts_in_reasoning=True)) == ("The user wants 2+2.\n", "It is 4.", [])
    # A model that writes the opening tag anyway is read the same way.
    assert split_reasoning_and_tools("<think>\n" + text, starts_in_reasoning=True)[:2] == (
        "The user wants 2+2.\n", "It is 4.")
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.in_reasoning
    parser.feed("thinking </thi")
    assert parser.in_reasoning
    assert parser.feed("nk>\n\nanswer") == ParsedDelta(reasoning="", content="answer")
    assert not parser.in_reasoning


def test_thinking_off_everything_is_content():
    text = "\n\nJust an answer, with 4 < 5 and </b> tags."
    for deltas in chunkings(text):
        assert summary(parse_stream(deltas)) == ("", text, [])


def test_tool_call_inside_think_stays_reasoning():
    text = ('<think>\nI could write <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> here.\n'
            "</think>\n\nNo call.")
    for deltas in chunkings(text):
        reasoning, content, calls = parse_stream(deltas)
        assert calls == [] and content == "No call."
        assert reasoning == 'I could write <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> here.\n'


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"x": 1}',  # truncated JSON
    '{"name": 3, "arguments": {}}',  # name not a string
    '{"name": "f", "arguments": [1, 2]}',  # arguments not an object
    '{"name": "f", "arguments": "not json"}',
    '["f", {}]',
])
def test_invalid_block_comes_back_as_content(body):
    text = f"Before <tool_call>\n{body}\n</tool_call> after"
    for deltas in chunkings(text, rounds=5):
        assert summary(parse_stream(deltas)) == ("", text, [])


def test_whitespace_around_calls():
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert split_reasoning_and_tools(f"A\n{call}\n\nB \n")[1] == "A\n\nB \n"
    assert split_reasoning_and_tools(f"A \n{call}\n{call}\n")[1] == "A"
    assert split_reasoning_and_tools("Trailing space kept \n")[1] == "Trailing space kept \n"


def test_string_encoded_arguments_and_unknown_tool_names():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"q\\": \\"日本\\"}"}\n</tool_call>'
    _, content, calls = split_reasoning_and_tools(text)
    assert content == "" and calls[0].arguments == '{"q":"日本"}'
    _, content, calls = split_reasoning_and_tools(text, tool_names={"g"})
    assert content == text and calls == []


def test_unterminated_block_at_finish_never_reaches_content():
    text = 'Calling: <tool_call>\n{"name": "f", "arguments": {"x": '
    for truncated in (False, True):
        for deltas in chunkings(text, rounds=5):
            assert summary(parse_stream(deltas, truncated=truncated)) == ("", "Calling:", [])
    parser = ToolCallParser()
    assert parser.feed("x <tool_ca").content == "x"
    assert parser.finish().content == " <tool_ca" and not parser.called  # it ended there: only text


def test_output_cut_by_max_tokens_anywhere_leaves_no_markup_in_content():
    """Every prefix of a reply with a call, as a max_tokens cut leaves it: the complete calls are
    parsed, the text outside them is content, and nothing of a tag or a block is."""
    text = ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    first_end = text.index("</tool_call>") + len("</tool_call>")
    for end in range(len(text) + 1):
        cut = text[:end]
        for deltas in chunkings(cut, rounds=2):
            _, content, calls = parse_stream(deltas, truncated=end < len(text))
            assert "<" not in content and "tool_call" not in content, (end, content)
            assert content == (cut if end <= len("Sure. ") else "Sure."), (end, content)
            assert [c.name for c in calls] == ["get_weather", "get_time"][:(end >= first_end) + (end == len(text))]


def test_tag_lookalikes_are_released_as_content():
    for text in ["a < b and <thinking>", "<thinking> is not a tag", "<tool_calls> nor </tool_call", "<"]:
        for deltas in chunkings(text, rounds=5):
            assert summary(parse_stream(deltas)) == ("", text, []), deltas


def test_parallel_calls_are_indexed_with_unique_ids_and_flag_called():
    block = '<tool_call>\n{"name": "f", "arguments": {"i": %d}}\n</tool_call>\n'
    parser = ToolCallParser()
    calls = [c for i in range(20) for c in parser.feed(block % i).calls] + list(parser.finish().calls)
    assert [c.index for c in calls] == list(range(20))
    assert [json.loads(c.arguments)["i"] for c in calls] == list(range(20))
    assert len({c.id for c in calls}) == 20
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert parser.called


def test_engine_stream_matches_the_non_streaming_helper(tmp_path):
    path = make_tiny(tmp_path / "m")
    tok = Tokenizer.from_pretrained(path)
    eos = tok.eos_token_ids[0]
    config = EngineConfig(load=ModelLoadConfig(str(path), device="cpu"),
                          cache=CacheConfig(block_size=4, num_blocks=64), scheduler=SchedulerConfig())
    executor = ScriptedExecutor(ModelConfig.from_pretrained(path), 64,
                                lambda prompt: tok.encode(SAMPLE) + [eos], fallback_token=eos)
    engine = EngineCore(config, executor, tok)
    engine.add_request("r", tok.encode("What is 2+2? Then check the weather."), SamplingParams(max_tokens=400))

    thinking, tools = ReasoningParser(), ToolCallParser()
    reasoning, content, calls, deltas = [], [], [], []
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0].text_delta)
            parsed = thinking.feed(deltas[-1])
            reasoning.append(parsed.reasoning)
            found = tools.feed(parsed.content)
            content.append(found.content)
            calls.extend(found.calls)
    parsed = thinking.finish()
    reasoning.append(parsed.reasoning)
    for found in (tools.feed(parsed.content), tools.finish()):
        content.append(found.content)
        calls.extend(found.calls)

    assert "".join(deltas) == SAMPLE and len(deltas) > 20
    streamed = summary(("".join(reasoning), "".join(content), calls))
    assert streamed == summary(split_reasoning_and_tools(SAMPLE))
    assert streamed == (EXPECTED_REASONING, EXPECTED_CONTENT, EXPECTED_CALLS)
    assert tools.called


def test_output_cut_at_or_inside_a_think_tag_leaves_no_tag_in_content():
    assert parse_stream(["<think>"]) == ("", "", [])  # cut right after the tag: thinking had begun
    assert parse_stream(["  <thi"], truncated=True) == ("", "", [])
    assert parse_stream(["<thi"]) == ("", "<thi", [])  # the output ended there: text that looked like a tag
    assert parse_stream(["<think>\nabc</thi"], truncated=True) == ("abc", "", [])
