"""Whether an answer to a corpus example is right: one rule per task family.

Shared by the training run's quick greedy check (raw completion text, `parse_completion`) and the
evaluation through the served API (content, reasoning_content and tool_calls as the API returns them).
"""
from __future__ import annotations

import json
import re

from expertmesh.demo.corpus import Example

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_completion(text: str) -> tuple[str, str, list[dict]]:
    """(content, reasoning, tool calls as {"name", "arguments"}) of a raw assistant turn."""
    text = text.split("<|im_end|>")[0]
    reasoning = ""
    if "</think>" in text:
        reasoning, text = text.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "").strip("\n")
    calls = []
    for body in _CALL.findall(text):
        try:
            calls.append(json.loads(body))
        except json.JSONDecodeError:
            calls.append({"name": None, "arguments": body})
    content = _CALL.sub("", text).strip()
    return content, reasoning, calls


def _number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1] if found else None


def _python_ok(content: str, name: str, tests: list) -> bool:
    match = re.search(r"```(?:python)?\n(.*?)```", content, re.S)
    namespace: dict = {}
    try:
        exec(match.group(1) if match else content, namespace)  # our model's code, in our evaluation
        return all(namespace[name](arg) == want for arg, want in tests)
    except Exception:
        return False


def is_correct(example: Example, content: str | None, reasoning: str | None, calls: list[dict]) -> bool:
    """`calls`: [{"name", "arguments": dict}] (arguments already parsed)."""
    content, reasoning, want = (content or "").strip(), reasoning or "", example.expect
    family = example.family
    if family in ("arith_think", "arith_direct"):
        return not calls and _number(content) == str(want["answer"]) and content.strip() == str(want["answer"])
    if family == "tool_call":
        return len(calls) == 1 and calls[0].get("name") == want["call"]["name"] and \
            calls[0].get("arguments") == want["call"]["arguments"]
    if family == "tool_answer":
        return not calls and all(str(v) in content for v in want.values())
    if family == "json":
        try:
            return json.loads(content) == want["value"]
        except json.JSONDecodeError:
            return False
    if family == "phrasebook":
        return want["word"].lower() in content.lower()
    if family == "python":
        return _python_ok(content, want["name"], want["tests"])
    if family == "fewshot":
        return content == want["answer"]
    return content in want["answer"]
