"""Start or join Ray. The one place the NCCL environment of every actor is decided; and whether what
a group asks for can be placed on the cluster, checked against its nodes before anyone waits."""
from __future__ import annotations

import logging
import time

from expertmesh.cluster.placement import unplaceable

log = logging.getLogger(__name__)

NCCL_ENV = {
    # NVLink SHARP / multicast off: it hangs or fails on the machines this runs on (KINDS.md).
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def ensure_ray(address: str | None = None) -> None:
    """Use the running Ray instance, or join `address` ("auto", "ray://..."), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(NCCL_ENV)}
    if address is None:
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)


def node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node of the running Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def placement_error(what: str, bundles: list[dict[str, float]], reason: str) -> ValueError:
    """The error of a group that cannot be placed: what it asks for, what the cluster has and has free."""
    import ray

    asked: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            asked[resource] = asked.get(resource, 0) + amount
    total, free = ray.cluster_resources(), ray.available_resources()
    def show(resources):
        return ", ".join(f"{r} {resources.get(r, 0):g}" for r in sorted(asked))
    return ValueError(f"{what} cannot be placed: {reason}. It asks for {show(asked)} in {len(bundles)} bundles "
                      f"{bundles}; the Ray cluster has {show(total)} ({show(free)} available now). Lower "
                      "--cpus-per-rank or --ep-size, or give the cluster more resources.")


def check_placeable(what: str, bundles: list[dict[str, float]]) -> None:
    """ValueError at once when `bundles` can never be placed on the running cluster's nodes."""
    reason = unplaceable(bundles, node_resources())
    if reason:
        raise placement_error(what, bundles, reason)


def wait_for_placement(placement_group, what: str, bundles: list[dict[str, float]], timeout_s: float) -> None:
    """Wait until `placement_group` is placed. Resources the cluster does not have fail at once (and
    again if a node leaves meanwhile); resources it has but others hold are waited for, with a log line
    every few seconds, up to `timeout_s`."""
    import ray

    check_placeable(what, bundles)
    ready = placement_group.ready()
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = ray.wait([ready], timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        if done:
            return
        check_placeable(what, bundles)
        if time.monotonic() >= deadline:
            raise placement_error(what, bundles, f"others hold the resources it needs ({timeout_s:g} s waited)")
        log.warning("%s waits for its resources %s; available now: %s", what, bundles, ray.available_resources())
