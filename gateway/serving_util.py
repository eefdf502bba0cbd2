"""Small pieces of the OpenAI serving layer (`serving.py`): draining streams, finish reasons and
usage, tool-message checks, prompt lists, and which parameter an engine's refusal names."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from expertmesh.engine.outputs import CompletionOutput, RequestOutput
from expertmesh.engine.parsers import ParsedDelta, ToolCall
from expertmesh.gateway.protocol import APIError, brief

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
                    "thinking_budget", "guided_decoding")
"""Sampling parameters an engine refusal may name (`_param_of`)."""


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Drain a stream into its final output (every choice complete)."""
    merged: dict[int, CompletionOutput] = {}
    final = None
    async for out in stream:
        for c in out.outputs:
            merged[c.index] = c
        final = out
    if final is None:
        raise APIError("the engine returned no output", status=500, type="server_error")
    for c in merged.values():
        if c.finish_reason == "error":
            raise APIError(c.error or "the engine failed this request", status=500, type="server_error")
    final.outputs = [merged[i] for i in sorted(merged)]
    return final


async def _all_or_none(*coros):
    """asyncio.gather, but the first failure cancels the rest: one prompt of a completion refused
    (a 429 of its token budget, a grammar the engine refuses) stops its siblings' generation too."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _join(a: ParsedDelta, b: ParsedDelta) -> ParsedDelta:
    return ParsedDelta(a.reasoning + b.reasoning, a.content + b.content)


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finish_reason(out: CompletionOutput, called: bool) -> str | None:
    if out.finish_reason == "stop" and called:
        return "tool_calls"
    return out.finish_reason


def _usage(final: RequestOutput) -> dict[str, Any]:
    return _usage_counts(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs),
                         final.num_cached_tokens)


def _usage_counts(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _starts_in_reasoning(prompt: str) -> bool:
    """The prompt leaves the model inside <think> (Qwen3-2507 thinking templates)."""
    tail = prompt.rsplit("<|im_start|>", 1)[-1]
    return "<think>" in tail and "</think>" not in tail.rsplit("<think>", 1)[-1]


def _check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Every `role: tool` message answers a call an earlier assistant message made."""
    call_ids: set[str] = set()
    any_call = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            for c in m["tool_calls"]:
                any_call = True
                if isinstance(c, dict) and isinstance(c.get("id"), str):
                    call_ids.add(c["id"])
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):  # a list or object is not even hashable
                raise APIError(f"messages[{i}].tool_call_id must be a string, got {brief(call_id)}",
                               param=f"messages[{i}].tool_call_id", code="invalid_type")
            if not any_call:
                raise APIError(f"messages[{i}] is a tool result, but no earlier assistant message made a tool call",
                               param=f"messages[{i}]")
            if call_id is not None and call_ids and call_id not in call_ids:
                known = sorted(call_ids)
                shown = ", ".join(brief(k) for k in known[:3]) + (", ..." if len(known) > 3 else "")
                raise APIError(f"messages[{i}].tool_call_id {brief(call_id)} matches no earlier tool call "
                               f"(known ids: {shown})", param=f"messages[{i}].tool_call_id")



def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _param_of(message: str, max_param: str, guided_param: str | None = None, chat: bool = True) -> str | None:
    """The request field an engine message names (its first word), in OpenAI's names (chat's
    `top_logprobs` is the engine's `logprobs`; completions call it `logprobs`)."""
    word = message.split(" ", 1)[0].rstrip(":")
    if guided_param is not None and (word.startswith(("guided_decoding", "tool_calls")) or word == "invalid"):
        return guided_param
    if word == "max_tokens":
        return max_param
    if word == "logprobs":
        return "top_logprobs" if chat else "logprobs"
    return word if word in _SAMPLING_FIELDS else None
