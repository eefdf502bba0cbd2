"""Pieces the expert kernels share (experts/triton_moe.py, experts/triton_persistent.py): the
SiLU-and-mul epilogue, the grouped tile order, and a launch that fits its pipeline to the device.
Imports Triton: only the fast path loads it."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources


@triton.jit
def silu_mul(gate, up):
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (m-block, n-block), GROUP_M m-blocks side by side so their weight tiles
    (often the same expert's) are still in L2 when the neighbours ask for them."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


STAGES_THAT_FIT: dict[tuple, int] = {}


def launch(kernel, grid, args, *, num_warps: int, num_stages: int, pdl_on: int | None = None,
            **constexprs) -> None:
    """Launch; where a config's pipeline does not fit in shared memory on this device (a data file
    written for another GPU), retry with fewer stages instead of failing the forward. `pdl_on`: a
    kernel with a PDL parameter launched with programmatic dependent launch or not (experts/triton_pdl.py)."""
    if pdl_on is not None:
        constexprs.update(PDL=pdl_on, launch_pdl=bool(pdl_on))
    key = (id(kernel), num_warps, num_stages, tuple(sorted(constexprs.items())))
    stages = STAGES_THAT_FIT.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        STAGES_THAT_FIT[key] = stages
        return
