"""The step plan: what the engine core sends to every rank once per step, and what comes back.

Plain frozen dataclasses of Python lists and ints, so the same message travels in-process or
through one Ray call to all ranks. Ranks keep each request's tokens and sampling state
(`NewRequest` arrives once); a step then only names, per request, the positions to compute
and its block table. Sampled tokens are appended by the ranks themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

from expertmesh.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    rank: int = 0
    """The data-parallel rank that holds this request's KV blocks and samples its tokens."""
    output_token_ids: list[int] = ()
    """Tokens already generated (a request moved between ranks, or re-sent after preemption)."""


@dataclass(frozen=True)
class Chunk:
    request_id: str
    start: int
    """Position of the first token computed this step."""
    num_tokens: int
    block_ids: list[int]
    """The request's whole block table."""
    sample: bool
    """This chunk reaches the last known token: sample the next one."""


@dataclass(frozen=True)
class StepPlan:
    new_requests: tuple[NewRequest, ...]
    chunks_by_rank: tuple[tuple[Chunk, ...], ...]
    """Each rank's chunks (attention is data-parallel: a rank computes its own sequences). A rank
    with none still runs the step, to take part in every MoE layer's all-to-all."""
    finished_request_ids: tuple[str, ...]
    """Requests whose state the ranks can drop (finished or aborted since the last step)."""

    @property
    def num_chunks(self) -> int:
        return sum(len(chunks) for chunks in self.chunks_by_rank)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, SampledToken]
    """request id -> its new token, for every chunk with sample=True."""
    compute_seconds: float = 0.0
    """Wall time of the slowest rank's forward and sampling (the executor's own overhead is the rest)."""
