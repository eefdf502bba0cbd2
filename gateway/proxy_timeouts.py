"""Connection timeouts of Ray Serve's HTTP proxy, including the one Serve does not expose.

Serve's proxy is uvicorn. What Serve exposes, `expertmesh serve` sets through `HTTPOptions`:
`keep_alive_timeout_s` (an idle connection after a response is closed) and `request_timeout_s`
(end to end, from the complete headers). What it does not: uvicorn has no header timeout at all.
Its keep-alive timer starts only after a response, so a socket that connects and sends nothing,
or sends half a request line and stalls (slowloris), is held forever; enough of them exhaust the
proxy's file descriptors.

Serve does expose one hook into the proxy process: the callback of `gateway/proxy_callback.py`,
which calls `install_header_timeout`: it makes uvicorn's "auto" protocol a subclass with a header
timer, read from `EXPERTMESH_HTTP_HEADER_TIMEOUT_S`:

    connection made, or the first byte of a new request ──▶ timer armed (header_timeout_s)
    request headers complete (a request cycle starts)  ──▶ timer disarmed
    timer fires with no new request started            ──▶ the socket is closed

`proxy_callback.proxy_env(header_timeout_s)` gives the variables; they must be in the environment
of the Ray nodes that run proxies (`expertmesh serve` sets them before it starts Ray; on a cluster
started otherwise, set them on every node, e.g. in the Helm chart's container env).
"""
from __future__ import annotations

import asyncio
import logging
import os

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)

PROTOCOL_PATH = "expertmesh.gateway.proxy_timeouts:HeaderTimeoutProtocol"


class _HeaderTimeout:
    """Mixin over a uvicorn HTTP/1.1 protocol (httptools or h11): see the module docstring.
    Both protocols set `self.cycle` to a new request cycle once a request's headers are parsed."""

    header_timeout_s: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None
    _header_cycle: object = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the first byte of a new request on a kept-alive connection
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._header_cycle:
            self._disarm_header_timer()  # its headers are complete

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is self._header_cycle and not self.transport.is_closing():
            self.transport.close()


class HeaderTimeoutProtocol(_HeaderTimeout, AutoHTTPProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools where installed, else h11) with the header timeout."""


def install_header_timeout() -> None:
    """uvicorn's "auto" HTTP protocol gets the header timeout (in the proxy process, before its
    HTTP server starts; called by `proxy_callback.install`)."""
    from uvicorn import config

    from expertmesh.gateway.proxy_callback import HEADER_TIMEOUT_ENV

    timeout = float(os.environ.get(HEADER_TIMEOUT_ENV) or _HeaderTimeout.header_timeout_s)
    _HeaderTimeout.header_timeout_s = timeout
    config.HTTP_PROTOCOLS["auto"] = PROTOCOL_PATH
    log.info("expertmesh: HTTP header timeout %g s on this proxy", timeout)
