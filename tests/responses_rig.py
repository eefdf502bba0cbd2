"""What the Responses API's tests share: a fake tool runner (the contract's interface, no network), the
HTTP app served by uvicorn on a free port in a thread (so the official `openai` client talks to a
real socket, and a client that hangs up is a real disconnect), and a serving layer over a scripted
engine (replies chosen per prompt: a random-weight model never writes a <tool_call> unless forced).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

from expertmesh.cluster.collective import free_port
from expertmesh.gateway.tools.types import ServerTool, ToolRequestError, ToolResult

# Schemas of bounded values: forced by the grammar, the tiny random model writes one short call and
# stops (an unbounded integer or string lets it write digits or characters until max_output_tokens).
ADD = ServerTool("mcp", "calc", "add", "Add two small integers.", {
    "type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [1, 2, 3]}}, "required": ["a", "b"]})
ECHO = ServerTool("mcp", "calc", "echo", "Echo a word.", {
    "type": "object", "properties": {"word": {"enum": ["hello", "world"]}}, "required": ["word"]})
WEATHER = ServerTool("webhook", "get_weather", "get_weather", "The weather in a city.", {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]})
LOOKUP = {"type": "function", "name": "lookup", "description": "Look a word up (the client runs it).",
          "parameters": {"type": "object", "properties": {"word": {"enum": ["moe", "ray"]}}, "required": ["word"]}}
ANSWER = {"type": "json_schema", "name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
    "additionalProperties": False}}
"""text.format of a final message the tiny model finishes in a few tokens."""


class FakeRunner:
    """The tool runner's interface (issue 15's contract) over in-memory tools: `calls` records
    (tool name, arguments) in order; `behaviour[name](arguments)` answers a call (an awaitable or a
    ToolResult); by default a call's output is "<name> ok: <arguments>"."""

    def __init__(self, servers: dict[str, list[ServerTool]] | None = None,
                 webhooks: list[ServerTool] | None = None) -> None:
        self._servers = servers if servers is not None else {"calc": [ADD, ECHO]}
        self._webhooks = {t.name: t for t in (webhooks if webhooks is not None else [WEATHER])}
        self.calls: list[tuple[str, str]] = []
        self.behaviour: dict[str, Callable] = {}
        self.running = 0
        self.cancelled = 0

    @property
    def servers(self) -> list[str]:
        return list(self._servers)

    async def mcp_tools(self, server_label, *, server_url=None, headers=None, allowed_tools=None, param="tools"):
        if server_url is not None:
            raise ToolRequestError("request-supplied MCP servers are not allowed", param=param)
        if server_label not in self._servers:
            raise ToolRequestError(f"no MCP server {server_label!r} is registered", param=param)
        tools = self._servers[server_label]
        if allowed_tools is not None:
            missing = sorted(set(allowed_tools) - {t.name for t in tools})
            if missing:
                raise ToolRequestError(f"{server_label} has no tool {missing[0]!r}", param=param)
            tools = [t for t in tools if t.name in allowed_tools]
        return list(tools)

    def webhook_tools(self, names=None, *, param="tools"):
        if names is None:
            return list(self._webhooks.values())
        for name in names:
            if name not in self._webhooks:
                raise ToolRequestError(f"no webhook {name!r} is registered", param=param)
        return [self._webhooks[n] for n in names]

    async def call(self, tool: ServerTool, arguments: str, *, call_id: str | None = None) -> ToolResult:
        self.calls.append((tool.name, arguments))
        self.running += 1
        try:
            answer = self.behaviour.get(tool.name)
            if answer is None:
                return ToolResult(f"{tool.name} ok: {arguments}", None, 0.0)
            result = answer(arguments)
            return await result if asyncio.iscoroutine(result) else result
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


@contextlib.contextmanager
def http_server(app) -> Iterator[str]:
    """`app` served by uvicorn on 127.0.0.1 and a free port (its own thread and event loop); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="responses-test-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Script:
    """The engine's reply to a prompt: `reply(prompt)`; every prompt is kept in `prompts`."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.reply = lambda prompt: "Hello."

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.reply(prompt)


@contextlib.contextmanager
def scripted_serving(model_path, script: Callable[[str], str], max_model_len: int = 2048):
    """OpenAIServing over a scripted engine: each request's reply is `script(prompt text)` then EOS.
    Yields a namespace of serving, engine, tokenizer and the script."""
    from expertmesh.engine.async_engine import AsyncEngine
    from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig
    from expertmesh.engine.core import EngineCore
    from expertmesh.engine.scripted import ScriptedExecutor
    from expertmesh.gateway.serving import LocalEngineClient, OpenAIServing, ServingSettings
    from expertmesh.model.config import ModelConfig
    from expertmesh.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_path)
    config = EngineConfig(load=ModelLoadConfig(str(model_path), device="cpu", max_model_len=max_model_len),
                          cache=CacheConfig(block_size=16, num_blocks=512))
    eos = tokenizer.token_to_id("<|im_end|>")
    executor = ScriptedExecutor(ModelConfig.from_pretrained(model_path), 512,
                                lambda ids: tokenizer.encode(script(tokenizer.decode(ids, skip_special_tokens=False))),
                                fallback_token=eos)
    engine = AsyncEngine(EngineCore(config, executor, tokenizer))
    serving = OpenAIServing(LocalEngineClient(engine), tokenizer, ServingSettings("tiny", max_model_len))
    try:
        yield SimpleNamespace(serving=serving, engine=engine, tokenizer=tokenizer, script=script)
    finally:
        engine.shutdown()


def tool_call(name: str, arguments: str) -> str:
    """A Qwen3 tool-call block, as the model writes one."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def wait_idle(engine, timeout_s: float = 15.0) -> dict:
    """The engine's counters once nothing runs, waits or holds a KV block (or the last seen after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)
