"""The OpenAI Responses API (`/v1/responses`) with the tool loop run by the server.

One request:

    validate → the conversation (a stored previous response's items + this input)
      → the tools the model sees: function tools (the client runs them), each mcp entry's tools
        (runner.mcp_tools) and the chosen webhooks (runner.webhook_tools); a name given twice is a 400
      → turn 1 prepared (a chat request through OpenAIServing: template, parsers, sampling, limits)
        and its first engine output awaited: every refusal so far is a 4xx before any event
      → loop: a turn streams reasoning, text and tool calls as output items;
          a server-side call (MCP tool, webhook) runs (a turn's calls concurrently) and becomes an
          mcp_call / webhook_call item whose output (or error) goes back as a tool message; the
          model takes another turn
          a client-side function call ends the response (function_call items, status completed)
          a turn without calls ends it (a final message)
      → stored (unless store is false), then the last event: response.completed | .incomplete

Limits: a forcing `tool_choice` binds the first turn only; `max_output_tokens` is one budget over
every turn (status incomplete, reason max_output_tokens, when it runs out); at most
`max_tool_rounds` rounds of server-side calls and, when the request sets `max_tool_calls`, at most
that many calls in all (OpenAI's meaning): calls past either never run, become items with an error
(status incomplete), and the response is incomplete with reason "max_tool_rounds" or
"max_tool_calls". A tool's failure is an item with an error, never a 5xx. An engine failure
mid-loop is an OpenAI error: a unary request answers with it, a stream ends with an `error` event
and response.failed. A client that goes away cancels the turn (the engine aborts it and frees its
KV blocks: closing OpenAIServing's stream does that) and every running call.

Stored responses (the state store: Redis with --redis-url, else in-process) are
{response, input: every input item of the conversation, owner} for `store_ttl_s`; the owner is the
caller's identity (`auth.current_identity`), and another owner's id is a 404, as an unknown one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pydantic import ValidationError

from expertmesh.cluster.state import InProcessStateStore, ResponseTooLarge, StateStore, StateStoreUnavailable
from expertmesh.gateway.auth import current_identity
from expertmesh.gateway.protocol import APIError, ChatCompletionRequest, brief, check_request_values
from expertmesh.gateway.protocol import validation_error as chat_validation_error
from expertmesh.gateway.responses_events import ResponseEvents, add_usage, empty_usage
from expertmesh.gateway.responses_protocol import (
    RESPONSE_ID,
    FunctionChoice,
    FunctionTool,
    McpChoice,
    McpTool,
    ResponsesRequest,
    WebhookChoice,
    check_call_outputs,
    input_items,
    new_id,
    to_messages,
)
from expertmesh.gateway.serving import OpenAIServing
from expertmesh.gateway.tools.types import ServerTool, ToolResult

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_TOOL_ROUNDS = 8
DEFAULT_STORE_TTL_S = 30 * 86400.0


@dataclass(frozen=True)
class ResponsesSettings:
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS
    """Rounds of server-side tool calls one response may run."""
    store_ttl_s: float = DEFAULT_STORE_TTL_S
    """How long a stored response lives."""

    @classmethod
    def from_config(cls, cfg: Any) -> ResponsesSettings:
        """From an AppConfig (`max_tool_rounds`, `response_store_ttl_s`)."""
        return cls(cfg.max_tool_rounds, cfg.response_store_ttl_s)


class ToolRunnerLike(Protocol):
    """What the loop needs of the tool runner (gateway/tools/runner.py, issue 15's contract)."""

    async def mcp_tools(self, server_label: str, *, server_url: str | None = None,
                        headers: dict[str, str] | None = None, allowed_tools: list[str] | None = None,
                        param: str = "tools") -> list[ServerTool]: ...

    def webhook_tools(self, names: list[str] | None = None, *, param: str = "tools") -> list[ServerTool]: ...

    async def call(self, tool: ServerTool, arguments: str, *, call_id: str | None = None) -> ToolResult: ...


class NoTools:
    """A runner with no MCP server and no webhook: every mcp or webhook entry is a 400."""

    async def mcp_tools(self, server_label, *, server_url=None, headers=None, allowed_tools=None, param="tools"):
        raise APIError(f"{param}: no MCP server is registered under the server_label {brief(server_label)}, and "
                       "this server calls no request-supplied MCP server", param=param, code="unknown_mcp_server")

    def webhook_tools(self, names=None, *, param="tools"):
        if names:
            raise APIError(f"{param}: no webhook named {brief(names[0])} is registered", param=param,
                           code="unknown_webhook")
        return []

    async def call(self, tool, arguments, *, call_id=None):
        return ToolResult(None, "no tool runner is configured", 0.0)


@contextlib.asynccontextmanager
async def _tool_scope(runner: Any):
    """The runner for one response: inside `runner.request_scope()` when it has one (request-supplied
    MCP servers are connected for the response and closed after it); the scope's own object when it
    offers the runner's methods, else the runner."""
    scope = getattr(runner, "request_scope", None)
    if scope is None:
        yield runner
        return
    async with scope() as inner:
        yield inner if inner is not None and hasattr(inner, "call") and hasattr(inner, "mcp_tools") else runner


@dataclass
class _Tool:
    kind: Literal["function", "mcp", "webhook"]
    name: str
    spec: dict[str, Any]
    """The chat API's tool entry the template renders."""
    server: ServerTool | None
    where: str
    """The request field that brought it (`tools[2]`), for errors."""
    label: str


@dataclass
class _Turn:
    reasoning: str = ""
    calls: int = 0
    client_calls: int = 0
    server_calls: list[tuple[int, _Tool]] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, Any] | None = None


