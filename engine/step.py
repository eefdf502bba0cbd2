"""The step plan: what the engine core sends to every rank once per step, and what comes back.

Frozen dataclasses of Python lists, ints and numpy arrays, so the same message travels
in-process or through one Ray message to all ranks. Ranks keep each request's tokens and
sampling state (`NewRequest` arrives once); a step then only names, per request, the positions
to compute and its block table. Sampled tokens are appended by the ranks themselves.

Chunks and results travel column by column (`RankChunks`, `StepResult`): a step of 256
sequences serialises as a few arrays instead of 256 objects, which keeps the per-step control
path short.

Constrained rows (grammars, a forced `</think>`) bring their allowed tokens as packed bitmasks
(`TokenMasks`, xgrammar's layout): 4 bytes per 32 tokens, so a row of Qwen3's 151,936 tokens is
19 KB. The core fills them; ranks unpack them with torch bit operations and never need xgrammar.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.sharded_attention import ShardedChunk


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
class RankChunks:
    """One rank's chunks as columns."""

    request_ids: tuple[str, ...]
    starts: np.ndarray
    """int64 [n]: position of each chunk's first token."""
    num_tokens: np.ndarray
    """int64 [n]."""
    sample: np.ndarray
    """bool [n]."""
    block_ids: np.ndarray
    """int64: every chunk's block table, one after another."""
    block_offsets: np.ndarray
    """int64 [n + 1]: chunk i's table is block_ids[block_offsets[i]:block_offsets[i + 1]]."""

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> RankChunks:
        chunks = list(chunks)
        tables = [c.block_ids for c in chunks]
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in tables], out=offsets[1:])
        return cls(
            request_ids=tuple(c.request_id for c in chunks),
            starts=np.array([c.start for c in chunks], dtype=np.int64),
            num_tokens=np.array([c.num_tokens for c in chunks], dtype=np.int64),
            sample=np.array([c.sample for c in chunks], dtype=bool),
            block_ids=np.fromiter((b for t in tables for b in t), dtype=np.int64, count=int(offsets[-1])),
            block_offsets=offsets,
        )

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def total_tokens(self) -> int:
        return int(self.num_tokens.sum())

    def block_table(self, i: int) -> np.ndarray:
        return self.block_ids[self.block_offsets[i]: self.block_offsets[i + 1]]

    def __iter__(self) -> Iterator[Chunk]:
        for i, request_id in enumerate(self.request_ids):
            yield Chunk(request_id, int(self.starts[i]), int(self.num_tokens[i]), self.block_table(i).tolist(),
                        bool(self.sample[i]))


@dataclass(frozen=True)
class TokenMasks:
    """One rank's allowed-token masks this step, one row per constrained request that samples."""

    request_ids: tuple[str, ...]
    bitmask: np.ndarray
    """int32 [n, ceil(V / 32)]: token t is allowed in row i iff bit t % 32 of bitmask[i, t // 32] is set."""

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class StepPlan:
    new_requests: tuple[NewRequest, ...]
    chunks_by_rank: tuple[RankChunks, ...]
    """Each rank's chunks (attention is data-parallel: a rank computes its own sequences). A rank
    with none still runs the step, to take part in every MoE layer's all-to-all."""
    finished_request_ids: tuple[str, ...]
    """Requests whose state the ranks can drop (finished or aborted since the last step), all
    announced by earlier plans: ranks drop them before they take this plan's new requests, so an
    id freed here may arrive again in the same plan."""
    token_masks: tuple[TokenMasks | None, ...] = ()
    """Per rank, the masks of its constrained rows (None: none on that rank); () when no row is."""
    sharded: tuple[ShardedChunk, ...] = ()
    """Sharded (sequence-parallel) sequences' steps, the same for every rank: each rank computes
    its rows of them after its own chunks (model/sharded_attention.py)."""

    @property
    def num_chunks(self) -> int:
        return sum(len(chunks) for chunks in self.chunks_by_rank) + len(self.sharded)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepResult:
    request_ids: tuple[str, ...] = ()
    """Every request that sampled a token this step."""
    token_ids: tuple[int, ...] = ()
    logprobs: dict[str, tuple[float, tuple[tuple[int, float], ...]]] | None = None
    """For requests that asked: (logprob of the sampled token, top (token, logprob) pairs)."""
    compute_seconds: float = 0.0
    """Wall time of the slowest rank's forward and sampling (the executor's own overhead is the rest)."""

    @property
    def sampled(self) -> dict[str, SampledToken]:
        """request id -> its new token."""
        logprobs = self.logprobs or {}
        out = {}
        for request_id, token_id in zip(self.request_ids, self.token_ids):
            entry = logprobs.get(request_id)
            out[request_id] = SampledToken(token_id) if entry is None else SampledToken(token_id, *entry)
        return out

    @classmethod
    def merge(cls, results: Iterable[StepResult]) -> StepResult:
        """The results of every rank, as one."""
        results = list(results)
        logprobs = {}
        for r in results:
            logprobs.update(r.logprobs or {})
        return cls(tuple(i for r in results for i in r.request_ids), tuple(t for r in results for t in r.token_ids),
                   logprobs or None, max((r.compute_seconds for r in results), default=0.0))
