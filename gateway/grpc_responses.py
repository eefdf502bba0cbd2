"""The Responses RPCs of `expertmesh.v1.ExpertMesh` (a mixin of the servicer in `grpc_server.py`).

    ResponsesRequest.body_json ──▶ the same JSON body as POST /v1/responses ──▶ ResponsesServing
        Responses        ──▶ the finished response: typed fields and items, and `response_json`
        ResponsesStream  ──▶ one ResponsesEvent per Responses event (type, sequence_number, event_json)

The body goes through the same parser and the same `ResponsesServing` as HTTP, so a request means
the same on either transport; auth, the message limit, error mapping (status codes and the
`error-*` trailers) and counting are the servicer's, as for chat. A refusal before the first event
is a status; a failure after it is an `error` event and response.failed, as over HTTP. A cancelled
stream closes the loop (the engine aborts the turn; running tool calls are cancelled).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from expertmesh.gateway.grpc_wire import decoded
from expertmesh.gateway.protocol import APIError, loads_json
from expertmesh.gateway.responses import ResponsesServing
from expertmesh.gateway.responses_protocol import parse_request
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb


class ResponsesRpcs:
    """`Responses` and `ResponsesStream`; the servicer provides `responses`, `_unary` and `_stream`."""

    responses: ResponsesServing | None
    _unary: Any
    _stream: Any

    async def Responses(self, request: pb.ResponsesRequest, context) -> pb.ResponsesResponse:
        return await self._unary(context, "responses", lambda: self._create(request, False), response_message)

    async def ResponsesStream(self, request: pb.ResponsesRequest, context) -> AsyncIterator[pb.ResponsesEvent]:
        call = self._stream(context, "responses", lambda: self._create(request, True), event_message)
        async with contextlib.aclosing(call) as events:
            async for event in events:
                yield event

    async def _create(self, request: pb.ResponsesRequest, stream: bool):
        if self.responses is None:
            raise APIError("the Responses API is not served here", status=501, type="invalid_request_error",
                           code="unsupported")
        text = decoded(request).body_json
        try:
            body = loads_json(text) if text else {}
        except RecursionError:
            raise APIError("body_json nests objects and arrays too deeply to parse", param="body_json",
                           code="too_deeply_nested") from None
        except ValueError as exc:
            raise APIError(f"body_json is not valid JSON: {exc}", param="body_json", code="invalid_json") from None
        if isinstance(body, dict):
            body["stream"] = stream
        return await self.responses.create(parse_request(body))


def response_message(d: Mapping[str, Any]) -> pb.ResponsesResponse:
    usage = d.get("usage") or {}
    return pb.ResponsesResponse(
        id=d["id"], status=d["status"], incomplete_reason=(d.get("incomplete_details") or {}).get("reason") or "",
        model=d["model"], created_at=d["created_at"], output=[output_item(i) for i in d["output"]],
        usage=pb.ResponseUsage(
            input_tokens=usage.get("input_tokens", 0),
            cached_tokens=(usage.get("input_tokens_details") or {}).get("cached_tokens", 0),
            output_tokens=usage.get("output_tokens", 0),
            reasoning_tokens=(usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0),
            total_tokens=usage.get("total_tokens", 0)),
        previous_response_id=d.get("previous_response_id") or "", store=bool(d.get("store")),
        response_json=json.dumps(d, ensure_ascii=False, separators=(",", ":")))


def output_item(item: Mapping[str, Any]) -> pb.ResponseOutputItem:
    text = "".join(part.get("text", "") for part in item.get("content") or ())
    return pb.ResponseOutputItem(
        type=item["type"], id=item.get("id") or "", status=item.get("status") or "", role=item.get("role") or "",
        text=text, name=item.get("name") or "", arguments=item.get("arguments") or "",
        call_id=item.get("call_id") or "", server_label=item.get("server_label") or "", output=item.get("output"),
        error=item.get("error"))


def event_message(event: Mapping[str, Any]) -> pb.ResponsesEvent:
    return pb.ResponsesEvent(type=event["type"], sequence_number=event["sequence_number"],
                             event_json=json.dumps(event, ensure_ascii=False, separators=(",", ":")))
