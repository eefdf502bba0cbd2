"""Readiness and liveness of the head pod's Ray container (the chart's `probes`), run by the kubelet:

    python -S /etc/expertmesh/probe/probe.py ready|live [--serve-port 8000] [--agent-port 52365]
        [--timeout 4]

Exit status 0: healthy; 1: not (the reason on stdout, which `kubectl describe pod` shows).

1. The Ray node: the dashboard agent's /api/healthz answers 200. This is the check KubeRay's own
   probes make (Ray 2.53 and later); the chart's probes replace KubeRay's, so they keep it.
2. The gateway, on the Serve HTTP port: `ready` wants /health (200 only while the engine makes
   progress), `live` wants /livez (the gateway alone). While the application is not deployed (no
   Serve proxy listening: connection refused; or the proxy answers 404) the gateway is not judged:
   KubeRay deploys the application only once the head pod is ready, so a probe that waited for it
   would never let it start. An answer of 5xx or no answer within the timeout fails.

Standard library only, and `-S`: the probe starts in tens of milliseconds.
"""
from __future__ import annotations

import argparse
import http.client
import sys

NOT_DEPLOYED = 404


def status_of(port: int, path: str, timeout: float) -> int | None:
    """The HTTP status of GET path on 127.0.0.1:port; None when nothing listens there."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read(65536)
        return response.status
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


def check(kind: str, serve_port: int, agent_port: int, timeout: float) -> str | None:
    """None when healthy, else why not."""
    try:
        agent = status_of(agent_port, "/api/healthz", timeout)
    except (OSError, http.client.HTTPException) as exc:
        return f"the Ray node's health check (:{agent_port}/api/healthz) failed: {exc!r}"
    if agent != 200:
        return f"the Ray node is not healthy (:{agent_port}/api/healthz answered {agent})"
    path = "/health" if kind == "ready" else "/livez"
    try:
        status = status_of(serve_port, path, timeout)
    except TimeoutError:
        return f"the gateway did not answer {path} within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"the gateway's {path} failed: {exc!r}"
    if status is None or status == NOT_DEPLOYED or 200 <= status < 300:
        return None
    return f"the gateway's {path} answered {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ready", "live"])
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--agent-port", type=int, default=52365)
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per HTTP request")
    args = parser.parse_args(argv)
    problem = check(args.kind, args.serve_port, args.agent_port, args.timeout)
    if problem is not None:
        print(problem, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
