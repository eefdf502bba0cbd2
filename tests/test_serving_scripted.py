"""The serving layer's thinking and tool-call parsing on exact token streams.

A random-weight model never writes `<think>` or `<tool_call>`, so a scripted executor replays
chosen replies through the real engine (scheduler, detokenizer, AsyncEngine) and the OpenAI
serving layer. Each reply is also re-tokenized with a cut at every character position of every
tag, so the tag reaches the parsers split across two streamed deltas.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from expertmesh.engine.async_engine import AsyncEngine
from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.scripted import ScriptedExecutor
from expertmesh.gateway.protocol import ChatCompletionRequest
from expertmesh.gateway.serving import LocalEngineClient, OpenAIServing, ServingSettings
from expertmesh.model.config import ModelConfig
from expertmesh.model.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}

THINK_THEN_ANSWER = "<think>\nThe user greets me. Keep it short.\n</think>\n\nHello! 你好 👋"
THINK_THEN_CALLS = ('<think>\nI need the weather and the time; a <tool_call> here is only a thought.\n</think>\n\n'
                    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


class Script:
    """Reply tokens per request, chosen by the test before each request."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, prompt_ids: list[int]) -> list[int]:
        return list(self.tokens)


@pytest.fixture(scope="module")
def rig(qwen3_moe_path):
    tokenizer = Tokenizer.from_pretrained(qwen3_moe_path)
    config = EngineConfig(load=ModelLoadConfig(str(qwen3_moe_path), device="cpu", max_model_len=1024),
                          cache=CacheConfig(block_size=4, num_blocks=512))
    script = Script()
    eos = tokenizer.token_to_id("<|im_end|>")
    executor = ScriptedExecutor(ModelConfig.from_pretrained(qwen3_moe_path), 512, script, fallback_token=eos)
    engine = AsyncEngine(EngineCore(config, executor, tokenizer))
    serving = OpenAIServing(LocalEngineClient(engine), tokenizer, ServingSettings("tiny", 1024))
    yield serving, script, tokenizer, engine
    engine.shutdown()


def split_tokens(tokenizer: Tokenizer, text: str, cut: int | None) -> list[int]:
    """Token ids of `text`, tokenized as two pieces cut at `cut` (None: whole)."""
    if cut is None:
        return tokenizer.encode(text)
    return tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:])


def tag_cuts(text: str) -> list[int | None]:
    """Every position strictly inside every tag occurrence, plus None (no cut)."""
    cuts: list[int | None] = [None]
    for tag in TAGS:
        start = text.find(tag)
        while start != -1:
            cuts.extend(range(start + 1, start + len(tag)))
            start = text.find(tag, start + 1)
    return cuts


def chat(serving, stream: bool, tools=None, **extra):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], stream=stream, tools=tools,
                                max_tokens=400, **extra)

    async def run():
        result = await serving.chat(req)
        if not stream:
            return result
        return [chunk async for chunk in result]

    return asyncio.run(run())


def collect(chunks):
    reasoning, content, calls, finish = [], [], [], None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
            calls.extend(delta.get("tool_calls") or [])
            finish = choice["finish_reason"] or finish
    return "".join(reasoning), "".join(content), calls, finish


@pytest.mark.parametrize("cut", tag_cuts(THINK_THEN_ANSWER))
def test_thinking_split_anywhere_goes_to_reasoning_content(rig, cut):
    serving, script, tokenizer, _ = rig
    script.tokens = split_tokens(tokenizer, THINK_THEN_ANSWER, cut)
    reasoning, content, calls, finish = collect(chat(serving, stream=True))
    assert reasoning.strip("\n") == "The user greets me. Keep it short."
    assert content == "Hello! 你好 👋"
    assert calls == [] and finish == "stop"


@pytest.mark.parametrize("cut", tag_cuts(THINK_THEN_CALLS))
def test_parallel_tool_calls_split_anywhere_stream_as_calls(rig, cut):
    serving, script, tokenizer, _ = rig
    script.tokens = split_tokens(tokenizer, THINK_THEN_CALLS, cut)
    reasoning, content, calls, finish = collect(chat(serving, stream=True, tools=[WEATHER, TIME]))
    assert "<tool_call> here is only a thought" in reasoning  # a call written while thinking is no call
    assert content == ""
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"zone": "CET"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert finish == "tool_calls"