@dataclass
class _State:
    req: ResponsesRequest
    events: ResponseEvents
    conversation: list[dict[str, Any]]
    """Every input item of the conversation (stored ones, then this request's)."""
    tools: dict[str, _Tool]
    first_tools: dict[str, _Tool]
    first_choice: Any
    owner: str | None
    runner: Any
    stack: contextlib.AsyncExitStack
    max_rounds: int
    """The server's max_tool_rounds: turns whose server-side calls run."""
    max_calls: int | None
    """The request's max_tool_calls: server-side calls that run, over every turn (OpenAI's meaning)."""
    usage: dict[str, Any] = field(default_factory=empty_usage)
    turns: int = 0
    rounds: int = 0
    calls: int = 0


_FORMAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                  "response_format": "text.format", "thinking_budget": "reasoning.budget_tokens"}


def _as_responses_error(exc: APIError) -> APIError:
    """A chat-layer refusal in the Responses API's terms (its field names)."""
    param = exc.param
    if param is not None:
        base = param.split("[", 1)[0].split(".", 1)[0]
        if base in _FORMAT_PARAMS:
            message = exc.message
            if base != "messages" or message.startswith("messages "):  # (not messages[3]: the chat's index)
                message = message.replace(base, _FORMAT_PARAMS[base], 1)
            return APIError(message, status=exc.status, type=exc.type, param=_FORMAT_PARAMS[base], code=exc.code,
                            headers=exc.headers)
        if base in ("tools", "chat_template_kwargs"):
            exc.param = "tools" if base == "tools" else None
    return exc


