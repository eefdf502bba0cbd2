"""Request shapes of the OpenAI Responses API (`POST /v1/responses`) and its conversation items.

Types are strict and numbers finite, as in `protocol.py`; unknown fields are ignored; the
JSON-valued fields (a function tool's `parameters`, `text.format`'s `schema`) are bounded by
`check_request_values`, and so is every chat request the loop builds from them. Strings that name
things (ids, call ids, tool and server names) are at most `MAX_NAME_LENGTH` characters.

    input            a string (one user message) or a list of items:
                     message {role: user|system|developer|assistant, content: str | [input_text |
                     output_text parts]} (`type` may be left out), function_call {call_id, name,
                     arguments}, function_call_output {call_id, output}, mcp_call, webhook_call,
                     reasoning {content: [reasoning_text], summary}
    tools            function {name, description, parameters, strict}: the client runs it;
                     mcp {server_label, server_url?, headers?, allowed_tools?, require_approval?};
                     webhook {name}: an operator's webhook (our extension)
    tool_choice      "none" | "auto" | "required" | {type: function, name} |
                     {type: mcp, server_label, name?} | {type: webhook, name}

`to_messages` turns items into the chat messages the template renders: the items of one assistant
turn (reasoning, message, calls) become one assistant message with `reasoning_content` and
`tool_calls`; a server-side call's output (or error) becomes the `tool` message answering it.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from expertmesh.gateway.protocol import APIError, brief

MAX_NAME_LENGTH = 256
"""Most characters of an id, call id, tool name or server label in a request."""
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
"""OpenAI's bounds of `metadata`: 16 pairs, keys of 64 characters, values of 512."""
RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9]{1,100}")
"""What a response id looks like: anything else is unknown without asking the store."""

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""What a function tool may be named (OpenAI's rule)."""


def new_id(prefix: str) -> str:
    """A fresh item or response id: `prefix` + "_" + 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)


# ---- content parts and items -------------------------------------------------------------------

class InputText(_Request):
    type: Literal["input_text"]
    text: str


class OutputText(_Request):
    type: Literal["output_text"]
    text: str


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


TextPart = Annotated[InputText | OutputText, Field(discriminator="type")]


class MessageItem(_Request):
    type: Literal["message"] = "message"
    id: Name | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    id: Name | None = None
    call_id: Name
    name: Name
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    id: Name | None = None
    call_id: Name
    output: str | list[TextPart]


class McpCallItem(_Request):
    type: Literal["mcp_call"]
    id: Name
    server_label: Name
    name: Name
    arguments: str
    output: str | None = None
    error: str | None = None


class WebhookCallItem(_Request):
    type: Literal["webhook_call"]
    id: Name
    name: Name
    arguments: str
    output: str | None = None
    error: str | None = None


class ReasoningItem(_Request):
    type: Literal["reasoning"]
    id: Name | None = None
    content: list[ReasoningText] | None = None
    summary: list[ReasoningText] = Field(default_factory=list)


def _item_type(value: Any) -> Any:
    """An input item's tag: its `type`, "message" when it has none (OpenAI's easy message)."""
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[McpCallItem, Tag("mcp_call")]
    | Annotated[WebhookCallItem, Tag("webhook_call")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type)]


# ---- tools and tool_choice ---------------------------------------------------------------------

class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    """OpenAI's function names: rendered into the prompt's tool list, a name must not hold the text of
    a control token (`<|im_end|>`, `<tool_call>`) nor JSON's quotes."""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class McpToolFilter(_Request):
    tool_names: list[Name] | None = None


class McpTool(_Request):
    type: Literal["mcp"]
    server_label: Name
    server_url: str | None = Field(default=None, max_length=2048)
    headers: dict[str, str] | None = None
    allowed_tools: list[Name] | McpToolFilter | None = None
    require_approval: Any = None
    """"never" or absent: a tool call runs without asking (approvals are not supported)."""
    server_description: str | None = None

    def allowed(self) -> list[str] | None:
        if isinstance(self.allowed_tools, McpToolFilter):
            return self.allowed_tools.tool_names
        return self.allowed_tools


class WebhookTool(_Request):
    """One of the operator's webhooks (the registry's), chosen by name: our extension."""
    type: Literal["webhook"]
    name: Name


ToolSpec = Annotated[FunctionTool | McpTool | WebhookTool, Field(discriminator="type")]


class FunctionChoice(_Request):
    type: Literal["function"]
    name: Name


class McpChoice(_Request):
    type: Literal["mcp"]
    server_label: Name
    name: Name | None = None


class WebhookChoice(_Request):
    type: Literal["webhook"]
    name: Name


ToolChoice = Annotated[FunctionChoice | McpChoice | WebhookChoice, Field(discriminator="type")]


# ---- reasoning and text ------------------------------------------------------------------------

class Reasoning(_Request):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    """none and minimal turn thinking off; low, medium and high leave it on."""
    summary: str | None = None
    """Accepted and ignored: the reasoning item carries the whole reasoning text, no summary."""
    budget_tokens: int | None = Field(default=None, ge=1)
    """Most tokens of thinking per turn (our extension: the chat API's thinking_budget)."""


class TextFormatText(_Request):
    type: Literal["text"]


class TextFormatJSONObject(_Request):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Request):
    type: Literal["json_schema"]
    name: str = Field(default="response", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                       Field(discriminator="type")]


class TextConfig(_Request):
    format: TextFormat | None = None


# ---- the request -------------------------------------------------------------------------------

