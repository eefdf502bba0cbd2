"""The Responses API's stream: one response object, and the events that build it, in order.

`ResponseEvents` holds the response (`response`, the object `GET /v1/responses/{id}` returns) and
appends to its `output` as the loop (`responses.py`) learns things; each method returns the events
that say so, each with the next `sequence_number`:

    response.created, response.in_progress                          (status in_progress, no output)
    reasoning item   output_item.added, content_part.added {reasoning_text},
                     reasoning_text.delta..., reasoning_text.done, content_part.done, output_item.done
    message item     output_item.added, content_part.added {output_text},
                     output_text.delta..., output_text.done, content_part.done, output_item.done
    function_call    output_item.added, function_call_arguments.delta, .done, output_item.done
    mcp_call         output_item.added, mcp_call_arguments.delta, .done, mcp_call.in_progress,
                     (the call runs) mcp_call.completed | mcp_call.failed, output_item.done
    webhook_call     the same with webhook_call_arguments.* and webhook_call.* (our extension)
    the end          response.completed | response.incomplete | error, response.failed

The stream and the unary answer are the same object: a unary request drains these events and
returns the response of the last one. Over HTTP each event is a server-sent event
`event: <type>` / `data: <json>` (`sse`), as OpenAI sends them; gRPC sends each as a message.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any, Literal

from expertmesh.gateway.protocol import APIError
from expertmesh.gateway.responses_protocol import new_id

TextKind = Literal["reasoning", "message"]
CallKind = Literal["mcp_call", "webhook_call"]


def empty_usage() -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


def add_usage(usage: dict[str, Any], prompt: int, cached: int, completion: int, reasoning: int) -> None:
    """Add one turn's tokens to a response's usage (every turn's prompt counts: the model read it)."""
    usage["input_tokens"] += prompt
    usage["input_tokens_details"]["cached_tokens"] += cached
    usage["output_tokens"] += completion
    usage["output_tokens_details"]["reasoning_tokens"] += reasoning
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]


class ResponseEvents:
    """A response being built and the events of each step (see the module docstring)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.output: list[dict[str, Any]] = response["output"]
        self.seq = 0
        self._open: tuple[TextKind, int] | None = None  # the text item being written: (kind, output index)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def _add_item(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))

    def _item_done(self, index: int) -> dict[str, Any]:
        return self._event("response.output_item.done", output_index=index, item=copy.deepcopy(self.output[index]))

    # ---- the start -----------------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    # ---- reasoning and message text ------------------------------------------------------------

    def text(self, kind: TextKind, delta: str) -> list[dict[str, Any]]:
        """`delta` of the reasoning or of the message, opening its item (and closing the other) first."""
        if not delta:
            return []
        events = []
        if self._open is not None and self._open[0] != kind:
            events += self.close_text()
        if self._open is None:
            if kind == "reasoning":
                item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            else:
                item = {"type": "message", "id": new_id("msg"), "role": "assistant", "status": "in_progress",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": []}
            index, added = self._add_item(item)
            item["content"].append(part)
            self._open = (kind, index)
            events += [added, self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                          content_index=0, part=dict(part))]
        index = self._open[1]
        item = self.output[index]
        item["content"][0]["text"] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self._event(name, item_id=item["id"], output_index=index, content_index=0, delta=delta,
                                  **extra))
        return events

    def close_text(self, status: str = "completed") -> list[dict[str, Any]]:
        """Finish the text item being written, if any (status "incomplete" when the turn was cut)."""
        if self._open is None:
            return []
        kind, index = self._open
        self._open = None
        item = self.output[index]
        item["status"] = status
        part = item["content"][0]
        name = "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [self._event(name, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                            **extra),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=dict(part)),
                self._item_done(index)]

    # ---- tool calls ----------------------------------------------------------------------------

    def function_call(self, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        """A call of a client-side function: returned to the client, complete at once."""
        events = self.close_text()
        item = {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        index, added = self._add_item(item)
        item["arguments"], item["status"] = arguments, "completed"
        return events + [
            added,
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=arguments),
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=name, arguments=arguments),
            self._item_done(index)]

    def server_call(self, kind: CallKind, name: str, arguments: str,
                    server_label: str | None) -> tuple[int, list[dict[str, Any]]]:
        """A call the server runs (an MCP tool or a webhook), written but not yet run: its index and events."""
        events = self.close_text()
        item: dict[str, Any] = {"type": kind, "id": new_id("mcp" if kind == "mcp_call" else "wh")}
        if server_label is not None:
            item["server_label"] = server_label
        item.update(name=name, arguments="", output=None, error=None, status="in_progress")
        index, added = self._add_item(item)
        item["arguments"] = arguments
        return index, events + [
            added,
            self._event(f"response.{kind}_arguments.delta", item_id=item["id"], output_index=index, delta=arguments),
            self._event(f"response.{kind}_arguments.done", item_id=item["id"], output_index=index,
                        arguments=arguments)]

    def call_running(self, index: int) -> list[dict[str, Any]]:
        item = self.output[index]
        return [self._event(f"response.{item['type']}.in_progress", item_id=item["id"], output_index=index)]

    def call_done(self, index: int, output: str | None, error: str | None,
                  status: str | None = None) -> list[dict[str, Any]]:
        """The call's outcome: its output, or its error (status "failed", or "incomplete" when it never ran)."""
        item = self.output[index]
        item["output"], item["error"] = output, error
        item["status"] = status or ("completed" if error is None else "failed")
        outcome = "completed" if error is None else "failed"
        return [self._event(f"response.{item['type']}.{outcome}", item_id=item["id"], output_index=index),
                self._item_done(index)]

    # ---- the end -------------------------------------------------------------------------------

    def conclude(self, status: Literal["completed", "incomplete"], reason: str | None = None) -> list[dict[str, Any]]:
        """Settle the response as completed, or incomplete for `reason` (closing an open text item);
        `terminal()` then gives its last event."""
        events = self.close_text("incomplete" if status == "incomplete" else "completed")
        self.response["status"] = status
        if status == "completed":
            self.response["completed_at"] = int(time.time())
        else:
            self.response["incomplete_details"] = {"reason": reason}
        return events

    def terminal(self) -> dict[str, Any]:
        """response.completed or response.incomplete, carrying the whole response."""
        return self._event(f"response.{self.response['status']}", response=self._snapshot())

    def failed(self, error: APIError) -> list[dict[str, Any]]:
        """An `error` event, then response.failed carrying the error (what the stream could not finish)."""
        self._open = None
        self.response["status"] = "failed"
        code = error.code or error.type
        self.response["error"] = {"code": code, "message": error.message}
        return [self._event("error", code=code, message=error.message, param=error.param),
                self._event("response.failed", response=self._snapshot())]


def sse(event: dict[str, Any]) -> str:
    """One event as OpenAI's Responses stream sends it (no `[DONE]` follows the last)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"
