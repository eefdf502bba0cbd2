"""The HTTP front end: a FastAPI app over `OpenAIServing`.

    /v1/chat/completions, /v1/completions   OpenAI shapes; `stream: true` → server-sent events
    /v1/models, /v1/models/{id}
    /health                                 200 once the model is loaded, else 503 (open)
    /metrics                                Prometheus text format (open)

Every error, ours or the framework's (malformed JSON, wrong types, unknown routes), leaves as
{"error": {"message", "type", "param", "code"}} with a 4xx status; so does a body that is not
UTF-8, nests past what the parser takes, or repeats a key (`{"n": 1, "n": 9}`: which one counts
would depend on the parser, so neither does). Anything unforeseen is a 500 with the same object
and a message that names no exception type (the traceback goes to the log). A stream's first chunk is
awaited before the response starts, so a request the engine refuses still gets a 400 rather
than a broken stream; a client that disconnects mid-stream cancels the generator, which aborts
the request in the engine and frees its KV blocks.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.metrics import CONTENT_TYPE
from expertmesh.gateway.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DuplicateKeyError,
    loads_json,
    validation_error,
)
from expertmesh.gateway.serving import OpenAIServing

log = logging.getLogger(__name__)
INTERNAL_ERROR_MESSAGE = ("The server had an error while processing your request; it is logged. "
                          "Retry, or report it if it persists.")


def build_http_app(serving: OpenAIServing, auth: Authenticator | None = None,
                   ready: Callable[[], bool] = lambda: True) -> FastAPI:
    app = FastAPI(title="expertmesh", version="0.1.0",
                  description="OpenAI-compatible API of expertmesh, a server for Qwen3-MoE models.")
    app.router.route_class = _StrictJSONRoute
    app.add_middleware(_InternalErrors)

    async def authorize(request: Request) -> None:
        if auth is not None:
            await auth.check_http(request.headers.get("authorization"))

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
            return error_response(APIError("the model is still loading", status=503, type="server_error"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, expert_load = await serving.engine_stats()
        serving.metrics.observe_engine(stats, expert_load)
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return serving.models()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        return serving.model(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _respond(await serving.chat(body))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Response:
        return await _respond(await serving.completion(body))

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
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


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
    return validation_error(list(errors))
