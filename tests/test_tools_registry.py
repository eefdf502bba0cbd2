"""The tool registry (gateway/tools/registry.py) and its start-up checks (ToolRunner.start, `serve`).

The file's shape, hostile values refused with the path of the value, environment variables that
must be set, duplicates; then against real servers: an unreachable server, one listing no tools,
allowed_tools naming a tool the server lacks, one tool name given twice; and `expertmesh serve
--tool-registry` stopping before Ray with exit code 2.
"""
from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
import yaml
from tool_servers import STDIO_SERVER, McpHttpServer, free_port

from expertmesh.gateway.app_config import AppConfig
from expertmesh.gateway.cli import main
from expertmesh.gateway.tools.registry import ToolRegistryError, load_registry, parse_registry
from expertmesh.gateway.tools.runner import ToolRunner, check_tool_registry

EXAMPLE = """
mcp_servers:
  - server_label: calc
    url: "http://127.0.0.1:9001/mcp"
  - server_label: files
    command: python files_server.py --root /data
    env: {LOG_LEVEL: warning}
    env_from: {FILES_TOKEN: EM_FILES_TOKEN}
    allowed_tools: [read]
    timeout_s: 5
    max_concurrency: 2
webhooks:
  - name: get_weather
    url: https://hooks.example.com/weather
    description: Current weather of a city.
    parameters: {type: object, properties: {city: {type: string}}, required: [city]}
    secret_env: EM_WEATHER_SECRET
    headers_env: {Authorization: EM_WEATHER_AUTH}
"""
ENV = {"EM_FILES_TOKEN": "t0ken", "EM_WEATHER_SECRET": "s3cret", "EM_WEATHER_AUTH": "Bearer abc"}


def test_the_issue_shape_loads(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text(EXAMPLE)
    registry = load_registry(path, ENV)
    calc, files = registry.mcp_servers
    assert (calc.server_label, calc.transport, calc.url) == ("calc", "http", "http://127.0.0.1:9001/mcp")
    assert files.transport == "stdio" and files.argv == ["python", "files_server.py", "--root", "/data"]
    assert files.resolved_env(ENV) == {"LOG_LEVEL": "warning", "FILES_TOKEN": "t0ken"}
    (hook,) = registry.webhooks
    assert hook.resolved_secret(ENV) == b"s3cret" and hook.resolved_headers(ENV) == {"Authorization": "Bearer abc"}
    assert parse_registry(None).mcp_servers == [] and parse_registry({}).webhooks == []


@pytest.mark.parametrize(("data", "message"), [
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/mcp", "tiemout_s": 3}]},
     r"mcp_servers\[0\]: unknown key 'tiemout_s' \(did you mean 'timeout_s'\?\)"),
    ({"webhookz": []}, r"unknown key 'webhookz' \(did you mean 'webhooks'\?\)"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/mcp", "timeout_s": -1}]},
     r"mcp_servers\[0\]\.timeout_s: Input should be greater than 0"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/mcp", "timeout_s": 1e9}]},
     r"timeout_s: Input should be less than or equal to 3600"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/mcp", "max_concurrency": 10 ** 9}]},
     r"max_concurrency: Input should be less than or equal to 1024"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/mcp", "max_concurrency": 0}]},
     r"max_concurrency: Input should be greater than or equal to 1"),
    ({"mcp_servers": [{"server_label": "calc", "url": "file:///etc/passwd"}]}, r"url must be an http:// or https://"),
    ({"mcp_servers": [{"server_label": "calc", "url": "gopher://h/"}]}, r"url must be an http:// or https://"),
    ({"webhooks": [{"name": "w", "url": "ftp://h/x"}]}, r"webhooks\[0\]\.url: url must be an http"),
    ({"mcp_servers": [{"server_label": "", "url": "http://h/mcp"}]}, r"server_label: String should match pattern"),
    ({"mcp_servers": [{"server_label": "a b", "url": "http://h/mcp"}]}, r"server_label: String should match"),
    ({"webhooks": [{"name": "", "url": "http://h/"}]}, r"webhooks\[0\]\.name: String should match pattern"),
    ({"mcp_servers": [{"server_label": "calc"}]}, r"give exactly one of url .* and command"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "command": "x"}]}, r"exactly one of url"),
    ({"mcp_servers": [{"server_label": "calc", "command": ""}]}, r"command must name a program"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "args": ["x"]}]}, r"are for a stdio server"),
    ({"mcp_servers": [{"server_label": "calc", "command": "x", "headers": {"A": "b"}}]}, r"are for a url"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "headers": {"Host": "evil"}}]},
     r"the header 'Host' cannot be set"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "headers": {"X-A": "b\r\nX-B: c"}}]},
     r"headers\.X-A: String should match pattern"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "headers_env": {"X-A": "not a var"}}]},
     r"headers_env\.X-A: String should match pattern"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "allowed_tools": []}]},
     r"allowed_tools: List should have at least 1 item"),
    ({"mcp_servers": [{"server_label": "calc", "url": "http://h/", "timeout_s": "30"}]},
     r"timeout_s: Input should be a valid number"),
    ({"mcp_servers": [{"server_label": "a", "url": "http://h/"}, {"server_label": "a", "command": "x"}]},
     r"two mcp_servers have the server_label 'a'"),
    ({"webhooks": [{"name": "w", "url": "http://h/"}, {"name": "w", "url": "http://i/"}]},
     r"two webhooks have the name 'w'"),
    ({"mcp_servers": [{"server_label": "w", "url": "http://h/"}], "webhooks": [{"name": "w", "url": "http://h/"}]},
     r"the webhook 'w' has the name of an mcp_servers server_label"),
    ({"webhooks": [{"name": "w", "url": "http://h/", "parameters": {"type": "array"}}]},
     r"parameters must be a JSON schema of an object"),
    ({"webhooks": [{"name": "w", "url": "http://h/", "parameters": {"type": "object", "properties": 3}}]},
     r"parameters is not a valid JSON schema"),
    ({"mcp_servers": [{"server_label": f"s{i}", "url": "http://h/"} for i in range(300)]},
     r"mcp_servers: List should have at most 256 items"),
    ([{"server_label": "calc"}], r"expected a mapping with mcp_servers and webhooks, got list"),
])
def test_hostile_and_mistaken_values_are_refused_with_their_path(data, message):
    with pytest.raises(ToolRegistryError, match=message):
        parse_registry(data)


