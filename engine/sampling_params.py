"""`SamplingParams`: how one request is sampled and when it stops (vLLM's names and defaults).

Every field is checked once, in `__post_init__`; a bad value raises `ValueError` naming the
field, so nothing malformed reaches the scheduler or the sampler. Numbers must be finite and
within the bounds below (the same ones the HTTP and gRPC APIs answer 400 for); bounds that
depend on the model (`top_k` up to the vocabulary, `thinking_budget` up to `max_model_len`,
`stop_token_ids` inside the vocabulary) are checked by `EngineCore.validate`. `GuidedDecodingParams` (one
constraint on the output: a JSON schema, any JSON object, a regex, a choice, an EBNF grammar or
Qwen3 tool calls) is checked the same way for shape; whether a schema, regex or grammar compiles
is checked by `EngineCore.validate`, which compiles it (see `expertmesh.engine.grammar`).
"""
from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

_GREEDY_EPS = 1e-5
INT64_MAX = 2**63 - 1
MAX_TEMPERATURE = 2.0
"""OpenAI's upper bound for `temperature`."""
MAX_REPETITION_PENALTY = 2.0
"""`repetition_penalty` is in (0, 2]: 1 is off, 2 already all but bans every seen token."""
MAX_LOGPROBS = 20
"""Most alternatives per token (`logprobs`; OpenAI's `top_logprobs` bound)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays in a JSON schema (`guided_decoding.json`, a tool's
`parameters`). Compiling grows with the square of the depth: 64 levels take about 0.1 s, 900
levels over a minute; real schemas stay under 20."""


