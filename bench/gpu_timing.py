"""CUDA-event timing, eager or replayed from a CUDA graph (launch gaps removed).

`graph_time` captures `reps` calls of fn in one graph, so a kernel of a few microseconds is timed
by the GPU, not by the Python that launches it; `eager_time` times `reps` calls launched back to
back, as a model's forward launches its layers: the host queues the next call while the GPU runs
this one, so a call's Python and launch latency counts only where the GPU would wait for it
(timed one call at a time, the 235B MoE layer at 1,024 tokens measured ~0.5 ms of launching that
a forward hides). Both return the median, in seconds per call. `capturable` says whether fn can
be captured at all: a path that synchronises with the host (torch.cuda.set_sync_debug_mode catches
that without a capture) or fails to capture is timed eagerly by `best_time`, which says which way
it timed.
"""
from __future__ import annotations

import statistics

import torch


def _elapsed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


MIN_EAGER_REPS = 3
"""Calls per timed run even where one call outlasts target_s: with one call a run would time the
host's way to its first kernel, which a forward (the previous layer still running) hides. The 235B
MoE layer at 16,384 tokens measured 8.9 ms one call at a time against 8.1 ms per call back to back
(torch.profiler, H200): ~0.4 ms of Python and launches before the first GEMM, counted once a run."""


def eager_time(fn, repeats: int = 7, warmup: int = 3, target_s: float = 10e-3, max_reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    estimate = min(_elapsed(fn) for _ in range(3))
    reps = max(min(MIN_EAGER_REPS, max_reps), min(max_reps, int(target_s / max(estimate, 1e-6))))

    def calls():
        for _ in range(reps):
            fn()

    return statistics.median(_elapsed(calls) / reps for _ in range(repeats))


def graph_time(fn, repeats: int = 7, target_s: float = 2e-3, max_reps: int = 50) -> float:
    """fn must already have run once (compiled kernels); reps per replay aim at target_s."""
    torch.cuda.synchronize()
    estimate = min(_elapsed(fn) for _ in range(3))
    reps = max(1, min(max_reps, int(target_s / max(estimate, 1e-6))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = [_elapsed(graph.replay) / reps for _ in range(repeats)]
    del graph
    return statistics.median(times)


def capturable(fn) -> str | None:
    """None when fn runs without a host sync, else why it does not."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        why = None
    except RuntimeError as e:
        why = f"host sync: {str(e).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return why


def best_time(fn, graphs: bool) -> tuple[float, str]:
    """(seconds per call, "graph" or "eager[: why]"); fn has run once already."""
    if not graphs:
        return eager_time(fn), "eager"
    why = capturable(fn)
    if why is None:
        try:
            return graph_time(fn), "graph"
        except RuntimeError as e:
            torch.cuda.synchronize()
            why = f"capture failed: {str(e).splitlines()[0][:120]}"
    return eager_time(fn), f"eager ({why})"
