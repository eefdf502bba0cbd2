"""An MCP server over stdio for tests/test_tools_mcp.py: `python mcp_stdio_server.py`.

Each call of `add` appends its arguments as a JSON line to the file named by $STDIO_TOOL_LOG;
`pid` names the process (spawned once, or again after `crash`); `secret` shows the environment
variable the registry's env_from passed; `big` returns `size` characters.
"""
import json
import os
from typing import Literal

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("stdio-tools", log_level="WARNING")


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    with open(os.environ["STDIO_TOOL_LOG"], "a") as f:
        f.write(json.dumps({"a": a, "b": b}) + "\n")
    return a + b


@mcp.tool()
def shout(word: Literal["hello", "world"]) -> str:
    """Shout a word (a bounded argument); logged like `add`."""
    with open(os.environ["STDIO_TOOL_LOG"], "a") as f:
        f.write(json.dumps({"word": word}) + "\n")
    return word.upper() + "!"


@mcp.tool()
def pid() -> str:
    """This server process's id."""
    return str(os.getpid())


@mcp.tool()
def secret() -> str:
    """The value of $TOOL_SECRET."""
    return os.environ.get("TOOL_SECRET", "")


@mcp.tool()
def big(size: int) -> str:
    """A string of `size` characters."""
    return "z" * size


@mcp.tool()
def crash() -> str:
    """The process exits mid-call."""
    os._exit(3)


if __name__ == "__main__":
    mcp.run("stdio")