@dataclass(frozen=True)
class ToolCallConstraint:
    """The output must be one or more Qwen3 tool calls to `tools`, and nothing else:

        <tool_call>\n{"name": "<fn>", "arguments": {...}}\n</tool_call>   (blocks joined by "\n")

    then end of sequence. `arguments` follow the tool's `parameters` JSON schema.
    """

    tools: list[dict]
    """OpenAI function specs, `{"name", "description"?, "parameters"?}` (or wrapped as
    `{"type": "function", "function": {...}}`). A tool without parameters takes `{}`."""
    mode: Literal["required", "named"] = "required"
    """"required": one or more calls, each to any of `tools`; "named": every call is to `name`."""
    name: str | None = None
    """The tool to call when mode is "named"; must be None otherwise."""

    def __post_init__(self) -> None:
        _check(isinstance(self.tools, (list, tuple)) and len(self.tools) > 0,
               f"tool_calls.tools must be a non-empty list of function specs, got {self.tools!r}")
        functions = [self.function(t) for t in self.tools]
        names = [f["name"] for f in functions]
        _check(len(set(names)) == len(names), f"tool_calls.tools has duplicate names: {names}")
        _check(self.mode in ("required", "named"), f"tool_calls.mode must be 'required' or 'named', got {self.mode!r}")
        if self.mode == "named":
            _check(self.name in names, f"tool_calls.name must name one of the tools {names}, got {self.name!r}")
        else:
            _check(self.name is None, f"tool_calls.name is only for mode 'named', got {self.name!r}")

    @staticmethod
    def function(tool: Any) -> dict:
        """The function spec of a tool, unwrapped and checked: `{"name": str, "parameters": dict | absent}`."""
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        _check(isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] != "",
               f"each tool_calls.tools entry needs a non-empty string 'name', got {tool!r}")
        params = fn.get("parameters")
        _check(params is None or isinstance(params, dict),
               f"tool_calls.tools[{fn['name']!r}].parameters must be a JSON schema object, got {params!r}")
        check_json_depth(params, f"tool_calls.tools[{fn['name']!r}].parameters")
        return fn

    @property
    def functions(self) -> list[dict]:
        """The callable functions: all of `tools`, or only `name` in mode "named"."""
        functions = [self.function(t) for t in self.tools]
        return functions if self.mode == "required" else [f for f in functions if f["name"] == self.name]


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Constrained decoding (vLLM's name): set exactly one field. The engine masks every sampled
    token of the answer so the output matches; the request ends ("stop") once it is complete."""

    json: dict | str | None = None
    """A JSON schema (dict or JSON text); the output is JSON that validates against it. Strict:
    objects take no properties beyond the schema's unless it allows them (additionalProperties)."""
    json_object: bool = False
    """Any JSON object."""
    regex: str | None = None
    """The whole output matches this regular expression."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar in xgrammar's (GBNF-like) syntax, with a `root` rule."""
    tool_calls: ToolCallConstraint | None = None
    """Qwen3 tool-call blocks only (tool_choice "required" or a named function)."""

    def __post_init__(self) -> None:
        chosen = self.kinds
        _check(len(chosen) == 1, "guided_decoding needs exactly one of json, json_object, regex, choice, grammar, "
               f"tool_calls; got {', '.join(chosen) if chosen else 'none'}")
        if self.json is not None:
            _check(isinstance(self.json, (dict, str)), f"guided_decoding.json must be a dict or a JSON string, "
                   f"got {type(self.json).__name__}")
            schema = self.json
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except RecursionError:  # nested past Python's own limit
                    raise ValueError(f"guided_decoding.json nests deeper than {MAX_JSON_DEPTH} levels of "
                                     "objects and arrays") from None
                except ValueError as e:
                    raise ValueError(f"invalid JSON schema: guided_decoding.json is not JSON: {e}") from e
                _check(isinstance(schema, dict), "invalid JSON schema: guided_decoding.json must be an object")
            check_json_depth(schema, "guided_decoding.json")
        _check(isinstance(self.json_object, bool), f"guided_decoding.json_object must be a bool, "
               f"got {self.json_object!r}")
        _check(self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
               f"guided_decoding.regex must be a non-empty string, got {self.regex!r}")
        _check(self.choice is None or (isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                                       and all(isinstance(c, str) and c for c in self.choice)),
               f"guided_decoding.choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip() != ""),
               f"guided_decoding.grammar must be a non-empty EBNF string, got {self.grammar!r}")
        _check(self.tool_calls is None or isinstance(self.tool_calls, ToolCallConstraint),
               f"guided_decoding.tool_calls must be a ToolCallConstraint, got {type(self.tool_calls).__name__}")

    @property
    def kinds(self) -> list[str]:
        """Names of the fields that are set."""
        values = {"json": self.json, "json_object": self.json_object or None, "regex": self.regex,
                  "choice": self.choice, "grammar": self.grammar, "tool_calls": self.tool_calls}
        return [name for name, value in values.items() if value is not None]

    @property
    def schema(self) -> dict | None:
        """The `json` schema as a dict (parsed if given as text)."""
        return _json.loads(self.json) if isinstance(self.json, str) else self.json


@dataclass
class SamplingParams:
    n: int = 1
    """Completions to return for the prompt (each its own sequence, sharing the prompt's KV blocks)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. In (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's. In [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated. In [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of tokens in the prompt or output are divided (if > 0) or multiplied by it. > 0."""
    seed: int | None = None
    """Seed of this request's own generator: the same seed gives the same tokens."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string itself is left out of the text unless asked."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation, beside the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks). A complete grammar still ends the
    request: under `guided_decoding`, EOS is the grammar's last token and ends it ("stop")."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's length."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are masked until this many tokens exist."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many most likely alternatives (0..20)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    guided_decoding: GuidedDecodingParams | None = None
    """Constrain the answer (after any thinking) to a schema, regex, choice, grammar or tool calls."""
    reasoning: bool = False
    """The request is a chat whose output may hold a `<think>…</think>` section first: the engine
    tracks it (from the prompt's last turn and the generated tags), applies `guided_decoding` only
    to the answer after it, and enforces `thinking_budget`."""
    thinking_budget: int | None = None
    """Most tokens generated inside thinking (tags not counted); then `</think>` is forced. Needs reasoning."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_int(self.n) and 1 <= self.n <= INT64_MAX,
               f"n must be an integer >= 1 (below 2**63), got {self.n!r}")
        _check(_is_number(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
               f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and (self.top_k == -1 or 0 <= self.top_k <= INT64_MAX),
               f"top_k must be -1, 0 (disabled) or a positive integer below 2**63, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
        _check(_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
               f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63 - self.n),
               f"seed must be an integer in [0, 2**63 - n), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers below 2**63, got {self.stop_token_ids!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT64_MAX),
               f"max_tokens must be an integer >= 1 (below 2**63), got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= INT64_MAX,
               f"min_tokens must be an integer >= 0 (below 2**63), got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.guided_decoding is None or isinstance(self.guided_decoding, GuidedDecodingParams),
               f"guided_decoding must be GuidedDecodingParams, got {type(self.guided_decoding).__name__}")
        _check(isinstance(self.reasoning, bool), f"reasoning must be a bool, got {self.reasoning!r}")
        _check(self.thinking_budget is None or (_is_int(self.thinking_budget)
                                                and 0 <= self.thinking_budget <= INT64_MAX),
               f"thinking_budget must be an integer >= 0 (below 2**63), got {self.thinking_budget!r}")
        _check(self.thinking_budget is None or self.reasoning,
               "thinking_budget needs reasoning=True (the engine only tracks thinking in reasoning requests)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool): NaN and the infinities fail every bound check."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT64_MAX


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_depth(value: Any, limit: int) -> int:
    """How deep objects and arrays nest in `value` (a scalar is 0, `{}` 1, `[[1]]` 2), counting
    no further than `limit + 1`. Iterative: a value too deep for Python's own recursion is measured too."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_depth(value: Any, name: str) -> None:
    """ValueError naming `name` when `value` nests deeper than MAX_JSON_DEPTH."""
    _check(json_depth(value, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH,
           f"{name} nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
