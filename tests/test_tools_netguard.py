"""Request-supplied MCP URLs (gateway/tools/netguard.py through ToolRunner): only http(s) to public
addresses, checked after DNS resolution and for every request the client sends (redirects, the
SDK's later requests), the connection pinned to the vetted address.

The MCP test server listens on 127.0.0.1 and 127.0.0.2 at once. A test resolver names it
("public.test" -> 127.0.0.1) and a test predicate treats 127.0.0.1 alone as public, so 127.0.0.2
stands for a private address that a real server would answer at: the recorder shows whether
anything reached it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx2
import pytest
from tool_servers import McpHttpServer, run_runner

from expertmesh.gateway.metrics import Metrics
from expertmesh.gateway.tools.netguard import GuardedTransport, NetGuard, NetguardRefused, is_public_address
from expertmesh.gateway.tools.runner import ToolRequestError, ToolRunner

PRIVATE = ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
           "224.0.0.1", "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1", "::1", "::", "fc00::1",
           "fd12:3456::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
           "2002:7f00:1::1", "2002:a00:1::1", "64:ff9b::a00:1", "2001:db8::1", "::127.0.0.1", "fec0::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888", "2606:4700:4700::1111",
          "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_special_addresses_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are(address):
    assert is_public_address(ipaddress.ip_address(address))


def _loopback_pair_or_skip() -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 cannot be bound here (not Linux)")


@pytest.fixture(scope="module")
def server():
    _loopback_pair_or_skip()
    with McpHttpServer(hosts=("127.0.0.1", "127.0.0.2")) as s:
        yield s


class Names:
    """A resolver the test controls: name -> list of answers, one used per lookup (the last repeats), as a
    DNS-rebinding attacker's server answers."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = {k: list(v) for k, v in table.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        answers = self.table.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers.pop(0) if len(answers) > 1 else answers[0]


def guard(names: Names) -> NetGuard:
    return NetGuard(resolver=names, is_public=lambda ip: str(ip) == "127.0.0.1" or is_public_address(ip))


def run(body, *, allow: bool = True, names: Names | None = None, registry: dict | None = None):
    names = names or Names({"public.test": [["127.0.0.1"]], "private.test": [["10.1.2.3"]],
                            "mixed.test": [["127.0.0.1", "127.0.0.2"]]})
    return run_runner(registry or {}, body, allow_request_urls=allow, netguard=guard(names), timeout_s=5)


def test_request_urls_are_refused_unless_the_operator_allows_them(server):
    async def body(runner: ToolRunner, metrics: Metrics):
        with pytest.raises(ToolRequestError, match="request-supplied server_url is off") as exc:
            await runner.mcp_tools("mine", server_url=server.url("public.test"), param="tools[0]")
        assert exc.value.status == 400 and exc.value.param == "tools[0].server_url"

    run(body, allow=False)


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.2:{port}/mcp", "127.0.0.2 is not a public address"),
    ("http://10.0.0.1/mcp", "10.0.0.1 is not a public address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address"),
    ("http://[::1]:{port}/mcp", ":1 is not a public address"),
    ("http://0.0.0.0:{port}/mcp", "0.0.0.0 is not a public address"),
    ("http://[::ffff:127.0.0.2]:{port}/mcp", "is not a public address"),
    ("http://private.test/mcp", r"private.test \(10.1.2.3\) is not a public address"),
    ("http://mixed.test:{port}/mcp", r"mixed.test \(127.0.0.2\) is not a public address"),  # every address counts
    ("http://nowhere.test/mcp", "nowhere.test does not resolve"),
    ("file:///etc/passwd", "only http and https URLs are allowed, not file"),
    ("ftp://public.test/mcp", "only http and https URLs are allowed, not ftp"),
    ("http:///mcp", "no host"),
])
def test_private_and_odd_urls_are_refused_before_any_request(server, url, message):
    url = url.format(port=server.port)
    before = len(server.recorder.hosts)

    async def body(runner: ToolRunner, metrics: Metrics):
        with pytest.raises(ToolRequestError, match=f"server_url refused: .*{message}") as exc:
            await runner.mcp_tools("mine", server_url=url, param="tools[1]")
        assert exc.value.param == "tools[1].server_url"

    run(body)
    assert len(server.recorder.hosts) == before  # nothing reached the server


def test_a_public_server_is_listed_and_called_pinned_to_its_vetted_address(server):
    async def body(runner: ToolRunner, metrics: Metrics):
        async with runner.request_scope() as scope:
            tools = await scope.mcp_tools("mine", server_url=server.url("public.test"), allowed_tools=["add"],
                                          headers={"Authorization": "Bearer user-token"})
            (add,) = tools
            assert (add.kind, add.server, add.name) == ("mcp", "mine", "add")
            result = await scope.call(add, '{"a": 20, "b": 22}')
            assert result.output == "42"
            assert server.recorder.calls[-1] == ("add", {"a": 20, "b": 22})
        after = await runner.call(add, '{"a": 1, "b": 1}')  # its request has ended
        assert after.output is None and "has ended" in after.error
        assert metrics.registry.get_sample_value("expertmesh_tool_calls_total",
                                                 {"server": "request", "outcome": "ok"}) == 1
        # without a scope: a pool per listing and per call
        (echo,) = await runner.mcp_tools("mine", server_url=server.url("public.test"), allowed_tools=["echo"])
        assert (await runner.call(echo, '{"text": "hi"}')).output == "hi"

    before = len(server.recorder.hosts)
    run(body)
    assert set(server.recorder.hosts[before:]) == {f"public.test:{server.port}"}  # Host kept as the name
    assert set(server.recorder.reached[before:]) == {"127.0.0.1"}


