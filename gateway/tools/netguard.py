"""Outbound requests to URLs a request supplied: only http(s), only to public addresses.

A client that may name its own MCP server (`allow_request_mcp_urls`) must not be able to make the
gateway reach what only the gateway can reach: loopback, the pod network, the cloud metadata
service (169.254.169.254), the node's link-local neighbours. So every HTTP request sent for such a
server passes `GuardedTransport`, an httpx2 transport (the `mcp` SDK's HTTP client), which:

1. refuses any scheme but http and https;
2. resolves the host with getaddrinfo, off the event loop (the resolver is injectable);
3. refuses the request unless every address the name resolves to is public (`is_public_address`:
   no loopback, private, link-local, multicast, reserved, unspecified or carrier-grade NAT address,
   in IPv4 or IPv6, nor one of those inside an IPv4-mapped, 6to4 or NAT64 IPv6 address);
4. sends the request to the vetted address itself (the URL rewritten to the IP, the Host header and
   the TLS server name kept as the name, through httpcore's `sni_hostname`), so a second DNS answer
   (DNS rebinding) never decides where the connection goes.

Because the check lives in the transport, it runs for every request the client sends: the SDK's
own requests after the first, and every redirect it follows (it follows only same-origin ones;
httpx2's `follow_redirects`, were anyone to turn it on, would pass here too). A refusal raises
`NetguardRefused`, an httpx2 transport error. Proxies from the environment are not used by the
clients built here (`trust_env=False`): a proxy would make the connection, not the vetted address.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable

import httpx2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses the host resolves to, as strings."""
PublicPredicate = Callable[[IPAddress], bool]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context (the system's CA certificates, as httpx2 loads them) for every connection pool
    of the tools: loading it takes ~20 ms of CPU, too much to spend on the event loop per call."""
    return httpx2.create_ssl_context()


def connection_pool() -> httpx2.AsyncHTTPTransport:
    """A connection pool for tool calls: no proxy from the environment (it, not the vetted address,
    would make the connection), the shared TLS context."""
    return httpx2.AsyncHTTPTransport(trust_env=False, verify=tls_context())


class NetguardRefused(httpx2.TransportError):
    """A URL, or the address it resolves to, that request-supplied servers may not reach."""


def is_public_address(ip: IPAddress | str) -> bool:
    """Whether `ip` is a public unicast address that a request-supplied URL may reach."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if ip.is_site_local or ip.scope_id:
            return False
    elif ip in _CGNAT:
        return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system's getaddrinfo, run in the event loop's executor."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str | httpx2.URL) -> httpx2.URL:
    """`url` parsed, if it is http(s) with a host; NetguardRefused otherwise."""
    try:
        parsed = httpx2.URL(url) if isinstance(url, str) else url
    except httpx2.InvalidURL as exc:
        raise NetguardRefused(f"not a valid URL ({exc})") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise NetguardRefused(f"only http and https URLs are allowed, not {parsed.scheme or 'no scheme'}")
    if not parsed.host:
        raise NetguardRefused("the URL has no host")
    return parsed


class NetGuard:
    """The policy: which resolver, and which addresses count as public. Both are injectable, so a
    test can make a name resolve to its local server and treat that one address as public."""

    def __init__(self, resolver: Resolver | None = None, is_public: PublicPredicate | None = None) -> None:
        self.resolver = resolver or system_resolver
        self.is_public = is_public or is_public_address

    async def vet(self, url: str | httpx2.URL) -> str:
        """The address to connect to for `url`: NetguardRefused unless the scheme is http(s) and every
        address the host resolves to is public."""
        parsed = check_url(url)
        host = parsed.host
        try:
            addresses = await self.resolver(host, parsed.port or _DEFAULT_PORTS[parsed.scheme])
        except (OSError, UnicodeError) as exc:
            raise NetguardRefused(f"{host} does not resolve ({exc})") from None
        if not addresses:
            raise NetguardRefused(f"{host} does not resolve")
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                raise NetguardRefused(f"{host} resolves to {address!r}, not an IP address") from None
            if not self.is_public(ip):
                what = host if host == str(ip) else f"{host} ({ip})"
                raise NetguardRefused(f"{what} is not a public address")
        return addresses[0].split("%", 1)[0]

    async def pin(self, request: httpx2.Request) -> httpx2.Request:
        """`request` sent to its vetted address: the URL's host replaced by the IP, the Host header
        kept, and for https the TLS server name (SNI and certificate check) kept as the name."""
        ip = await self.vet(request.url)
        host = request.url.host
        extensions = dict(request.extensions)
        if request.url.scheme == "https" and host != ip:
            extensions["sni_hostname"] = host
        return httpx2.Request(request.method, request.url.copy_with(host=ip), headers=request.headers,
                              stream=request.stream, extensions=extensions)


class GuardedTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that sends each request only to a vetted public address (`NetGuard.pin`);
    it owns `inner` (default: a fresh connection pool without proxies from the environment)."""

    def __init__(self, guard: NetGuard, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.guard = guard
        self.inner = inner or connection_pool()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await self.inner.handle_async_request(await self.guard.pin(request))

    async def aclose(self) -> None:
        await self.inner.aclose()
