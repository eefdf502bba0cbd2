"""The Serve application of a test, started in this process (so that tests can kill its replicas):
`running_app(args)` starts Ray with `num_cpus` logical CPUs and the environment its proxy needs,
deploys the expertmesh app on a free port (`ray_init`: more ray.init arguments), waits for /health,
and yields the base URL; it shuts Serve and Ray down and restores the environment after. (Not a
test module: pytest collects none.)"""
from __future__ import annotations

import contextlib
import os
import time

import httpx

APP = "expertmesh"


@contextlib.contextmanager
def running_app(args: dict, *, num_cpus: int = 2, env: dict[str, str] | None = None, port: int | None = None,
                ray_init: dict | None = None):
    import ray
    from ray import serve

    from expertmesh.cluster.collective import free_port
    from expertmesh.gateway.cli import http_options
    from expertmesh.gateway.serve_app import build_app

    port = port or free_port()
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the proxy, started by the Ray this process starts, inherits them
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **(ray_init or {}))
    try:
        serve.start(http_options=http_options(args, "127.0.0.1", port))
        serve.run(build_app(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, 120, "the app is healthy")
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for(check, timeout: float, what: str, period: float = 0.25):
    """check()'s first truthy result within `timeout` s (HTTP and socket errors count as not yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if result := check():
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")
