"""The HTTP front end: a FastAPI app over `OpenAIServing`.

    /v1/chat/completions, /v1/completions   OpenAI shapes; `stream: true` → server-sent events
    /v1/models, /v1/models/{id}
    /health                                 200 once the model is loaded, else 503 (open)
    /metrics                                Prometheus text format (open)

Every error, ours or the framework's (malformed JSON, wrong types, unknown routes), leaves as
{"error": {"message", "type", "param", "code"}} with a 4xx status. A stream's first chunk is
awaited before the response starts, so a request the engine refuses still gets a 400 rather
than a broken stream; a client that disconnects mid-stream cancels the generator, which aborts
the request in the engine and frees its KV blocks.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.gateway.auth import Authenticator
from expertmesh.gateway.metrics import CONTENT_TYPE
from expertmesh.gateway.protocol import APIError, ChatCompletionRequest, CompletionRequest
from expertmesh.gateway.serving import OpenAIServing


def build_http_app(serving: OpenAIServing, auth: Authenticator | None = None,
                   ready: Callable[[], bool] = lambda: True) -> FastAPI:
    app = FastAPI(title="expertmesh", version="0.1.0",
                  description="OpenAI-compatible API of expertmesh, a server for Qwen3-MoE models.")

    async def authorize(request: Request) -> None:
        if auth is not None:
            await auth.check_http(request.headers.get("authorization"))

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> Response:
        if not ready():
            return JSONResponse(APIError("the model is still loading", status=503, type="server_error").to_dict(),
                                status_code=503)
        body: dict[str, Any] = {"status": "ok"}
        if auth is not None:
            body["auth"] = await auth.status()  # e.g. a key store that holds no key refuses everyone
        return JSONResponse(body)

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
        yield _event(exc.to_dict())
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("the request is invalid")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return APIError(f"{where}{err.get('msg')} (got {_short(err.get('input'))})", param=param,
                    code="invalid_type" if "type" in str(err.get("type")) else None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