def test_non_streaming_chat_parses_the_same(rig):
    serving, script, tokenizer, _ = rig
    script.tokens = tokenizer.encode(THINK_THEN_CALLS)
    response = chat(serving, stream=False, tools=[WEATHER, TIME])
    message = response["choices"][0]["message"]
    assert message["content"] is None
    assert message["reasoning_content"].strip().startswith("I need the weather")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert response["choices"][0]["finish_reason"] == "tool_calls"
    assert response["usage"]["completion_tokens"] == len(script.tokens) + 1  # and the closing <|im_end|>


def test_prompt_that_opens_think_needs_only_the_closing_tag(rig, thinking_model_path):
    """Qwen3-2507 thinking templates put `<think>\n` into the prompt; the output holds only `</think>`."""
    serving, script, _, _ = rig
    tokenizer = Tokenizer.from_pretrained(thinking_model_path)
    opening = OpenAIServing(serving.client, tokenizer, serving.settings)
    reply = "Reasoning without an opening tag.\n</think>\n\nThe answer."
    for cut in tag_cuts(reply):
        script.tokens = split_tokens(tokenizer, reply, cut)
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=100)
        assert opening.prepare_chat(req).prompt.endswith("<|im_start|>assistant\n<think>\n")
        message = asyncio.run(opening.chat(req))["choices"][0]["message"]
        assert message["reasoning_content"].strip("\n") == "Reasoning without an opening tag."
        assert message["content"] == "The answer."


def test_tool_choice_none_returns_tags_as_text(rig):
    serving, script, tokenizer, _ = rig
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    script.tokens = tokenizer.encode(text)
    response = chat(serving, stream=False, tools=[WEATHER], tool_choice="none",
                    chat_template_kwargs={"enable_thinking": False})
    message = response["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"] == text
    assert response["choices"][0]["finish_reason"] == "stop"


def test_usage_in_the_last_stream_chunk(rig):
    serving, script, tokenizer, _ = rig
    script.tokens = tokenizer.encode("Short reply.")
    chunks = chat(serving, stream=True, stream_options={"include_usage": True},
                  chat_template_kwargs={"enable_thinking": False})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == len(script.tokens) + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all("usage" not in c for c in chunks[:-1])


def test_required_tool_calls_cut_by_max_tokens_anywhere_leave_no_markup_in_content(rig):
    """tool_choice "required" (the grammar enforces the calls), the reply cut by max_tokens after
    every token: the complete calls come back as tool_calls, never any markup as content, and
    finish_reason is "length" until the reply is whole; streaming and not alike."""
    serving, script, tokenizer, _ = rig
    script.tokens = tokenizer.encode(THINK_THEN_CALLS)
    for max_tokens in range(1, len(script.tokens) + 2):
        shown = tokenizer.decode(script.tokens[:max_tokens], skip_special_tokens=False)
        answer = shown.split("</think>", 1)[1] if "</think>" in shown else ""
        complete = answer.count("</tool_call>")
        for stream in (False, True):
            req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], stream=stream,
                                        tools=[WEATHER, TIME], tool_choice="required", max_tokens=max_tokens)

            async def run(req=req):
                result = await serving.chat(req)
                return result if not req.stream else [chunk async for chunk in result]

            result = asyncio.run(run())
            if stream:
                _, content, calls, finish = collect(result)
                names = [c["function"]["name"] for c in calls]
            else:
                message = result["choices"][0]["message"]
                content, finish = message["content"] or "", result["choices"][0]["finish_reason"]
                names = [c["function"]["name"] for c in message.get("tool_calls") or []]
            where = (max_tokens, stream, content)
            assert content == "", where  # only calls under "required": no text, no markup
            assert names == ["get_weather", "get_time"][:complete], where
            assert finish == ("length" if max_tokens <= len(script.tokens) else "tool_calls"), where
