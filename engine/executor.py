"""The `Executor` protocol between `EngineCore` and whatever runs the model.

`EngineCore` builds one `StepPlan` per step and calls `execute` once; the executor delivers
it to every rank (in-process: one `ModelRunner`; under expert parallelism: one message to all
RankWorkers) and returns the sampled tokens. Errors raised by a rank propagate out of
`execute`; the core then fails the step's requests and goes on.
"""
from __future__ import annotations

import gc
from typing import Protocol

import torch

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.device_profile import WindowSlot
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.step import StepPlan, StepResult
from expertmesh.model.config import ModelConfig


class ExecutorDiedError(RuntimeError):
    """The executor's workers are gone (a rank died or hung): every request in flight is lost.
    The core fails them and calls `restart()`."""


class Executor(Protocol):
    model_config: ModelConfig
    num_blocks: int
    """KV blocks each rank holds (the core's block manager per rank hands out exactly these)."""
    num_ranks: int
    """Data-parallel attention ranks: the core schedules each rank's sequences separately."""

    def execute(self, plan: StepPlan) -> StepResult: ...

    overlaps_steps: bool
    """Async scheduling: `submit` returns before the step's tokens exist and `collect` waits for
    them, one step in flight (the next step's inputs take its sampled tokens on the device). An
    executor without it (False or absent) is only ever called through `execute`."""

    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed per (MoE layer, expert) since start, summed over ranks; None for dense models."""
        ...

    def restart(self) -> None:
        """Replace dead workers with a fresh group (after ExecutorDiedError)."""
        ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """One `ModelRunner` in this process (EP=1)."""

    num_ranks = 1

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.runner = ModelRunner(config.load, config.cache, scheduler=config.scheduler, progress=progress)
        self.runner.capture_graphs(progress=progress)
        self.model_config = self.runner.model_config
        self.num_blocks = self.runner.num_blocks
        # A GPU computes while this thread goes on; a CPU computes inside submit, so overlapping
        # would only hold each step's tokens back by one step.
        self.overlaps_steps = self.runner.device.type == "cuda"
        self._profile = WindowSlot()

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def submit(self, plan: StepPlan) -> None:
        self.runner.submit(plan)

    def collect(self) -> StepResult:
        return self.runner.collect()

    def expert_load(self) -> torch.Tensor | None:
        return self.runner.expert_load()

    def profile_window(self, steps: int = 0) -> list[dict | None]:
        """Benchmarks: open (`steps` 0) or close the device profiling window (`engine/device_profile.py`);
        one summary per rank, as `RayExecutor.profile_window`."""
        return [self._profile.toggle(self.runner.device, steps, len(self.model_config.moe_layers))]

    def restart(self) -> None:
        """Nothing to replace in-process: a failed step raised an ordinary error."""

    def shutdown(self) -> None:
        if self.runner is not None and self.runner.device.type == "cuda":
            gc.unfreeze()  # the start-up heap was frozen (freeze_startup_heap): let this engine's cycles go
        self.runner = None
        gc.collect()
