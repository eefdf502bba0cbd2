"""CUDA graphs of the decode forward, one per batch size of a ladder (nano-vllm's scheme).

    capture (start-up, largest size first so the shared memory pool is sized once):
        for B in ladder: fill the static inputs with B padding rows, run the forward once
        (Triton compiles, caches warm), then record it: embedding -> every layer -> logits [B, V]
    replay (a decode-only step of b sequences):
        the step's inputs are already in the static buffers, padded to B = the smallest size >= b;
        graph[B].replay(); the logits of the first b rows are the step's

Prefill and mixed steps stay eager. Without CUDA (tests on the CPU) the same class runs the
padded forward eagerly, so the padding logic is tested everywhere; only the recording is CUDA's.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to `max_batch` (which is always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """`forward(B)` runs the decode forward on the first B rows of the static inputs and returns
    the logits [B, V]; `prepare(B)` fills those inputs with B padding rows (and sets whatever
    per-step state the forward reads, such as the all-to-all capacity)."""

    def __init__(self, forward: Callable[[int], torch.Tensor], prepare: Callable[[int], None],
                 sizes: list[int], device: torch.device) -> None:
        self.forward, self.prepare = forward, prepare
        self.sizes = sorted(sizes)
        self.device = device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` rows (None: larger than every graph)."""
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self, progress: bool = True) -> None:
        if self.device.type != "cuda":
            return
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in tqdm(sorted(self.sizes, reverse=True), desc="Capturing CUDA graphs", unit="graph",
                         disable=not progress):
            self.prepare(size)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.forward(size)  # warm-up: compiles kernels, fills caches outside the graph
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self.forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d CUDA graphs (batch %d to %d) in %.1f s, %.2f GiB", len(self.sizes), self.sizes[0],
                 self.sizes[-1], time.perf_counter() - start, used / 2**30)

    def run(self, size: int) -> torch.Tensor:
        """The logits [size, V] of the padded batch now in the static inputs."""
        graph = self.graphs.get(size)
        if graph is None:  # not captured (no CUDA): the same padded forward, eagerly
            return self.forward(size)
        graph.replay()
        return self.outputs[size]
