"""The types the Responses API's tool loop (`gateway/responses.py`) shares with the tool runner.

These are the shapes fixed by issue 15's contract: the runner (`gateway/tools/runner.py`) lists the
tools of a server as `ServerTool`s, runs one call and answers with a `ToolResult`, and refuses a
request's tool spec with `ToolRequestError` (a 400 naming the request field).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from expertmesh.gateway.protocol import APIError

if TYPE_CHECKING:
    from expertmesh.gateway.tools.runner import _RequestServer


@dataclass(frozen=True)
class ServerTool:
    """A tool the server calls for the model: one tool of an MCP server, or an operator's webhook."""
    kind: Literal["mcp", "webhook"]
    server: str
    """The MCP server's server_label, or the webhook's name."""
    name: str
    """The tool name the model sees and calls."""
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments (an object schema)."""
    remote: _RequestServer | None = field(default=None, compare=False, repr=False)
    """The request-supplied server this tool comes from (None: a registered server or webhook)."""


@dataclass(frozen=True)
class ToolResult:
    """What one call gave: exactly one of `output` (the text the model sees, already truncated to
    tool_output_max_tokens) and `error` (a short message the model and the client see)."""
    output: str | None
    error: str | None
    duration_s: float


class ToolRequestError(APIError):
    """A request's tool spec the server refuses (unknown server_label or webhook, allowed_tools naming
    tools the server lacks, a request URL not allowed): a 400 whose `param` names the request field
    (e.g. "tools[1].server_url")."""

    def __init__(self, message: str, *, param: str = "tools") -> None:
        super().__init__(message, status=400, param=param)
