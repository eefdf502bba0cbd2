"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on Hopper and later.

At batch 1 a decode step is ~540 short kernels back to back; between two of them the GPU drains
the first grid, flushes its writes and only then launches and sets up the second. With PDL
(`launch_pdl=True`, CUDA's programmatic stream serialization, kept by graph capture) the second
kernel's programs are launched while the first is still running and wait inside the kernel
(`griddepcontrol.wait`) for its grid to complete and its memory to be visible; each kernel then
lets its own dependents launch (`griddepcontrol.launch_dependents`).

The rule every kernel launched with PDL keeps: `pdl_wait` is the first thing each of its programs
does (before any load of what an earlier kernel wrote and before any store an earlier kernel
might still read), unconditionally, so that a kernel's completion still implies its
predecessor's, and ordering stays transitive down the stream. Kernels that are not ours (cuBLAS,
torch's) launch as before and wait for everything ahead of them.

It lives in `experts/`, the folder that imports nothing of ours, so that the kernels of
`experts/`, `router/` and `model/` can all share it.

`PDL` switches it off for the whole process (benchmarks compare both); off the GPU, on devices
before compute capability 9.0, or where Triton lacks the instructions, kernels launch as before.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: pdl() is always False, so the jit branch below never compiles
    gdc_launch_dependents = gdc_wait = None

PDL = True
"""Launch the decode step's kernels with programmatic dependent launch where the device has it."""

EARLY_TRIGGER = False
"""Let the next kernel launch before this one's wait (a deeper chain of launched, waiting
programs) instead of after it."""


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl(device: torch.device) -> int:
    """How kernels on `device` launch: 0 without PDL, 1 with it, 2 with it and the next kernel let
    launch first (EARLY_TRIGGER). Pass it as the kernel's PDL and `bool` of it as launch_pdl."""
    if not PDL or device.type != "cuda":
        return 0
    if not _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device()):
        return 0
    return 2 if EARLY_TRIGGER else 1


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """A program's first step under PDL: wait for the kernels before this one, then let the next
    kernel launch its programs (they wait in turn). Nothing when PDL is off."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL == 1:
        gdc_wait()
        gdc_launch_dependents()
