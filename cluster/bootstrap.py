"""Start or join Ray. The one place the NCCL environment of every actor is decided."""
from __future__ import annotations

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
