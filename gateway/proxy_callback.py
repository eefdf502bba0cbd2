"""The one callback Ray Serve's HTTP proxy takes, and the environment that names it.

Serve reads `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` when a proxy starts and calls the function
it names (meant to return ASGI middlewares). There is one such variable, and expertmesh needs two
things of the proxy, so `install` does both:

  1. the HTTP header timeout Serve does not expose (`proxy_timeouts.install_header_timeout`,
     from `EXPERTMESH_HTTP_HEADER_TIMEOUT_S`): slow-header sockets are closed;
  2. OpenAI's error object for the answers the proxy gives by itself (`proxy_errors.middlewares`).

`proxy_env(header_timeout_s)` is the environment a proxy needs: `expertmesh serve` sets it before
it starts Ray; on a cluster started otherwise (the Helm chart) every Ray node's environment
carries it.
"""
from __future__ import annotations

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "expertmesh.gateway.proxy_callback:install"
HEADER_TIMEOUT_ENV = "EXPERTMESH_HTTP_HEADER_TIMEOUT_S"


def proxy_env(header_timeout_s: float) -> dict[str, str]:
    """The environment a Serve proxy needs for both (see the module docstring)."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, HEADER_TIMEOUT_ENV: f"{header_timeout_s:g}"}


def install() -> list:
    """Serve's proxy callback: runs in the proxy process before its HTTP server starts."""
    from expertmesh.gateway import proxy_errors, proxy_timeouts

    proxy_timeouts.install_header_timeout()
    return proxy_errors.middlewares()
