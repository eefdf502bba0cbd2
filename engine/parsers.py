"""Streaming parsers for Qwen3 output text: thinking first, then tool calls.

The engine streams text deltas; a tag such as `</think>` may be split across deltas at any
character. Each parser keeps the undecided tail of what it was fed (a possible partial tag)
and emits only text whose meaning is settled. Run them in series, the tool parser over the
reasoning parser's content only (a `<tool_call>` written while thinking is not a call):

    delta --> ReasoningParser --reasoning--> reasoning_content
                              --content----> ToolCallParser --content--> content
                                                            --calls----> tool_calls

ReasoningParser:

    START --"<think>" (after optional whitespace)--> REASONING
    START --other text--> REASONING if starts_in_reasoning else CONTENT
    REASONING --"</think>"--> CONTENT      (whitespace right after the tag is dropped)
    CONTENT: pass-through, no more tags are read

ToolCallParser:

    OUTSIDE --"<tool_call>"--> INSIDE --"</tool_call>"--> OUTSIDE, plus one ToolCall
                                                          (or the raw block as content if
                                                           its body is not a valid call)
    INSIDE --end of output--> dropped: an unfinished call never reaches content

Whitespace right before a parsed call, between calls, and after the last call at the end
(Qwen writes newlines around its calls) is dropped from content; for that the tool parser
holds trailing whitespace until the next non-whitespace character shows it is inner text.
`finish()` releases whatever else is still held, as text, except markup cut off: a block that
was opened and never closed (the output ran out of tokens, or ended, inside a call) is dropped
with the whitespace before it, and so is a partial `<tool_call>` tag when the output was
truncated (finish_reason "length"): `content` never holds tool-call markup, and the response's
finish_reason tells the client the call was cut.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


@dataclass(frozen=True)
class ParsedDelta:
    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True)
class ToolCall:
    index: int
    """0, 1, ... in the order the calls were written."""
    id: str
    """`call_` + 24 hex characters, unique per call."""
    name: str
    arguments: str
    """The arguments object as compact JSON text (`ensure_ascii=False`)."""


@dataclass(frozen=True)
class ToolCallDelta:
    content: str = ""
    """Text outside tool-call blocks."""
    calls: tuple[ToolCall, ...] = ()
    """Calls completed by this delta."""


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _split_held(text: str, tag: str) -> tuple[str, str]:
    """(text that is settled, tail that may still become `tag`)."""
    keep = _partial_tag_len(text, tag)
    return text[:len(text) - keep], text[len(text) - keep:]


class ReasoningParser:
    """Splits output text into reasoning (inside `<think>`) and content (after `</think>`)."""

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._after_start = _REASONING if starts_in_reasoning else _CONTENT
        self._state = _START
        self._buf = ""
        self._strip_newline = False  # one "\n" right after <think>
        self._strip_space = False  # all whitespace right after </think>

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING or (self._state == _START and self._after_start == _REASONING)

    def feed(self, delta: str) -> ParsedDelta:
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == _START:
                head = self._buf.lstrip()
                if head != THINK_OPEN and THINK_OPEN.startswith(head):  # empty, or a partial "<think>": wait
                    break
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                    self._state, self._strip_newline = _REASONING, True
                else:
                    self._state = self._after_start
            elif self._state == _REASONING:
                end = self._buf.find(THINK_CLOSE)
                if end < 0:
                    settled, self._buf = _split_held(self._buf, THINK_CLOSE)
                    reasoning.append(settled)
                    break
                reasoning.append(self._buf[:end])
                self._buf = self._buf[end + len(THINK_CLOSE):]
                self._state, self._strip_space = _CONTENT, True
            else:
                content.append(self._buf)
                self._buf = ""
                break
        return self._emit("".join(reasoning), "".join(content))

    def finish(self, truncated: bool = False) -> ParsedDelta:
        """Releases the held tail: a partial tag that never completed is plain text, unless the
        output was `truncated` (cut by max_tokens), where it is a tag cut off and dropped."""
        held, self._buf = self._buf, ""
        if truncated and held.strip():
            held = ""
        if self.in_reasoning:
            return self._emit(held, "")
        return self._emit("", held)

    def _emit(self, reasoning: str, content: str) -> ParsedDelta:
        if self._strip_newline and reasoning:
            reasoning = reasoning.removeprefix("\n")
            self._strip_newline = False
        if self._strip_space and content:
            content = content.lstrip()
            self._strip_space = not content
        return ParsedDelta(reasoning, content)


class ToolCallParser:
    """Finds `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in content.

    `tool_names`, when given, is the set of callable names; a block naming another tool is
    returned as content, like any other block that is not a valid call.
    """

    def __init__(self, tool_names: set[str] | None = None) -> None:
        self._tool_names = frozenset(tool_names) if tool_names is not None else None
        self._inside = False
        self._buf = ""  # outside: a possible partial "<tool_call>"; inside: the block body so far
        self._space = ""  # trailing whitespace held back outside blocks
        self._after_call = False  # the last thing seen was a parsed call: held whitespace trails it
        self._num_calls = 0

    @property
    def called(self) -> bool:
        return self._num_calls > 0

    def feed(self, content_delta: str) -> ToolCallDelta:
        self._buf += content_delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._inside:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    settled, self._buf = _split_held(self._buf, CALL_OPEN)
                    self._text(settled, content)
                    break
                self._text(self._buf[:start], content)
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._inside = True
            else:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    break
                body = self._buf[:end]
                self._buf = self._buf[end + len(CALL_CLOSE):]
                self._inside = False
                call = self._parse(body)
                if call is None:
                    self._text(CALL_OPEN + body + CALL_CLOSE, content)
                else:
                    calls.append(call)
                    self._space, self._after_call = "", True
        return ToolCallDelta("".join(content), tuple(calls))

    def finish(self, truncated: bool = False) -> ToolCallDelta:
        """Releases held text. An unterminated block is dropped, and with `truncated` (the output
        was cut by max_tokens) so is a held partial `<tool_call>` tag; without it, a partial tag
        is only text that looked like one."""
        content: list[str] = []
        cut_markup = self._inside or (truncated and bool(self._buf))
        held = "" if cut_markup else self._buf
        self._buf, self._inside = "", False
        self._text(held, content)
        if not self._after_call and not cut_markup:
            content.append(self._space)
        self._space = ""
        return ToolCallDelta("".join(content))

    def _text(self, text: str, out: list[str]) -> None:
        """Emits plain text, holding its trailing whitespace until more text shows it is inner."""
        text = self._space + text
        head = text.rstrip()
        self._space = text[len(head):]
        if head:
            out.append(head)
            self._after_call = False

    def _parse(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body, strict=False)  # a raw control character in a string is still a call
            if isinstance(obj, dict) and isinstance(obj.get("arguments"), str):
                obj["arguments"] = json.loads(obj["arguments"])
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        name, arguments = obj.get("name"), obj.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return None
        if self._tool_names is not None and name not in self._tool_names:
            return None
        call = ToolCall(index=self._num_calls, id="call_" + secrets.token_hex(12), name=name,
                        arguments=json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))
        self._num_calls += 1
        return call


def parse_stream(deltas: Iterable[str], starts_in_reasoning: bool = False,
                 tool_names: set[str] | None = None, truncated: bool = False) -> tuple[str, str, list[ToolCall]]:
    """Runs both parsers over text deltas, as a server does; returns (reasoning, content, calls).
    `truncated`: the output was cut by max_tokens."""
    thinking, tools = ReasoningParser(starts_in_reasoning), ToolCallParser(tool_names)
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[ToolCall] = []

    def take(parsed: ParsedDelta, last: bool) -> None:
        reasoning.append(parsed.reasoning)
        for out in [tools.feed(parsed.content)] + ([tools.finish(truncated)] if last else []):
            content.append(out.content)
            calls.extend(out.calls)

    for delta in deltas:
        take(thinking.feed(delta), last=False)
    take(thinking.finish(truncated), last=True)
    return "".join(reasoning), "".join(content), calls


def split_reasoning_and_tools(text: str, starts_in_reasoning: bool = False, tool_names: set[str] | None = None,
                              truncated: bool = False) -> tuple[str, str, list[ToolCall]]:
    """Non-streaming use: the whole output as one delta. Returns (reasoning, content, calls)."""
    return parse_stream([text], starts_in_reasoning, tool_names, truncated)
