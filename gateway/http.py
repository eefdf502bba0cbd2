"""The HTTP front end: a FastAPI app over `OpenAIServing`.

    /v1/chat/completions, /v1/completions   OpenAI shapes; `stream: true` → server-sent events
    /v1/responses                           the Responses API with the server's tool loop
                                            (`responses.py`); `stream: true` → its events as SSE
                                            (`event: <type>` / `data: <json>`, no [DONE])
    /v1/responses/{id}                      GET a stored response (the caller's own), DELETE it
    /v1/responses/{id}/input_items          its conversation's input items (OpenAI's list)
    /v1/models, /v1/models/{id}
    /health                                 200 while the engine makes progress, else 503 with the
                                            reason (open; see `health.py`); names the gateway
                                            replica that answered (`replica`, under Ray Serve)
    /livez                                  200 while this gateway answers at all (open; no engine call)
    /metrics                                Prometheus text format (open)

Before FastAPI sees an API request, `RequestGuard` (`http_guard.py`) checks its API key, limits
its body (413) and counts it in the metrics, whatever its outcome. Every error, ours or the
framework's (malformed JSON, wrong types, unknown routes), leaves as
{"error": {"message", "type", "param", "code"}} with a 4xx status; so does a body that is not
UTF-8, nests past what the parser takes, or repeats a key (`{"n": 1, "n": 9}`: which one counts
would depend on the parser, so neither does). Anything unforeseen is a 500 with the same object
and a message that names no exception type (the traceback goes to the log). A stream's first chunk is
awaited before the response starts, so a request the engine refuses still gets a 400 rather
than a broken stream; a client that disconnects mid-stream cancels the generator, which aborts
the request in the engine and frees its KV blocks. A stream that fails after its first chunk (the
engine replica died, say) ends with an error event, `data: {"error": {...}}`, then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertmesh.gateway.app_config import default_max_request_body_bytes
from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.health import DEFAULT_CALL_TIMEOUT_S, DEFAULT_STALL_TIMEOUT_S, engine_health
from expertmesh.gateway.http_guard import RequestGuard
from expertmesh.gateway.metrics import CONTENT_TYPE
from expertmesh.gateway.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DuplicateKeyError,
    loads_json,
    validation_error,
)
from expertmesh.gateway.responses import ResponsesServing
from expertmesh.gateway.responses_events import sse
from expertmesh.gateway.responses_protocol import parse_request
from expertmesh.gateway.serving import OpenAIServing

log = logging.getLogger(__name__)
INTERNAL_ERROR_MESSAGE = ("The server had an error while processing your request; it is logged. "
                          "Retry, or report it if it persists.")


def build_http_app(serving: OpenAIServing, auth: Authenticator | None = None,
                   ready: Callable[[], bool] = lambda: True, *, max_body_bytes: int | None = None,
                   health_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                   health_call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S, body_timeout_s: float = 30.0,
                   replica: str | None = None, responses: ResponsesServing | None = None) -> FastAPI:
    """The FastAPI app. `max_body_bytes` None: sized from the model's max_model_len. `replica`: the
    gateway replica's id, which `/health` reports (which replica answered). `responses`: the
    Responses API (None: one with no server-side tools, storing responses in this process)."""
    if responses is None:
        responses = ResponsesServing(serving)
    app = FastAPI(title="expertmesh", version="0.1.0",
                  description="OpenAI-compatible API of expertmesh, a server for Qwen3-MoE models.")
    if max_body_bytes is None:
        max_body_bytes = default_max_request_body_bytes(serving.settings.max_model_len)
    app.add_middleware(RequestGuard, auth=auth, max_body_bytes=max_body_bytes, metrics=serving.metrics,
                       body_timeout_s=body_timeout_s)
    app.router.route_class = _StrictJSONRoute
    app.add_middleware(_InternalErrors)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = _body_error(exc.__cause__) or APIError(str(exc.detail), status=exc.status_code, type=kind)
        error.headers = {**(getattr(exc, "headers", None) or {}), **error.headers}
        return error_response(error)

    @app.get("/health")
    async def health() -> Response:
        if not ready():
            return JSONResponse({"status": "unhealthy", "reason": "the model is still loading"}, status_code=503)
        report = await engine_health(serving.client, health_stall_timeout_s, health_call_timeout_s)
        body = dict(report.body)
        if replica is not None:
            body["replica"] = replica
        if auth is not None:
            body["auth"] = await auth.status()  # e.g. a key store that holds no key refuses everyone
        return JSONResponse(body, status_code=200 if report.healthy else 503)

    @app.get("/livez")
    async def livez() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:  # a dead or stuck engine leaves its gauges out; the gateway's own series still answer
            stats, expert_load = await asyncio.wait_for(serving.engine_stats(), health_call_timeout_s)
        except Exception:
            log.warning("/metrics: the engine did not answer; its gauges are left out", exc_info=True)
            stats, expert_load = {}, None
        serving.metrics.observe_engine(stats, expert_load, serving.replica_stats())
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return serving.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return serving.model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _respond(await serving.chat(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await _respond(await serving.completion(body))

    @app.post("/v1/responses")
    async def create_response(body: Annotated[dict[str, Any], Body(description="OpenAI's Responses API request")]
                              ) -> Response:
        result = await responses.create(parse_request(body))
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(_response_events(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return await responses.get(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        return await responses.delete(response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, after: str | None = None, limit: int = 20,
                               order: str = "desc") -> dict[str, Any]:
        return await responses.input_items(response_id, after=after, limit=limit, order=order)

    return app


async def _respond(result: dict[str, Any] | AsyncIterator[dict[str, Any]]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    try:
        first = await anext(result)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await result.aclose()
        raise
    return StreamingResponse(_sse(first, result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        if first is not None:
            yield _event(first)
            async for chunk in rest:
                yield _event(chunk)
    except APIError as exc:  # after the headers: the error travels as an event
        yield _event(exc.to_dict(), ensure_ascii=True)
    except Exception as exc:  # never cut a stream without an ending
        log.exception("a stream failed", exc_info=exc)
        yield _event(APIError("the server failed while streaming this response", status=500,
                              type="server_error").to_dict(), ensure_ascii=True)
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


async def _response_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """A response's events as SSE; a client that goes away closes `events`, which cancels the loop
    (the engine aborts the turn and frees its KV blocks; running tool calls are cancelled)."""
    try:
        async for event in events:
            yield sse(event)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _event(data: dict[str, Any], ensure_ascii: bool = False) -> str:
    return f"data: {json.dumps(data, ensure_ascii=ensure_ascii, separators=(',', ':'))}\n\n"


class _ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes the request (a lone surrogate
    included) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    return _ErrorJSONResponse(error.to_dict(), status_code=error.status, headers=error.headers or None)


def internal_error() -> APIError:
    return APIError(INTERNAL_ERROR_MESSAGE, status=500, type="server_error", code="internal_error")


class _InternalErrors:
    """ASGI middleware: an exception no handler took becomes a 500 with OpenAI's error object (and
    a logged traceback) instead of Starlette's plain-text "Internal Server Error". After a
    response has started nothing can be sent, so the exception goes on to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await error_response(internal_error())(scope, receive, send)


class _StrictJSONRequest(Request):
    """A request whose JSON body may not repeat a key in any object."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads_json(body)
            except DuplicateKeyError as exc:
                raise json.JSONDecodeError(str(exc), "", 0) from None  # FastAPI's path for bad JSON: a 400
        return self._json


class _StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def _body_error(cause: BaseException | None) -> APIError | None:
    """What FastAPI's "There was an error parsing the body" was, when the cause is the body itself."""
    if isinstance(cause, UnicodeDecodeError):
        return APIError(f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}",
                        code="invalid_json")
    if isinstance(cause, RecursionError):
        return APIError("the request body nests objects and arrays too deeply to parse", code="invalid_json")
    if isinstance(cause, ValueError):
        return APIError(f"the request body is not valid JSON: {cause}", code="invalid_json")
    return None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error") or errors[0].get("msg")
        return APIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    # a query or path parameter is named as itself (`limit`), as a body field is
    return validation_error([{**e, "loc": tuple(e.get("loc", ()))[1:]} if tuple(e.get("loc", ()))[:1] in (
        ("query",), ("path",)) else e for e in errors])
