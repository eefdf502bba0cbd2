"""The gRPC front end: `expertmesh.v1.ExpertMesh` over `OpenAIServing` (and `ResponsesServing`, whose
RPCs live in `grpc_responses.py`), plus health and reflection.

    proto request ──▶ OpenAI-shaped dict ──▶ ChatCompletionRequest / CompletionRequest (pydantic)
        ──▶ serving.chat / serving.completion ──▶ OpenAI-shaped dict (or chunks) ──▶ proto message(s)

Going through the same pydantic models and the same `OpenAIServing` as HTTP makes a request
mean the same on both transports: same defaults, same validation, same messages. Refusals map
to status codes by their HTTP status (`STATUS_CODES`): 400 INVALID_ARGUMENT, 401
UNAUTHENTICATED, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 500 INTERNAL; the
details are the APIError's message, and its `param`, `type` and `code` travel as trailing
metadata (`error-param`, `error-type`, `error-code`). A streaming call that the client cancels
closes the serving stream, which aborts the request in the engine and frees its KV blocks.

A request message that does not parse (corrupt wire format, a string field that is not UTF-8)
is INVALID_ARGUMENT, as is every JSON text field that is not JSON or nests too deeply. Nothing
unforeseen leaves with more than "internal error" and INTERNAL: no exception type, no traceback
(those go to the log).

`authorization: Bearer <key>` metadata is checked on every ExpertMesh call when the
authenticator has keys; the standard `grpc.health.v1.Health` service and server reflection
stay open. Every call is counted in `expertmesh_requests_total` under its HTTP-style status.

Connections (`GrpcOptions`): a request message over the body limit (the HTTP one, sized for the
model's max_model_len) is refused by gRPC itself with RESOURCE_EXHAUSTED before it is parsed; a
client that does not finish the HTTP/2 handshake within the header timeout is dropped; a
connection with no call for `max_connection_idle_s` gets GOAWAY; idle connections are pinged
every `keepalive_time_s` and dropped when the ping goes unanswered; one connection holds at most
`max_concurrent_streams` calls. Templates and tokenization run off the server's event loop (the
serving layer's thread pool), as for HTTP.

Every gateway replica of the Serve app runs one of these servers (`serve_app.Gateway`); replicas on
one node share the port through SO_REUSEPORT (`GrpcOptions.reuse_port`), so the kernel deals each
new connection to one of them, as Serve's HTTP proxy runs on every node. Each ExpertMesh call's
initial metadata names the replica that answers it (`expertmesh-replica`, `REPLICA_METADATA`).

    health = GrpcHealth(serving=False)          # NOT_SERVING until the model is loaded
    server = build_grpc_server(serving, auth, 50051, health=health)
    await server.start()
    ...; await health.set_serving(True)
    ...; await health.enter_graceful_shutdown(); await server.stop(grace=5)
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from expertmesh.engine.async_engine import EngineDeadError
from expertmesh.gateway.app_config import default_max_request_body_bytes
from expertmesh.gateway.auth import Authenticator, bearer_token
from expertmesh.gateway.grpc_responses import ResponsesRpcs
from expertmesh.gateway.grpc_wire import add_servicer, ascii_metadata, decoded, utf8_details
from expertmesh.gateway.metrics import RequestOutcome, current_outcome
from expertmesh.gateway.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    loads_json,
    validation_error,
)
from expertmesh.gateway.responses import ResponsesServing
from expertmesh.gateway.serving import OpenAIServing
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertMesh"].full_name  # "expertmesh.v1.ExpertMesh"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # "grpc.health.v1.Health"
REPLICA_METADATA = "expertmesh-replica"
"""Initial-metadata key naming the gateway replica that answers a call (Ray Serve's replica id)."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest response message (gRPC's default is 4 MiB; a 262k-token echo with logprobs is more)."""


@dataclass(frozen=True)
class GrpcOptions:
    """Limits of the gRPC server's connections (see the module docstring; `AppConfig` has the defaults)."""
    max_message_bytes: int | None = None
    """Largest request message; None: sized for the model's max_model_len, as the HTTP body limit."""
    handshake_timeout_s: float = 30.0
    max_connection_idle_s: float = 300.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_concurrent_streams: int = 1024
    reuse_port: bool = False
    """SO_REUSEPORT: servers of one user on one node share the port (the gateway replicas); off, a
    port in use is an error."""

    def server_options(self, max_model_len: int) -> list[tuple[str, int]]:
        receive = self.max_message_bytes or default_max_request_body_bytes(max_model_len)
        return [
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", max(MAX_MESSAGE_BYTES, receive)),
            ("grpc.so_reuseport", int(self.reuse_port)),
            ("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout_s)),
            ("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
        ]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (other 4xx: INVALID_ARGUMENT, other 5xx: INTERNAL)."""
    if http_status in STATUS_CODES:
        return STATUS_CODES[http_status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL


# ---- server --------------------------------------------------------------------------------

class GrpcHealth(grpc_health.aio.HealthServicer):
    """The standard health service (asyncio), one status for "" (the whole server) and for
    `expertmesh.v1.ExpertMesh`: SERVING or NOT_SERVING."""

    SERVICES = ("", SERVICE_NAME)

    def __init__(self, serving: bool = True) -> None:
        super().__init__()
        for service in self.SERVICES:  # no watcher exists yet: set without the event loop
            self._server_status[service] = _health_status(serving)

    async def set_serving(self, serving: bool) -> None:
        for service in self.SERVICES:
            await self.set(service, _health_status(serving))


def _health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def build_grpc_server(serving: OpenAIServing, auth: Authenticator | None, port: int, host: str = "127.0.0.1", *,
                      health: GrpcHealth | None = None, options: GrpcOptions | None = None,
                      replica: str | None = None, responses: ResponsesServing | None = None) -> grpc.aio.Server:
    """An asyncio gRPC server (not started) on host:port serving `expertmesh.v1.ExpertMesh`,
    `grpc.health.v1.Health` and server reflection. Call it inside the event loop that runs it.

    `health`: pass your own `GrpcHealth` to change the status later (e.g. NOT_SERVING while
    loading, or on shutdown); without it the server reports SERVING. Raises RuntimeError when
    the port cannot be bound (in use, unless `options.reuse_port` and the holder reuses it too).
    `replica`: sent as `expertmesh-replica` initial metadata on every ExpertMesh call.
    `responses`: the Responses RPCs' serving (`grpc_responses.py`); None: one with no server-side
    tools, storing responses in this process (as `build_http_app`).
    """
    health_servicer = health if health is not None else GrpcHealth()
    options = options or GrpcOptions()
    server = grpc.aio.server(options=options.server_options(serving.settings.max_model_len))
    add_servicer(ExpertMeshServicer(serving, auth, replica, responses or ResponsesServing(serving)), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address}: {exc}") from exc
    return server


class ExpertMeshServicer(ResponsesRpcs, pb_grpc.ExpertMeshServicer):
    def __init__(self, serving: OpenAIServing, auth: Authenticator | None = None, replica: str | None = None,
                 responses: ResponsesServing | None = None) -> None:
        self.serving, self.auth, self.responses = serving, auth, responses
        self.replica_metadata = ((REPLICA_METADATA, ascii_metadata(replica)),) if replica else None

    async def ChatCompletion(self, request: pb.ChatCompletionRequest, context) -> pb.ChatCompletionResponse:
        return await self._unary(context, "chat", lambda: self.serving.chat(chat_request(request)), chat_response)

    async def ChatCompletionStream(self, request: pb.ChatCompletionRequest,
                                   context) -> AsyncIterator[pb.ChatCompletionChunk]:
        # grpc.aio streams from a method only if it is itself an async generator
        call = self._stream(context, "chat", lambda: self.serving.chat(chat_request(request, stream=True)),
                            chat_chunk)
        async with contextlib.aclosing(call) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Completion(self, request: pb.CompletionRequest, context) -> pb.CompletionResponse:
        return await self._unary(context, "completions", lambda: self.serving.completion(completion_request(request)),
                                 completion_response)

    async def CompletionStream(self, request: pb.CompletionRequest, context) -> AsyncIterator[pb.CompletionChunk]:
        call = self._stream(context, "completions",
                            lambda: self.serving.completion(completion_request(request, stream=True)), completion_chunk)
        async with contextlib.aclosing(call) as chunks:
            async for chunk in chunks:
                yield chunk

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def models():
            decoded(request)
            return self.serving.models()

        return await self._unary(context, "models", models, models_response)

    async def _unary(self, context, endpoint: str, call, convert):
        """Authorize, await call() (an OpenAI-shaped dict), convert it; errors end the call with their status."""
        outcome = _open_outcome(endpoint)
        status = 200
        try:
            await self._announce(context)
            await self._authorize(context)
            return convert(await call())
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as exc:
            status = http_status(exc)
            await abort(context, exc)
        finally:
            self.serving.metrics.count_request(endpoint, outcome.status or status)

    async def _stream(self, context, endpoint: str, call, convert):
        """Authorize, await call() (an async iterator of OpenAI chunks) and stream each converted."""
        outcome = _open_outcome(endpoint)
        status, stream = 200, None
        try:
            await self._announce(context)
            await self._authorize(context)
            stream = await call()
            async for chunk in stream:
                yield convert(chunk)
        except grpc.aio.AbortError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            raise
        except Exception as exc:
            status = http_status(exc)
            await abort(context, exc)
        finally:
            if stream is not None:  # a cancelled call lands here too: the engine aborts the request
                await stream.aclose()
            self.serving.metrics.count_request(endpoint, outcome.status or status)

    async def _announce(self, context) -> None:
        """Send the initial metadata now, naming this replica (also on calls refused after it)."""
        if self.replica_metadata is not None:
            await context.send_initial_metadata(self.replica_metadata)

    async def _authorize(self, context) -> None:
        if self.auth is None or not self.auth.enabled:
            return
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        await self.auth.check(bearer_token(header))


def _open_outcome(endpoint: str) -> RequestOutcome:
    """The call's outcome, where the serving layer reports its status (each call runs in its own
    task, so the context variable needs no reset)."""
    outcome = RequestOutcome(endpoint)
    current_outcome.set(outcome)
    return outcome


def http_status(exc: BaseException) -> int:
    """The HTTP-style status a failed call is counted under."""
    if isinstance(exc, APIError):
        return exc.status
    if isinstance(exc, ValidationError):
        return 400
    return 503 if isinstance(exc, EngineDeadError) else 500


INTERNAL_ERROR_DETAILS = "internal error: the server could not process this request; it is logged"


async def abort(context, exc: Exception) -> NoReturn:
    """End the call with the status that `exc` maps to (see the module docstring)."""
    if isinstance(exc, ValidationError):
        exc = validation_error(exc.errors())
    if isinstance(exc, APIError):
        trailers = [(f"error-{k}", ascii_metadata(v)) for k, v in (("type", exc.type), ("param", exc.param),
                                                          ("code", exc.code)) if v]
        trailers += [(k.lower(), v) for k, v in exc.headers.items() if k.isascii() and v.isascii()]
        await context.abort(status_code(exc.status), utf8_details(exc.message), trailing_metadata=tuple(trailers))
    if isinstance(exc, EngineDeadError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, utf8_details(str(exc)))
    log.exception("gRPC call failed", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAILS)


# ---- proto request → OpenAI request --------------------------------------------------------

_TOOL_CHOICE_MODES = {pb.TOOL_CHOICE_MODE_NONE: "none", pb.TOOL_CHOICE_MODE_AUTO: "auto",
                      pb.TOOL_CHOICE_MODE_REQUIRED: "required"}
_RESPONSE_FORMATS = {pb.RESPONSE_FORMAT_TYPE_TEXT: "text", pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
                     pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema"}
_OPTIONAL_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty", "seed", "max_tokens", "min_tokens", "skip_special_tokens")


def chat_request(request: pb.ChatCompletionRequest, stream: bool = False) -> ChatCompletionRequest:
    """Raises APIError (an undecodable message, bad JSON text) or pydantic's ValidationError."""
    return ChatCompletionRequest.model_validate(chat_request_dict(decoded(request), stream))


def completion_request(request: pb.CompletionRequest, stream: bool = False) -> CompletionRequest:
    return CompletionRequest.model_validate(completion_request_dict(decoded(request), stream))


def chat_request_dict(request: pb.ChatCompletionRequest, stream: bool = False) -> dict[str, Any]:
    d = _common(request, stream)
    d["messages"] = [_message_dict(m) for m in request.messages]
    sp = request.sampling
    d["logprobs"] = sp.logprobs
    if sp.HasField("top_logprobs"):
        d["top_logprobs"] = sp.top_logprobs
    if request.tools:
        d["tools"] = [_tool_dict(i, t) for i, t in enumerate(request.tools)]
    if request.HasField("tool_choice"):
        which = request.tool_choice.WhichOneof("choice")
        if which == "function_name":
            d["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function_name}}
        elif which == "mode" and request.tool_choice.mode != pb.TOOL_CHOICE_MODE_UNSPECIFIED:
            mode = _TOOL_CHOICE_MODES.get(request.tool_choice.mode)
            if mode is None:
                raise APIError(f"tool_choice.mode {request.tool_choice.mode} is not a ToolChoiceMode",
                               param="tool_choice")
            d["tool_choice"] = mode
    if request.HasField("parallel_tool_calls"):
        d["parallel_tool_calls"] = request.parallel_tool_calls
    kwargs: dict[str, Any] = {}
    if request.HasField("chat_template_kwargs"):
        ctk = request.chat_template_kwargs
        if ctk.HasField("extra_json"):
            extra = _json(ctk.extra_json, "chat_template_kwargs.extra_json")
            if not isinstance(extra, dict):
                raise APIError("chat_template_kwargs.extra_json must be a JSON object",
                               param="chat_template_kwargs.extra_json")
            kwargs.update(extra)
        if ctk.HasField("enable_thinking"):
            kwargs["enable_thinking"] = ctk.enable_thinking
    if kwargs:
        d["chat_template_kwargs"] = kwargs
    if request.HasField("thinking_budget"):
        d["thinking_budget"] = request.thinking_budget
    if request.HasField("add_generation_prompt"):
        d["add_generation_prompt"] = request.add_generation_prompt
    return d


def completion_request_dict(request: pb.CompletionRequest, stream: bool = False) -> dict[str, Any]:
    d = _common(request, stream)
    text = request.WhichOneof("text")
    texts = [request.prompt] if text == "prompt" else list(request.prompts.texts)
    ids = [list(p.ids) for p in request.prompt_token_ids]
    if texts and ids:
        raise APIError("give prompt or prompt_token_ids, not both", param="prompt")
    if texts:
        d["prompt"] = texts[0] if len(texts) == 1 else texts
    elif ids:
        d["prompt"] = ids[0] if len(ids) == 1 else ids
    sp = request.sampling
    if sp.logprobs:
        d["logprobs"] = sp.top_logprobs if sp.HasField("top_logprobs") else 0
    elif sp.HasField("top_logprobs"):
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    d["echo"] = request.echo
    return d


def _common(request: pb.ChatCompletionRequest | pb.CompletionRequest, stream: bool) -> dict[str, Any]:
    """The fields of `_SamplingFields`: sampling, guided decoding, model, stream."""
    d: dict[str, Any] = {"stream": stream}
    if stream:
        d["stream_options"] = {"include_usage": True}
    if request.model:
        d["model"] = request.model
    if request.user:
        d["user"] = request.user
    sp = request.sampling
    for name in _OPTIONAL_SAMPLING:
        if sp.HasField(name):
            d[name] = getattr(sp, name)
    if sp.stop:
        d["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    d["ignore_eos"] = sp.ignore_eos
    d["include_stop_str_in_output"] = sp.include_stop_str_in_output
    if request.HasField("response_format"):
        d["response_format"] = _response_format_dict(request.response_format)
    if request.HasField("guided_json"):
        d["guided_json"] = _json(request.guided_json, "guided_json")
    if request.HasField("guided_regex"):
        d["guided_regex"] = request.guided_regex
    if request.guided_choice:
        d["guided_choice"] = list(request.guided_choice)
    if request.HasField("guided_grammar"):
        d["guided_grammar"] = request.guided_grammar
    return d


def _message_dict(m: pb.ChatMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role}
    for name in ("content", "reasoning_content", "name", "tool_call_id"):
        if m.HasField(name):
            d[name] = getattr(m, name)
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": c.type or "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    return d


def _tool_dict(index: int, tool: pb.Tool) -> dict[str, Any]:
    f = tool.function
    function: dict[str, Any] = {"name": f.name}
    if f.HasField("description"):
        function["description"] = f.description
    if f.HasField("parameters_json"):
        function["parameters"] = _json(f.parameters_json, f"tools.{index}.function.parameters_json")
    if f.HasField("strict"):
        function["strict"] = f.strict
    return {"type": tool.type or "function", "function": function}


def _response_format_dict(fmt: pb.ResponseFormat) -> dict[str, Any]:
    kind = _RESPONSE_FORMATS.get(fmt.type)
    if kind is None:
        if fmt.type != pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED:
            raise APIError(f"response_format.type {fmt.type} is not a ResponseFormatType", param="response_format")
        kind = "json_schema" if fmt.HasField("json_schema") else "text"
    d: dict[str, Any] = {"type": kind}
    if fmt.HasField("json_schema"):
        js = fmt.json_schema
        schema: dict[str, Any] = {"name": js.name or "response"}
        if js.HasField("description"):
            schema["description"] = js.description
        if js.schema_json:
            schema["schema"] = _json(js.schema_json, "response_format.json_schema.schema_json")
        if js.HasField("strict"):
            schema["strict"] = js.strict
        d["json_schema"] = schema
    return d


def _json(text: str, param: str) -> Any:
    try:
        return loads_json(text)
    except RecursionError:
        raise APIError(f"{param} nests objects and arrays too deeply to parse", param=param,
                       code="too_deeply_nested") from None
    except ValueError as exc:
        raise APIError(f"{param} is not valid JSON: {exc}", param=param) from None


# ---- OpenAI response → proto ---------------------------------------------------------------

def chat_response(d: Mapping[str, Any]) -> pb.ChatCompletionResponse:
    return pb.ChatCompletionResponse(
        id=d["id"], created=d["created"], model=d["model"], usage=_usage(d.get("usage")),
        choices=[pb.ChatChoice(index=c["index"], message=_message(c["message"]),
                               finish_reason=c.get("finish_reason") or "",
                               logprobs=_chat_logprobs(c.get("logprobs")), stop_reason=_stop_reason(c))
                 for c in d["choices"]])


def chat_chunk(d: Mapping[str, Any]) -> pb.ChatCompletionChunk:
    return pb.ChatCompletionChunk(
        id=d["id"], created=d["created"], model=d["model"], usage=_usage(d.get("usage")),
        choices=[pb.ChatChunkChoice(index=c["index"], delta=_delta(c.get("delta") or {}),
                                    finish_reason=c.get("finish_reason"),
                                    logprobs=_chat_logprobs(c.get("logprobs")), stop_reason=_stop_reason(c))
                 for c in d["choices"]])


def completion_response(d: Mapping[str, Any]) -> pb.CompletionResponse:
    return pb.CompletionResponse(id=d["id"], created=d["created"], model=d["model"], usage=_usage(d.get("usage")),
                                 choices=[_completion_choice(c) for c in d["choices"]])


def completion_chunk(d: Mapping[str, Any]) -> pb.CompletionChunk:
    return pb.CompletionChunk(id=d["id"], created=d["created"], model=d["model"], usage=_usage(d.get("usage")),
                              choices=[_completion_choice(c) for c in d["choices"]])


def models_response(d: Mapping[str, Any]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.Model(id=m["id"], created=m.get("created", 0), owned_by=m.get("owned_by", ""),
                 max_model_len=m.get("max_model_len", 0)) for m in d["data"]])


def _message(m: Mapping[str, Any]) -> pb.ChatMessage:
    return pb.ChatMessage(role=m.get("role", "assistant"), content=m.get("content"),
                          reasoning_content=m.get("reasoning_content"),
                          tool_calls=[_tool_call(c) for c in m.get("tool_calls") or ()])


def _delta(delta: Mapping[str, Any]) -> pb.ChatDelta:
    return pb.ChatDelta(role=delta.get("role"), content=delta.get("content"),
                        reasoning_content=delta.get("reasoning_content"),
                        tool_calls=[_tool_call(c) for c in delta.get("tool_calls") or ()])


def _tool_call(c: Mapping[str, Any]) -> pb.ToolCall:
    f = c.get("function") or {}
    return pb.ToolCall(id=c.get("id") or "", type=c.get("type") or "function", index=c.get("index") or 0,
                       function=pb.FunctionCall(name=f.get("name") or "", arguments=f.get("arguments") or ""))


def _completion_choice(c: Mapping[str, Any]) -> pb.CompletionChoice:
    return pb.CompletionChoice(index=c["index"], text=c.get("text") or "", finish_reason=c.get("finish_reason"),
                               logprobs=_completion_logprobs(c.get("logprobs")), stop_reason=_stop_reason(c))


def _usage(u: Mapping[str, Any] | None) -> pb.Usage | None:
    if u is None:
        return None
    details = u.get("prompt_tokens_details") or {}
    return pb.Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                    total_tokens=u["total_tokens"], cached_tokens=details.get("cached_tokens") or 0)


def _stop_reason(c: Mapping[str, Any]) -> pb.StopReason | None:
    reason = c.get("stop_reason")
    if isinstance(reason, bool) or reason is None:
        return None
    if isinstance(reason, int):
        return pb.StopReason(stop_token_id=reason)
    return pb.StopReason(stop_str=str(reason))


def _chat_logprobs(lp: Mapping[str, Any] | None) -> pb.Logprobs | None:
    if lp is None:
        return None
    return pb.Logprobs(content=[
        pb.TokenLogprob(token=t["token"], logprob=t["logprob"], bytes=bytes(t.get("bytes") or b""),
                        top_logprobs=[pb.TopLogprob(token=a["token"], logprob=a["logprob"],
                                                    bytes=bytes(a.get("bytes") or b""))
                                      for a in t.get("top_logprobs") or ()])
        for t in lp.get("content") or ()])


def _completion_logprobs(lp: Mapping[str, Any] | None) -> pb.Logprobs | None:
    if lp is None:
        return None
    content = []
    for token, logprob, top, offset in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                           lp["text_offset"]):
        content.append(pb.TokenLogprob(
            token=token, logprob=logprob, bytes=token.encode("utf-8"), text_offset=offset,
            top_logprobs=[pb.TopLogprob(token=t, logprob=v, bytes=t.encode("utf-8")) for t, v in (top or {}).items()]))
    return pb.Logprobs(content=content)
