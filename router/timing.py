"""`StageTimer`: time named stages of a step (CUDA events on a GPU, so nothing waits per call).

    timer.measure("all_to_all", fn, device)      # time one call
    timer.start("moe", device); ...; timer.stop("moe")   # time a span (forward hooks)
    timer.take()  -> {"all_to_all": seconds, "moe": seconds}   # since the last take()
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


class StageTimer:
    def __init__(self) -> None:
        self._events: dict[str, list] = defaultdict(list)
        self._cpu: dict[str, float] = defaultdict(float)
        self._open: dict[str, object] = {}
        self.calls: dict[str, int] = defaultdict(int)

    def start(self, name: str, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[name] = event
        else:
            self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        begin = self._open.pop(name)
        self.calls[name] += 1
        if isinstance(begin, float):
            self._cpu[name] += time.perf_counter() - begin
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[name].append((begin, end))

    def measure(self, name: str, fn, device: torch.device) -> None:
        self.start(name, device)
        fn()
        self.stop(name)

    def take(self) -> dict[str, float]:
        """Seconds per stage since the last call (synchronises the GPU once)."""
        if self._events:
            torch.cuda.synchronize()
        names = set(self._cpu) | set(self._events)
        totals = {n: self._cpu.get(n, 0.0) + sum(s.elapsed_time(e) for s, e in self._events.get(n, ())) / 1e3
                  for n in names}
        self._events, self._cpu = defaultdict(list), defaultdict(float)
        return totals