def _clean(text: str | None) -> str | None:
    """Text from a tool, encodable as UTF-8 (a lone surrogate becomes "?")."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


class ResponsesServing:
    """The Responses API over `OpenAIServing` (transport-free: HTTP and gRPC call it)."""

    def __init__(self, serving: OpenAIServing, runner: Any = None, store: StateStore | None = None,
                 settings: ResponsesSettings | None = None) -> None:
        self.serving = serving
        self.runner = runner if runner is not None else NoTools()
        self.store = store if store is not None else InProcessStateStore()
        self.settings = settings or ResponsesSettings()

    # ---- stored responses ----------------------------------------------------------------------

    async def get(self, response_id: str) -> dict[str, Any]:
        return (await self._load(response_id))["response"]

    async def delete(self, response_id: str) -> dict[str, Any]:
        await self._load(response_id)
        await self._store_call(self.store.delete_response, response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, response_id: str, *, after: str | None = None, limit: int = 20,
                          order: str = "desc") -> dict[str, Any]:
        """OpenAI's list of a stored response's input items (the whole conversation before it)."""
        if not 1 <= limit <= 100:
            raise APIError(f"limit must be between 1 and 100, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(f"order must be 'asc' or 'desc', got {brief(order)}", param="order")
        items = list((await self._load(response_id))["input"])
        if order == "desc":
            items.reverse()
        start = 0
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise APIError(f"after: no input item {brief(after)} in this response", param="after")
            start = ids.index(after) + 1
        page = items[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
                "last_id": page[-1].get("id") if page else None, "has_more": start + limit < len(items)}

    async def _load(self, response_id: str, param: str | None = None) -> dict[str, Any]:
        """The caller's stored record of `response_id`, or a 404 (unknown, expired, deleted, another's)."""
        record = None
        if isinstance(response_id, str) and RESPONSE_ID.fullmatch(response_id):
            record = await self._store_call(self.store.get_response, response_id)
        if record is None or record.get("owner") != current_identity.get():
            raise APIError(f"Response with id {brief(response_id)} not found.", status=404,
                           type="invalid_request_error", param=param, code="response_not_found")
        return record

    async def _store_call(self, fn: Callable[..., T], *args) -> T:
        try:
            if self.store.blocking:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)
        except StateStoreUnavailable as exc:
            log.warning("stored responses: %s", exc)
            raise APIError("The state store holding stored responses is unreachable; try again later.", status=503,
                           type="server_error", code="state_store_unavailable") from None

    # ---- creating a response -------------------------------------------------------------------

    async def create(self, req: ResponsesRequest) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """The response (unary), or an async iterator of its events (`req.stream`). Every refusal
        (APIError) is raised before the first event."""
        check_request_values(req)
        self.serving._check_model(req.model)
        if req.background:
            raise APIError("background responses are not supported", param="background",
                           code="unsupported_parameter")
        conversation: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            record = await self._load(req.previous_response_id, param="previous_response_id")
            conversation = [*record["input"], *record["response"]["output"]]
        first_new = len(conversation)
        conversation += input_items(req.input)
        if not conversation:
            raise APIError("input is empty: give a message (or a previous_response_id)", param="input")
        check_call_outputs(conversation, first_new)

        stack = contextlib.AsyncExitStack()
        try:
            runner = await stack.enter_async_context(_tool_scope(self.runner))
            tools = await self._tools(req, runner)
            first_tools, first_choice = self._first_choice(req, tools)
            st = _State(req, ResponseEvents(self._response_object(req)), conversation, tools, first_tools,
                        first_choice, current_identity.get(), runner, stack, self.settings.max_tool_rounds,
                        req.max_tool_calls)
            stream = await self._turn(st)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = None
            except APIError as exc:
                await stream.aclose()
                raise _as_responses_error(exc) from None
            except BaseException:
                await stream.aclose()
                raise
        except BaseException:
            await stack.aclose()
            raise
        run = self._run(st, stream, first)
        if req.stream:
            return self._streamed(st, run)
        try:
            async for _ in run:
                pass
        finally:
            await run.aclose()
        return st.events.response

    def _response_object(self, req: ResponsesRequest) -> dict[str, Any]:
        tools = []
        for t in req.tools or []:
            d = t.model_dump(exclude_none=True, by_alias=True)
            d.pop("headers", None)  # they may hold secrets: never echoed nor stored
            tools.append(d)
        choice = req.tool_choice
        fmt = req.text.format if req.text is not None else None
        effort = req.reasoning.effort if req.reasoning is not None else None
        return {
            "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
            "model": self.serving.settings.model_name, "output": [], "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": effort, "summary": None},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": (choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)
                            if choice is not None else "auto"),
            "tools": tools, "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": None, "user": req.user, "metadata": dict(req.metadata or {})}

    async def _tools(self, req: ResponsesRequest, runner: Any) -> dict[str, _Tool]:
        """Every tool the model sees, by name (a name given twice is a 400 naming both)."""
        tools: dict[str, _Tool] = {}
        labels: dict[str, str] = {}

        def add(tool: _Tool) -> None:
            other = tools.get(tool.name)
            if other is not None:
                raise APIError(f"{other.where} ({other.label}) and {tool.where} ({tool.label}) both give the model a "
                               f"tool named {brief(tool.name)}; tool names must be distinct", param=tool.where,
                               code="duplicate_tool_name")
            tools[tool.name] = tool

        for i, spec in enumerate(req.tools or []):
            where = f"tools[{i}]"
            if isinstance(spec, FunctionTool):
                function = spec.model_dump(exclude_none=True, exclude={"type"})
                add(_Tool("function", spec.name, {"type": "function", "function": function}, None, where,
                          f"function {brief(spec.name)}"))
                continue
            if isinstance(spec, McpTool):
                if spec.require_approval not in (None, "never"):
                    raise APIError(f"{where}.require_approval: only 'never' is supported (this server runs MCP "
                                   "tools without asking)", param=f"{where}.require_approval",
                                   code="unsupported_parameter")
                if spec.server_label in labels:
                    raise APIError(f"{labels[spec.server_label]} and {where} both name the MCP server "
                                   f"{brief(spec.server_label)}", param=where)
                labels[spec.server_label] = where
                found = await runner.mcp_tools(spec.server_label, server_url=spec.server_url, headers=spec.headers,
                                               allowed_tools=spec.allowed(), param=where)
            else:
                found = runner.webhook_tools([spec.name], param=where)
            for t in found:
                what = (f"tool {brief(t.name)} of the MCP server {brief(t.server)}" if t.kind == "mcp"
                        else f"webhook {brief(t.name)}")
                spec_ = {"type": "function", "function": {"name": t.name, "description": t.description,
                                                          "parameters": t.parameters}}
                add(_Tool(t.kind, t.name, spec_, t, where, what))
        return tools

    @staticmethod
    def _first_choice(req: ResponsesRequest, tools: dict[str, _Tool]) -> tuple[dict[str, _Tool], Any]:
        """The first turn's tools and chat tool_choice (a forcing choice binds that turn only)."""
        choice = req.tool_choice
        if choice is None or isinstance(choice, str):
            return tools, choice
        if isinstance(choice, McpChoice):
            server = {n: t for n, t in tools.items() if t.kind == "mcp" and t.server is not None
                      and t.server.server == choice.server_label}
            if not server:
                raise APIError(f"tool_choice names the MCP server {brief(choice.server_label)}, which no mcp entry of "
                               "tools gives (or it has no tools)", param="tool_choice")
            if choice.name is None:
                return server, "required"
            if choice.name not in server:
                raise APIError(f"tool_choice names the tool {brief(choice.name)} of the MCP server "
                               f"{brief(choice.server_label)}, which it does not have "
                               f"({', '.join(sorted(server)[:10])})", param="tool_choice")
            return tools, {"type": "function", "function": {"name": choice.name}}
        kind = "function" if isinstance(choice, FunctionChoice) else "webhook"
        assert isinstance(choice, (FunctionChoice, WebhookChoice))
        tool = tools.get(choice.name)
        if tool is None or tool.kind != kind:
            known = ", ".join(sorted(n for n, t in tools.items() if t.kind == kind)[:10]) or "none given"
            raise APIError(f"tool_choice names the {kind} {brief(choice.name)}, which is not among the tools "
                           f"({known})", param="tool_choice")
        return tools, {"type": "function", "function": {"name": choice.name}}

    async def _turn(self, st: _State) -> AsyncIterator[dict[str, Any]]:
        """The next turn's chat stream (prepared: a refusal raises here, in the Responses API's terms)."""
        req, first = st.req, st.turns == 0
        st.turns += 1
        tools = st.first_tools if first else st.tools
        choice = st.first_choice if first else ("none" if req.tool_choice == "none" else None)
        forced = choice == "required" or isinstance(choice, dict)
        body: dict[str, Any] = {
            "messages": to_messages(req.instructions, [*st.conversation, *st.events.output],
                                    self.serving.tokenizer.literal),
            "stream": True, "stream_options": {"include_usage": True},
            "tools": [t.spec for t in tools.values()] or None, "tool_choice": choice,
            "parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
            "user": req.user}
        if req.max_output_tokens is not None:
            body["max_tokens"] = req.max_output_tokens - st.usage["output_tokens"]
        fmt = req.text.format if req.text is not None else None
        if fmt is not None and fmt.type != "text" and not forced:  # a forced turn writes calls, not the format
            body["response_format"] = ({"type": "json_object"} if fmt.type == "json_object" else
                                       {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True,
                                                                                             exclude={"type"})})
        if req.reasoning is not None:
            if req.reasoning.effort in ("none", "minimal"):
                body["chat_template_kwargs"] = {"enable_thinking": False}
            body["thinking_budget"] = req.reasoning.budget_tokens
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise _as_responses_error(chat_validation_error(exc.errors())) from None
        try:
            return await self.serving.chat(chat)  # type: ignore[return-value]  (stream: an iterator)
        except APIError as exc:
            if first or exc.code != "context_length_exceeded" or "max_tokens" not in (exc.param or ""):
                raise _as_responses_error(exc) from None
        # a later turn whose budget left exceeds the context's room: as many tokens as fit
        chat.max_tokens = None
        try:
            return await self.serving.chat(chat)  # type: ignore[return-value]
        except APIError as exc:
            raise _as_responses_error(exc) from None

    async def _streamed(self, st: _State, run: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """The events, a failure after the first of them ending the stream as `error` + response.failed."""
        try:
            async for event in run:
                yield event
        except APIError as exc:
            for event in st.events.failed(_as_responses_error(exc)):
                yield event
        except Exception as exc:
            log.exception("a response stream failed", exc_info=exc)
            for event in st.events.failed(APIError("the server failed while generating this response", status=500,
                                                   type="server_error", code="internal_error")):
                yield event
        finally:
            await run.aclose()  # type: ignore[attr-defined]

    async def _run(self, st: _State, stream: AsyncIterator[dict[str, Any]] | None,
                   first: dict[str, Any] | None) -> AsyncIterator[dict[str, Any]]:
        """The loop (see the module docstring), as events."""
        events = st.events
        try:
            for event in events.start():
                yield event
            while stream is not None:
                turn = _Turn()
                async for event in self._turn_events(st, stream, first, turn):
                    yield event
                await stream.aclose()  # type: ignore[attr-defined]
                stream = first = None
                await self._count(st, turn)
                if turn.finish not in ("stop", "tool_calls", "length"):
                    raise APIError(f"the engine stopped generating this response ({turn.finish})", status=503,
                                   type="server_error", code="engine_unavailable")
                truncated = turn.finish == "length"
                status: tuple[Literal["completed", "incomplete"], str | None] | None = None
                calls, past, why = turn.server_calls, [], ""
                if calls and st.rounds >= st.max_rounds:
                    calls, past = [], calls
                    why, status = (f"not run: this response reached its limit of {st.max_rounds} rounds of tool "
                                   "calls (max_tool_rounds)"), ("incomplete", "max_tool_rounds")
                elif calls and st.max_calls is not None and st.calls + len(calls) > st.max_calls:
                    room = max(st.max_calls - st.calls, 0)
                    calls, past = calls[:room], calls[room:]
                    why, status = (f"not run: this response reached its limit of {st.max_calls} tool calls "
                                   "(max_tool_calls)"), ("incomplete", "max_tool_calls")
                for index, _ in past:
                    for event in events.call_done(index, None, why, status="incomplete"):
                        yield event
                if calls:
                    st.rounds += 1
                    st.calls += len(calls)
                    async for event in self._run_calls(st, calls):
                        yield event
                if status is not None:
                    pass
                elif turn.client_calls:
                    status = ("completed", None)
                elif not turn.server_calls:
                    status = ("incomplete", "max_output_tokens") if truncated else ("completed", None)
                elif truncated or (st.req.max_output_tokens is not None
                                   and st.usage["output_tokens"] >= st.req.max_output_tokens):
                    status = ("incomplete", "max_output_tokens")
                if status is None:
                    stream = await self._turn(st)
                    continue
                for event in events.conclude(*status):
                    yield event
                events.response["usage"] = st.usage
                await self._save(st)
                yield events.terminal()
        finally:
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
            await st.stack.aclose()

    async def _turn_events(self, st: _State, stream: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None,
                           turn: _Turn) -> AsyncIterator[dict[str, Any]]:
        """One turn's chat chunks as output items' events."""
        events = st.events

        async def chunks():
            if first is not None:
                yield first
            async for chunk in stream:
                yield chunk

        async for chunk in chunks():
            if chunk.get("usage"):
                turn.usage = chunk["usage"]
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if delta.get("reasoning_content"):
                    turn.reasoning += delta["reasoning_content"]
                    for event in events.text("reasoning", delta["reasoning_content"]):
                        yield event
                for event in events.text("message", delta.get("content") or ""):
                    yield event
                for call in delta.get("tool_calls") or ():
                    name, arguments = call["function"]["name"], call["function"]["arguments"]
                    tool = st.tools.get(name)
                    if tool is None or (turn.calls and not st.req.parallel_tool_calls):
                        continue  # (the parser only parses the tools' names) / one call a turn
                    turn.calls += 1
                    if tool.kind == "function":
                        turn.client_calls += 1
                        for event in events.function_call(call["id"], name, arguments):
                            yield event
                        continue
                    assert tool.server is not None
                    index, opened = events.server_call("mcp_call" if tool.kind == "mcp" else "webhook_call", name,
                                                       arguments, tool.server.server if tool.kind == "mcp" else None)
                    turn.server_calls.append((index, tool))
                    for event in opened:
                        yield event
                if choice.get("finish_reason"):
                    turn.finish = choice["finish_reason"]
        for event in events.close_text("incomplete" if turn.finish == "length" else "completed"):
            yield event

    async def _count(self, st: _State, turn: _Turn) -> None:
        usage = turn.usage or {}
        completion = int(usage.get("completion_tokens", 0))
        reasoning = 0
        if turn.reasoning:  # the thinking's tokens, as the tokenizer reads its text back
            ids = await self.serving._off_loop(self.serving.tokenizer.encode, turn.reasoning)
            reasoning = min(len(ids), completion)
        add_usage(st.usage, int(usage.get("prompt_tokens", 0)),
                  int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)), completion, reasoning)

    async def _run_calls(self, st: _State, calls: list[tuple[int, _Tool]]) -> AsyncIterator[dict[str, Any]]:
        """Run one turn's server-side calls concurrently; each call's events as it ends."""
        events = st.events
        for index, _ in calls:
            for event in events.call_running(index):
                yield event

        async def one(index: int, tool: _Tool) -> tuple[int, ToolResult]:
            assert tool.server is not None
            try:
                item = events.output[index]
                result = await st.runner.call(tool.server, item["arguments"], call_id=item.get("call_id") or item["id"])
            except asyncio.CancelledError:
                raise
            except Exception:  # the runner never raises for a tool's failure; this is its own bug
                log.exception("the tool runner failed on a call of %s", tool.name)
                result = ToolResult(None, "the server failed to run this tool call", 0.0)
            return index, result

        tasks = [asyncio.ensure_future(one(index, tool)) for index, tool in calls]
        try:
            for next_done in asyncio.as_completed(tasks):
                index, result = await next_done
                output, error = _clean(result.output), _clean(result.error) or None
                if output is None and error is None:
                    output = ""
                for event in events.call_done(index, output, error):
                    yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _save(self, st: _State) -> None:
        """Store the response (store true); one too large to keep, or a store that is down, leaves
        it unstored and says so (`store: false`)."""
        response = st.events.response
        if not st.req.store:
            return
        record = {"response": response, "input": st.conversation, "owner": st.owner}
        try:
            await self._store_call(self.store.put_response, response["id"], record, self.settings.store_ttl_s)
        except (ResponseTooLarge, APIError) as exc:
            log.warning("response %s is not stored: %s", response["id"], getattr(exc, "message", exc))
            response["store"] = False
        except Exception:  # a store's own refusal (Redis out of memory): the answer is there all the same
            log.exception("response %s is not stored: the state store failed", response["id"])
            response["store"] = False
