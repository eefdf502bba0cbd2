"""Held-out accuracy of the demo model per task family, through the served OpenAI API.

    python -m expertmesh.demo.evaluate [--model DIR] [--per-family N]

The OpenAI HTTP app (`gateway/http.py`) runs in this process over the in-process engine, and the
official `openai` client sends it the held-out examples of `demo/corpus.py` (numbers, cities,
names and phrasings the training split never holds), all at once so the engine batches them:
arithmetic with thinking on and off, tool choice and arguments (tool_choice auto), the answer
after the tool result, JSON extraction with and without a `json_schema` response_format, the
phrasebook, Python functions and few-shot transforms. It prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from expertmesh.demo.corpus import FAMILIES, Example, make_example, request_messages
from expertmesh.demo.scoring import is_correct

TARGETS = {"arith_think": 0.95, "arith_direct": 0.95, "tool_call": 0.95, "tool_answer": 0.90, "json": 0.95,
           "json_schema": 0.95, "phrasebook": 0.90, "fewshot": 0.80}
LABELS = {"arith_think": "arithmetic, thinking on", "arith_direct": "arithmetic, thinking off",
          "tool_call": "tool choice and arguments", "tool_answer": "answer after the tool result",
          "json": "JSON extraction", "json_schema": "JSON extraction, json_schema", "phrasebook": "phrasebook",
          "python": "Python functions", "fewshot": "few-shot transforms", "chat": "small talk"}
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                  "city": {"type": "string"}},
                 "required": ["name", "age", "city"], "additionalProperties": False}


@dataclass
class Served:
    """The in-process app and an `AsyncOpenAI` client of it; `run(coro)` runs on the serving loop."""

    client: object
    loop: asyncio.AbstractEventLoop
    engine: object

    def run(self, coro, timeout: float = 1800):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)


@contextlib.contextmanager
def served(model: str | None = None, max_model_len: int = 2048, **llm_kwargs) -> Iterator[Served]:
    """The OpenAI HTTP app over `LLM(model)` (None: the embedded default), in this process."""
    import httpx
    from openai import AsyncOpenAI

    from expertmesh import LLM
    from expertmesh.engine.async_engine import AsyncEngine
    from expertmesh.gateway.http import build_http_app
    from expertmesh.gateway.serving import LocalEngineClient, OpenAIServing, ServingSettings

    llm = LLM(model, max_model_len=max_model_len, progress=False, **llm_kwargs)
    engine = AsyncEngine(llm.engine)
    serving = OpenAIServing(LocalEngineClient(engine), llm.tokenizer, ServingSettings("demo", llm.engine.max_model_len))
    app = build_http_app(serving)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-serving", daemon=True)
    thread.start()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://demo", timeout=600)
    client = AsyncOpenAI(base_url="http://demo/v1", api_key="none", http_client=http, max_retries=0)
    try:
        yield Served(client, loop, engine)
    finally:
        asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        engine.shutdown()


def request_args(example: Example, schema: bool = False, max_tokens: int = 256) -> dict:
    """The chat.completions.create arguments of an example (greedy)."""
    args: dict = {"model": "demo", "messages": request_messages(example), "temperature": 0, "max_tokens": max_tokens}
    if example.tools:
        args.update(tools=example.tools, tool_choice="auto")
    if example.kwargs:
        args["extra_body"] = {"chat_template_kwargs": example.kwargs}
    if schema:
        args["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    return args


def answer_parts(message) -> tuple[str | None, str | None, list[dict]]:
    """(content, reasoning_content, calls as {"name", "arguments": dict}) of a ChatCompletionMessage."""
    calls = []
    for call in message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        calls.append({"name": call.function.name, "arguments": arguments})
    return message.content, getattr(message, "reasoning_content", None), calls


async def _ask(client, example: Example, schema: bool) -> tuple[bool, str]:
    response = await client.chat.completions.create(**request_args(example, schema))
    content, reasoning, calls = answer_parts(response.choices[0].message)
    return is_correct(example, content, reasoning, calls), json.dumps(
        {"content": content, "tool_calls": calls}, ensure_ascii=False)


def held_out(per_family: int, seed: int = 7) -> list[tuple[str, Example, bool]]:
    """(row, example, with json_schema) for every row of the table."""
    rng = random.Random(f"evaluate:{seed}")
    rows = []
    for family in FAMILIES:
        for _ in range(per_family):
            rows.append((family, make_example(rng, family, "test"), False))
        if family == "json":
            rows += [("json_schema", make_example(rng, "json", "test"), True) for _ in range(per_family)]
    return rows


def evaluate(s: Served, per_family: int = 40, seed: int = 7, show_failures: int = 0) -> dict[str, float]:
    rows = held_out(per_family, seed)

    async def everything():
        return await asyncio.gather(*(_ask(s.client, ex, schema) for _, ex, schema in rows))

    answers = s.run(everything())
    accuracy: dict[str, list[bool]] = {}
    shown: dict[str, int] = {}
    for (row, example, _), (ok, answer) in zip(rows, answers):
        accuracy.setdefault(row, []).append(ok)
        if not ok and shown.get(row, 0) < show_failures:
            shown[row] = shown.get(row, 0) + 1
            print(f"[{row}] {example.messages[-1]['content'][-60:]!r} -> {answer[:120]}")
    return {row: sum(v) / len(v) for row, v in accuracy.items()}


def table(accuracy: dict[str, float], per_family: int) -> str:
    lines = [f"| task family (held out, {per_family} prompts each) | accuracy | target |", "| --- | --- | --- |"]
    for row, value in accuracy.items():
        target = TARGETS.get(row)
        lines.append(f"| {LABELS[row]} | {value:.0%} | {f'>= {target:.0%}' if target else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--per-family", type=int, default=40, help="held-out prompts per task family")
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out prompts")
    parser.add_argument("--device", default="cpu", help="torch device of the engine")
    parser.add_argument("--show-failures", type=int, default=2, help="wrong answers to print per family")
    args = parser.parse_args(argv)
    with served(args.model, device=args.device) as s:
        accuracy = evaluate(s, args.per_family, args.seed, args.show_failures)
    print(table(accuracy, args.per_family))


if __name__ == "__main__":
    main()
