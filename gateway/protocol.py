"""OpenAI request shapes (pydantic) and the error type every front end maps to its own status.

Requests carry OpenAI's fields plus the extensions vLLM users already send (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `stop_token_ids`, `chat_template_kwargs`, `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`, `thinking_budget`). Unknown fields are
ignored, as OpenAI's own server does for fields a client library adds. Responses are plain
dicts built by `serving.py` in OpenAI's shapes.

Types are strict (no "2" for 2, no `true` for 1, no `"yes"` for true) and numbers finite (no
NaN or Infinity, which Python's JSON parser reads). The JSON-valued fields (`messages`,
`guided_json`, `response_format`'s schema, each tool's `parameters`, `chat_template_kwargs`, and
a tool call's `arguments` text inside a message) are bounded by `check_request_values`: at most
`MAX_JSON_DEPTH` levels of objects and arrays and `MAX_JSON_VALUES` values each, and no string
anywhere may hold a lone surrogate ("\\ud800" is valid JSON but no text).
"""
from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.engine.sampling_params import MAX_JSON_DEPTH

MAX_JSON_VALUES = 250_000
"""Most values (objects, arrays and scalars) in one JSON-valued field of a request: far above
any real schema, tool list or conversation, far below what would stall the gateway to walk."""
_JSON_VALUED = frozenset({"messages", "guided_json", "schema", "parameters", "chat_template_kwargs"})
"""Fields holding arbitrary JSON (their pydantic type is `Any`-valued): bounded in depth and size."""
_JSON_TEXT = frozenset({"guided_json", "arguments"})
"""Keys whose string value is JSON text, parsed and bounded as the value it encodes."""
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """A request the server refuses: `status` (4xx, or 503 while not ready), OpenAI's error
    object fields. HTTP returns it as {"error": {...}}; gRPC maps `status` to a code."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class _SamplingFields(_Request):
    """Fields shared by chat and completions."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    """Refused when non-empty (400): the sampler has no per-token bias yet, and ignoring it would be silent."""
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = None
    """Most tokens inside <think>; then the engine writes </think> itself and the answer follows."""
    add_generation_prompt: bool = True


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ---- JSON in, errors out --------------------------------------------------------------------

class DuplicateKeyError(ValueError):
    """An object of the JSON text names one key twice."""


def loads_json(text: str | bytes) -> Any:
    """json.loads, refusing an object that repeats a key (`{"n": 1, "n": 9}`: parsers disagree on
    which counts, so a proxy in front could check one value while we use the other)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKeyError(f"the key {_REPR.repr(twice)} appears twice in one object")
    return obj


# ---- pydantic's errors as OpenAI's ------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 4, 4


def brief(value: Any) -> str:
    """A client's value quoted in an error message, cut short (a 64 KiB id stays a few words)."""
    return _REPR.repr(value)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)$")
"""A step of a pydantic error location that names a union member ("str", "list[int]",
"NamedToolChoice"), not a field."""


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first of pydantic's errors as a 400 naming the field in the request's own terms (union
    member tags left out: `prompt`, not `prompt.str`), quoting the value briefly (bounded in length
    and depth, so a value 50 MB long or 900 levels deep costs no more than a small one)."""
    if not errors:
        return APIError("the request is invalid")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(p for p in loc if not _UNION_TAG.match(p)) or None
    text = _REPR.repr(err.get("input"))
    text = text if len(text) <= 80 else text[:77] + "..."
    return APIError(f"{param or 'request body'}: {err.get('msg')} (got {text})", param=param,
                    code="invalid_type" if "type" in str(err.get("type")) else None)


# ---- bounds of the JSON-valued fields ---------------------------------------------------------

def check_request_values(req: BaseModel) -> None:
    """Raise APIError (400, naming the field) if any string of `req` holds a lone surrogate, any
    number inside a JSON-valued field is not finite, or a JSON-valued field nests deeper than
    MAX_JSON_DEPTH or holds more than MAX_JSON_VALUES values. Iterative, so a value nested past
    Python's recursion limit is refused like any other."""
    models: list[tuple[BaseModel, str]] = [(req, "")]
    while models:
        model, prefix = models.pop()
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            key = info.alias or name
            path = f"{prefix}{key}"
            if isinstance(value, BaseModel):
                models.append((value, f"{path}."))
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                models.extend((item, f"{path}[{i}].") for i, item in enumerate(value))
            elif isinstance(value, (str, list, dict)):
                _check_json_value(value, path, bounded=key in _JSON_VALUED,
                                  json_text=key in ("messages", "guided_json"))


def _check_json_value(value: Any, param: str, *, bounded: bool, json_text: bool) -> None:
    """Walk one field's value (see check_request_values). With `json_text`, strings under the keys
    of _JSON_TEXT (a tool call's arguments, a guided_json given as text) count as the JSON value
    they encode, nested where they lie. A location is a (parent location, key) pair, spelled out
    only for an error."""
    count = 0
    stack: list[tuple[Any, int, tuple]] = [(value, 1, (None, param))]
    while stack:
        item, depth, where = stack.pop()
        count += 1
        if bounded and count > MAX_JSON_VALUES:
            raise APIError(f"{param} holds more than {MAX_JSON_VALUES} JSON values (the limit)", param=param,
                           code="too_many_values")
        if isinstance(item, str):
            _check_text(item, where, param)
            if json_text and where[1] in _JSON_TEXT and item.lstrip()[:1] in ("{", "["):
                try:
                    stack.append((json.loads(item), depth, where))
                except RecursionError:
                    _too_deep(param)
                except ValueError:
                    pass  # not JSON: the tokenizer or the schema check says so, naming the field
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise APIError(f"{_spell(where)} is {item}, but JSON numbers are finite", param=param)
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                _too_deep(param)
            if isinstance(item, dict):
                for k, v in item.items():
                    _check_text(k, where, param)
                    stack.append((v, depth + 1, (where, k)))
            elif bounded or not item or type(item[0]) is not int:  # typed token ids hold no text
                stack.extend((v, depth + 1, (where, i)) for i, v in enumerate(item))


def _check_text(text: str, where: tuple, param: str) -> None:
    surrogate = None if text.isascii() else _SURROGATE.search(text)
    if surrogate is not None:
        raise APIError(f"{_spell(where)} holds a lone surrogate ({surrogate.group()!r} at character "
                       f"{surrogate.start()}), which is not valid Unicode text", param=param, code="invalid_unicode")


def _too_deep(param: str):
    raise APIError(f"{param} nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays (the limit)",
                   param=param, code="too_deeply_nested")


def _spell(where: tuple) -> str:
    """A location as `messages[1].content` (its first six steps)."""
    steps = []
    while where is not None:
        where, key = where
        steps.append(key)
    steps.reverse()
    text = str(steps[0]) + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in steps[1:6])
    return text + ("..." if len(steps) > 6 else "")
