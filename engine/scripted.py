"""A scripted executor: replays given token sequences instead of running a model.

It speaks the `Executor` protocol, so the whole engine (scheduler, KV blocks, stops,
detokenizer, output parsers, and later the HTTP and gRPC gateway) can be tested on exact token
streams a random-weight model would never write: multilingual text, `<think>` blocks,
`<tool_call>` blocks split at any point.

    executor = ScriptedExecutor(model_config, num_blocks=64,
                                script=lambda prompt_ids: tokenizer.encode("Bonjour 👋"))

Each request gets `script(prompt_token_ids)` once, at arrival, and is fed its tokens one
sampled step at a time; after the script runs out it repeats `fallback_token` (an EOS, usually).
"""
from __future__ import annotations

from collections.abc import Callable

from expertmesh.engine.step import StepPlan, StepResult
from expertmesh.model.config import ModelConfig


class ScriptedExecutor:
    def __init__(self, model_config: ModelConfig, num_blocks: int,
                 script: Callable[[list[int]], list[int]], fallback_token: int = 0, num_ranks: int = 1) -> None:
        """`num_ranks`: the data-parallel ranks the core schedules for (each with num_blocks)."""
        self.model_config = model_config
        self.num_blocks = num_blocks
        self.num_ranks = num_ranks
        self.script = script
        self.fallback_token = fallback_token
        self._pending: dict[str, list[int]] = {}
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for request_id in plan.finished_request_ids:  # earlier plans' requests (an id may come back)
            self._pending.pop(request_id, None)
        for new in plan.new_requests:
            self._pending[new.request_id] = list(self.script(list(new.prompt_token_ids)))
        request_ids, token_ids = [], []
        for chunk in [*(c for chunks in plan.chunks_by_rank for c in chunks), *plan.sharded]:
            if chunk.sample:
                tokens = self._pending.setdefault(chunk.request_id, [])
                request_ids.append(chunk.request_id)
                token_ids.append(tokens.pop(0) if tokens else self.fallback_token)
        return StepResult(tuple(request_ids), tuple(token_ids))

    def expert_load(self):
        return None

    def restart(self) -> None:
        self._pending.clear()

    def shutdown(self) -> None:
        self._pending.clear()