def test_a_public_name_redirecting_to_a_private_address_is_refused(server):
    before = len(server.recorder.reached)
    target = server.url("127.0.0.2")

    async def body(runner: ToolRunner, metrics: Metrics):
        with pytest.raises(ToolRequestError, match="the MCP server at server_url cannot be used"):
            await runner.mcp_tools("mine", server_url=server.url("public.test", f"/redirect?to={target}"))

    run(body)
    # a client that follows every redirect (httpx2's follow_redirects) is stopped by the transport itself
    names = Names({"public.test": [["127.0.0.1"]]})

    async def follow():
        async with httpx2.AsyncClient(transport=GuardedTransport(guard(names)), follow_redirects=True,
                                      trust_env=False) as http:
            with pytest.raises(NetguardRefused, match=r"127\.0\.0\.2 is not a public address"):
                await http.get(server.url("public.test", f"/redirect?to={target}"))
            private_name = f"http://private.test:{server.port}/mcp"
            names.table["private.test"] = [["127.0.0.2"]]
            with pytest.raises(NetguardRefused, match=r"private.test \(127.0.0.2\) is not a public address"):
                await http.get(server.url("public.test", f"/redirect?to={private_name}"))
            same_origin = await http.get(server.url("public.test", "/redirect?to=/html"))  # followed, vetted again
            assert same_origin.status_code == 200 and b"not an MCP server" in same_origin.content

    asyncio.run(follow())
    assert "127.0.0.2" not in server.recorder.reached[before:]  # the private address saw nothing


def test_dns_rebinding_cannot_move_a_vetted_server_to_a_private_address(server):
    before = len(server.recorder.reached)
    # first lookup public, every later one private: the SDK's second request must be refused
    names = Names({"rebind.test": [["127.0.0.1"], ["127.0.0.1"], ["127.0.0.2"]]})

    async def body(runner: ToolRunner, metrics: Metrics):
        with pytest.raises(ToolRequestError, match=r"request refused: rebind.test \(127.0.0.2\) is not a public"):
            await runner.mcp_tools("mine", server_url=server.url("rebind.test"))

    run(body, names=names)
    assert len(names.lookups) >= 3 and "127.0.0.2" not in server.recorder.reached[before:]
    # listed while public, then rebound before the call: the call is refused (outcome "refused")
    names = Names({"rebind.test": [["127.0.0.1"]]})

    async def call_after_rebinding(runner: ToolRunner, metrics: Metrics):
        async with runner.request_scope() as scope:
            (add,) = await scope.mcp_tools("mine", server_url=server.url("rebind.test"), allowed_tools=["add"])
            names.table["rebind.test"] = [["127.0.0.2"]]
            result = await scope.call(add, '{"a": 1, "b": 2}')
        assert result.output is None and result.error.startswith("request refused: rebind.test (127.0.0.2)")
        assert metrics.registry.get_sample_value("expertmesh_tool_calls_total",
                                                 {"server": "request", "outcome": "refused"}) == 1

    run(call_after_rebinding, names=names)
    assert "127.0.0.2" not in server.recorder.reached[before:]


def test_request_labels_and_headers_are_checked(server):
    registry = {"mcp_servers": [{"server_label": "calc", "url": server.url(), "allowed_tools": ["add"]}]}

    async def body(runner: ToolRunner, metrics: Metrics):
        url = server.url("public.test")
        with pytest.raises(ToolRequestError, match="'calc' is a registered MCP server") as exc:
            await runner.mcp_tools("calc", server_url=url)
        assert exc.value.param == "tools.server_label"
        with pytest.raises(ToolRequestError, match="server_label must be"):
            await runner.mcp_tools("no spaces", server_url=url)
        for headers, message in (({"Host": "internal.svc"}, "cannot be set"), ({"X-A": "b\r\nX-B: c"}, "invalid"),
                                 ({"Mcp-Session-Id": "x"}, "cannot be set"),
                                 ({f"X-{i}": "v" for i in range(40)}, "at most 32 headers")):
            with pytest.raises(ToolRequestError, match=message) as exc:
                await runner.mcp_tools("mine", server_url=url, headers=headers)
            assert exc.value.param == "tools.headers"
        with pytest.raises(ToolRequestError, match="allowed_tools names 'nope'") as exc:
            await runner.mcp_tools("mine", server_url=url, allowed_tools=["nope"])
        assert exc.value.param == "tools.allowed_tools"

    run(body, registry=registry)


def test_pinning_keeps_the_name_for_host_and_tls():
    async def pin(url: str) -> httpx2.Request:
        names = Names({"api.example.com": [["93.184.216.34"]]})
        request = httpx2.Request("POST", url, content=b"{}")
        return await NetGuard(resolver=names).pin(request)

    tls = asyncio.run(pin("https://api.example.com/mcp?x=1"))
    assert str(tls.url) == "https://93.184.216.34/mcp?x=1"
    assert tls.headers["host"] == "api.example.com" and tls.extensions["sni_hostname"] == "api.example.com"
    plain = asyncio.run(pin("http://api.example.com:8080/mcp"))
    assert str(plain.url) == "http://93.184.216.34:8080/mcp" and plain.headers["host"] == "api.example.com:8080"
    assert "sni_hostname" not in plain.extensions