def test_an_unset_environment_variable_is_a_clear_error(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text(EXAMPLE)
    for missing in ENV:
        env = {k: v for k, v in ENV.items() if k != missing}
        with pytest.raises(ToolRegistryError, match=f"names the environment variable {missing}, which is unset"):
            load_registry(path, env)
    with pytest.raises(ToolRegistryError, match="EM_WEATHER_SECRET, which is unset"):
        load_registry(path, {**ENV, "EM_WEATHER_SECRET": ""})  # an empty Secret is no secret


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ToolRegistryError, match="cannot be read"):
        load_registry(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("mcp_servers: [\n")
    with pytest.raises(ToolRegistryError, match="not valid YAML"):
        load_registry(bad, {})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_registry(empty, {}).mcp_servers == []
    huge = tmp_path / "huge.yaml"
    huge.write_text("#" * (2 << 20))
    with pytest.raises(ToolRegistryError, match="larger than"):
        load_registry(huge, {})


def _start(registry: dict, **kwargs) -> ToolRunner:
    async def run():
        runner = ToolRunner(parse_registry(registry), **kwargs)
        try:
            await runner.start()
        finally:
            await runner.close()
        return runner

    return asyncio.run(run())


def test_start_up_refuses_an_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    with pytest.raises(ToolRegistryError, match=rf"mcp server 'calc' \({url}\) cannot be reached: cannot connect"):
        _start({"mcp_servers": [{"server_label": "calc", "url": url, "timeout_s": 5}]})
    with pytest.raises(ToolRegistryError, match=r"mcp server 'gone' \(/nonexistent/server-binary\) cannot be reached"):
        _start({"mcp_servers": [{"server_label": "gone", "command": "/nonexistent/server-binary"}]})


def test_start_up_refuses_a_server_that_is_no_mcp_server_or_too_slow():
    with McpHttpServer() as server, pytest.raises(ToolRegistryError, match=r"mcp server 'html' .* cannot be "
                                                                         r"reached: MCP error"):
        _start({"mcp_servers": [{"server_label": "html", "url": server.url(path="/html"), "timeout_s": 5}]})
    silent = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # never answers the handshake
    with pytest.raises(ToolRegistryError, match=r"mcp server 'mute' .* cannot be reached: .*within 1 s"):
        _start({"mcp_servers": [{"server_label": "mute", "command": silent, "timeout_s": 1}]})


def test_start_up_refuses_a_server_that_lists_no_tools():
    with McpHttpServer(with_tools=False) as server, \
            pytest.raises(ToolRegistryError, match=r"mcp server 'empty' \(.*\) lists no tools"):
        _start({"mcp_servers": [{"server_label": "empty", "url": server.url()}]})


def test_start_up_refuses_allowed_tools_the_server_lacks():
    with McpHttpServer() as server, pytest.raises(ToolRegistryError, match=r"allowed_tools names 'nope', which "
                                                                         r"the MCP server 'calc' does not list "
                                                                         r"\(it lists add, big, echo"):
        _start({"mcp_servers": [{"server_label": "calc", "url": server.url(), "allowed_tools": ["add", "nope"]}]})


def test_tool_names_must_be_unique_across_servers_and_webhooks(tmp_path):
    with McpHttpServer() as server:
        both = {"mcp_servers": [{"server_label": "one", "url": server.url()},
                                {"server_label": "two", "url": server.url()}]}
        with pytest.raises(ToolRegistryError, match=r"the tool name 'add' is given by both mcp server 'one' and mcp "
                                                    r"server 'two'"):
            _start(both)
        stdio = [sys.executable, str(STDIO_SERVER)]
        hook = {"mcp_servers": [{"server_label": "io", "command": stdio, "env": {"STDIO_TOOL_LOG": "/dev/null"},
                                 "allowed_tools": ["pid"]}],
                "webhooks": [{"name": "pid", "url": "http://127.0.0.1:9/"}]}
        with pytest.raises(ToolRegistryError, match=r"the tool name 'pid' is given by both mcp server 'io' and "
                                                    r"webhook 'pid'"):
            _start(hook)
        # allowed_tools is the way out
        _start({"mcp_servers": [{"server_label": "one", "url": server.url(), "allowed_tools": ["add"]},
                                {"server_label": "two", "url": server.url(), "allowed_tools": ["echo"]}]})


def test_several_failures_are_named_together():
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    with McpHttpServer(with_tools=False) as empty, pytest.raises(ToolRegistryError) as exc:
        _start({"mcp_servers": [{"server_label": "dead", "url": dead, "timeout_s": 5},
                                {"server_label": "empty", "url": empty.url()}]})
    assert "'dead'" in str(exc.value) and "'empty'" in str(exc.value) and "lists no tools" in str(exc.value)


def test_serve_checks_the_registry_before_ray_starts(tmp_path, capsys, monkeypatch):
    """`expertmesh serve --tool-registry FILE` stops with exit code 2 and the reason when a server cannot
    be reached (ray.init is never called), and check_tool_registry lists the tools of a good one."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the tool registry was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    path = tmp_path / "tools.yaml"
    path.write_text(f"mcp_servers:\n  - server_label: calc\n    url: http://127.0.0.1:{free_port()}/mcp\n")
    assert main(["serve", "--tool-registry", str(path), "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "expertmesh: error: mcp server 'calc'" in err and "cannot be reached" in err
    path.write_text("mcp_servers:\n  - server_label: calc\n    url: http://h/mcp\n    timeout: 3\n")
    assert main(["serve", "--tool-registry", str(path), "--grpc-port", "0"]) == 2
    assert "unknown key 'timeout' (did you mean 'timeout_s'?)" in capsys.readouterr().err
    with McpHttpServer() as server:
        path.write_text(f"mcp_servers:\n  - server_label: calc\n    url: {server.url()}\n"
                        "    allowed_tools: [add, echo]\n")
        assert check_tool_registry(AppConfig(tool_registry=str(path))) == ["add", "echo"]


def test_the_readme_registry_example_is_a_valid_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Server-side tools", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    registry = parse_registry(yaml.safe_load(example))
    registry.check_env({"CALC_AUTH": "x", "FILES_TOKEN": "y", "WEATHER_HOOK_SECRET": "z"})
    assert [s.server_label for s in registry.mcp_servers] == ["calc", "files"]
    assert [w.name for w in registry.webhooks] == ["get_weather"]
