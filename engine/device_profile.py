"""A rank's decode steps as its device saw them: busy time, idle time and collective time, from
torch.profiler's kernel records (CUPTI), so CUDA graphs stay on while they are measured.

    window = KernelWindow(device); window.start()
    ... N decode steps ...
    summary = window.stop(steps=N, moe_layers=L)

`summary` (per step unless named per layer):
  window_us      the window's wall time (host clock, the device synchronised at both ends)
  busy_us        the union of the kernels' intervals: the device computed or communicated
  idle_us        window - busy: the device waited for the host or for another rank's launches
                 outside a collective (time inside a collective kernel, waiting for the other
                 rank, counts as busy here and as collective time below)
  collective_us  the collectives' kernels (NCCL's, symmetric memory's), their union
  a2a_us_per_layer  collective_us / MoE layers
  kernels        kernel launches the device ran

On a CPU there are no device kernels: the CPU ops stand in (the host's busy time, gloo's
all-to-all calls as the collective), which is how the tests walk it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

COLLECTIVE_MARKS = ("nccl", "all_to_all", "alltoall", "symm_mem")
"""A kernel (or, on a CPU, an op) whose lower-cased name holds one of these is a collective's."""


@dataclass(frozen=True)
class Record:
    name: str
    start_us: float
    duration_us: float


def is_collective(name: str) -> bool:
    lowered = name.lower()
    return any(mark in lowered for mark in COLLECTIVE_MARKS)


def busy_us(records: list[Record]) -> float:
    """The length of the union of the records' intervals."""
    total, end = 0.0, float("-inf")
    for r in sorted(records, key=lambda r: r.start_us):
        stop = r.start_us + r.duration_us
        if r.start_us >= end:
            total += r.duration_us
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(records: list[Record], window_us: float, steps: int, moe_layers: int) -> dict:
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    busy = busy_us(records)
    collective = busy_us([r for r in records if is_collective(r.name)])  # nested CPU ops count once
    return {"window_us": window_us / steps, "busy_us": busy / steps, "idle_us": max(0.0, window_us - busy) / steps,
            "collective_us": collective / steps,
            "a2a_us_per_layer": collective / steps / moe_layers if moe_layers else 0.0,
            "kernels": len(records) / steps}


def _all_threads():
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # a torch before the option: the starting thread's ops only
        return None


class KernelWindow:
    """torch.profiler around a run of steps on one rank (started and stopped by the caller)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._profiler = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self._profiler is not None:
            raise RuntimeError("the profiling window is open already")
        self._sync()
        if self.device.type == "cuda":  # CUPTI's kernel records are the whole process's, every thread's
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
        else:  # CPU ops are recorded per thread: a Ray rank runs its steps on its compiled graph's thread
            self._profiler = profile(activities=[ProfilerActivity.CPU], experimental_config=_all_threads())
        self._profiler.__enter__()
        self._start = time.perf_counter()

    def stop(self, steps: int, moe_layers: int) -> dict:
        if self._profiler is None:
            raise RuntimeError("no profiling window is open")
        self._sync()
        window_us = (time.perf_counter() - self._start) * 1e6
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        records = [Record(e.name, float(e.time_range.start), float(e.time_range.end - e.time_range.start))
                   for e in profiler.events() if self._counts(e)]
        if self.device.type == "cuda" and not records:
            raise RuntimeError("the profiler recorded no CUDA kernel in the window (is CUPTI available?): "
                               "its busy and idle times would be meaningless")
        return summarize(records, window_us, steps, moe_layers)

    def _counts(self, event) -> bool:
        if self.device.type == "cuda":
            return event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
        return event.device_type == torch.autograd.DeviceType.CPU



class WindowSlot:
    """One rank's profiling window, opened and closed by separate calls (an executor's, a Ray actor's)."""

    def __init__(self) -> None:
        self.window: KernelWindow | None = None

    def toggle(self, device: torch.device, steps: int, moe_layers: int) -> dict | None:
        """`steps` 0: open the window; else close it after `steps` steps and return its summary."""
        if not steps:
            if self.window is not None:
                raise RuntimeError("the profiling window is open already")
            self.window = KernelWindow(device)
            self.window.start()
            return None
        window, self.window = self.window, None
        if window is None:
            raise RuntimeError("no profiling window is open")
        return window.stop(steps, moe_layers)