class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    """A system message before the conversation; not carried over by previous_response_id."""
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool = True
    """False: the first tool call of a turn is kept, later ones of that turn are dropped."""
    max_output_tokens: int | None = Field(default=None, ge=1)
    """Tokens generated over every turn of the response (reasoning included)."""
    max_tool_calls: int | None = Field(default=None, ge=0)
    """Lowers the server's max_tool_rounds: at most this many rounds of server-side tool calls."""
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    background: bool = False

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_KEYS} pairs, got {len(value)}")
        for k, v in value.items():
            if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                                 f"{MAX_METADATA_VALUE} (key {brief(k)})")
        return value


def parse_request(body: Any) -> ResponsesRequest:
    """The request of a JSON body (already parsed), or APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {brief(body)}", code="invalid_type")
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise APIError("the request nests objects and arrays too deeply", code="too_deeply_nested") from None


_TAGS = frozenset({"message", "function_call", "function_call_output", "mcp_call", "webhook_call", "reasoning",
                   "input_text", "output_text", "function", "mcp", "webhook", "text", "json_object",
                   "json_schema"})
_UNION_FIELDS = frozenset({"tool_choice", "format"})


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's most specific error as a 400 whose `param` is the field in OpenAI's spelling
    (`input[2].call_id`), union members left out, the value quoted briefly."""
    errors = exc.errors()
    if not errors:
        return APIError("the request is invalid")
    err = max(errors, key=lambda e: len(e.get("loc", ())))  # a union's deepest branch says most
    steps: list[str | int] = []
    for step in err.get("loc", ()):
        prev = steps[-1] if steps else None
        if isinstance(step, str) and ("[" in step or step in ("str", "int", "float", "bool", "none")
                                      or (step in _TAGS and (isinstance(prev, int) or prev in _UNION_FIELDS))):
            continue
        steps.append(step)
    param = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".") or None
    if param is not None:
        param = param.replace("schema_", "schema")
    text = brief(err.get("input"))
    text = text if len(text) <= 80 else text[:77] + "..."
    msg = str(err.get("msg")).replace(" found using 'type'", "").replace(f" found using {_item_type.__name__}()", "")
    return APIError(f"{param or 'request body'}: {msg} (got {text})", param=param,
                    code="invalid_type" if "type" in str(err.get("type")) else None)


# ---- items -------------------------------------------------------------------------------------

def _parts_text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] if isinstance(p, dict) else p.text for p in content)


def input_items(value: str | list[Any]) -> list[dict[str, Any]]:
    """The request's input as stored items (dicts in the output items' shapes, each with an id)."""
    if isinstance(value, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    items = []
    for item in value:
        d = item.model_dump(exclude_none=True, by_alias=True)
        if isinstance(item, MessageItem):
            part = "output_text" if item.role == "assistant" else "input_text"
            if isinstance(item.content, str):
                d["content"] = [{"type": part, "text": item.content}]
            for p in d["content"]:
                if p["type"] == "output_text":
                    p.setdefault("annotations", [])
            d.setdefault("status", "completed")
        elif isinstance(item, FunctionCallOutputItem) and not isinstance(item.output, str):
            d["output"] = _parts_text(item.output)
        if isinstance(item, (McpCallItem, WebhookCallItem)):
            d.setdefault("output", None)
            d.setdefault("error", None)
            d.setdefault("status", "failed" if item.error is not None else "completed")
        if "id" not in d:  # (mcp_call and webhook_call items always carry theirs)
            d["id"] = new_id({"message": "msg", "function_call": "fc", "function_call_output": "fco",
                              "reasoning": "rs"}[d["type"]])
        items.append(d)
    return items


def check_call_outputs(conversation: list[dict[str, Any]], first_new: int) -> None:
    """Every function_call_output of the items from `first_new` on answers a function_call earlier
    in the conversation (400 naming the item otherwise)."""
    calls: set[str] = set()
    for i, item in enumerate(conversation):
        if item["type"] == "function_call":
            calls.add(item["call_id"])
        elif item["type"] == "function_call_output" and item["call_id"] not in calls and i >= first_new:
            where = f"input[{i - first_new}].call_id"
            raise APIError(f"{where}: no function_call with call_id {brief(item['call_id'])} precedes this output",
                           param=where)


def to_messages(instructions: str | None, items: list[dict[str, Any]],
                literal: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """The chat messages of a conversation (see the module docstring). `literal` is applied to the text
    of every tool message (a server-side call's output or error, a function_call_output): text from a
    tool, which must reach the model as text (`Tokenizer.literal`), never as its control tokens."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    assistant: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal assistant
        if assistant is not None:
            messages.append(assistant)
        messages.extend(results)
        assistant = None
        results.clear()

    for item in items:
        kind = item["type"]
        if kind == "message" and item["role"] != "assistant":
            flush()
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _parts_text(item["content"])})
        elif kind == "message" or kind == "reasoning":
            if kind == "reasoning" and not (item.get("content") or item.get("summary")):
                continue  # nothing to carry over
            if assistant is not None and (assistant.get("tool_calls") or assistant["content"]
                                          or (kind == "reasoning" and "reasoning_content" in assistant)):
                flush()
            if assistant is None:
                assistant = {"role": "assistant", "content": ""}
            if kind == "message":
                assistant["content"] = _parts_text(item["content"])
            else:
                assistant["reasoning_content"] = _parts_text(item.get("content") or item.get("summary") or [])
        elif kind in ("function_call", "mcp_call", "webhook_call"):
            if assistant is None:
                assistant = {"role": "assistant", "content": ""}
            call_id = item["call_id"] if kind == "function_call" else item["id"]
            assistant.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}})
            if kind != "function_call":
                error = item.get("error")
                results.append({"role": "tool", "tool_call_id": call_id,
                                "content": literal(item.get("output") or (f"Error: {error}" if error else ""))})
        elif kind == "function_call_output":
            flush()
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": literal(_parts_text(item["output"]))})
    flush()
    return messages
