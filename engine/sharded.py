"""Scheduling of sharded (sequence-parallel) sequences: one sequence's KV over every rank.

A prompt of at least `sequence_parallel_min_tokens` tokens becomes a *sharded* sequence: its KV
cache is spread over all ranks of the EP group in zigzag units of one block
(model/sharded_attention.py), so each rank holds about 1/R of it in its own paged blocks, and
each step's rows are spread the same way. It has a *home* rank (the least loaded when it arrives)
that samples its tokens; the other ranks keep nothing of it but its blocks.

One step, in arrival order across both kinds of sequence (EngineCore._schedule):

1. Running sharded sequences (`schedule_running`), within each rank's budget less what that
   rank's running requests need: all of it for those that arrived before the oldest running
   sharded sequence, one token (a decode, a prefill's progress) for later ones, so no running
   decode ever waits for a long prefill. Each takes the longest chunk whose rows fit every
   rank's budget (`row_counts`: ~1/R of the chunk per rank) and whose blocks fit every rank's
   free ones. With no block for even one more token, LIFO by arrival: the short rank's newest
   request is preempted if it arrived after the newest sharded sequence (and the rank's
   requests hold enough blocks), else that sharded sequence is, possibly this one.
2. The rank schedulers: their running requests, then admissions of requests that arrived before
   the oldest waiting sharded sequence (later ones are held back, and with them the blocks the
   sharded sequence waits for).
3. Waiting sharded sequences (`admit`), FIFO, each once the first chunk the budgets left allow
   has its blocks free on every rank (admission never preempts).
4. The rank schedulers admit the requests held back, if no sharded sequence still waits.

A long prefill thus runs in chunks across steps beside everyone's decodes, admitted in its turn
(the FIFO of vLLM's chunked prefill). Finishing, aborting or preempting a sharded sequence frees
its blocks on every rank.

Prefix caching is skipped for sharded sequences: their blocks are never hashed nor matched (a
shard holds every R-th unit of the prompt, and a prefix shared with an ordinary sequence would sit
in different blocks on different ranks).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expertmesh.engine.config import SchedulerConfig
from expertmesh.engine.request import Request, RequestStatus
from expertmesh.engine.scheduler import RequestError, ScheduledRequest, Scheduler
from expertmesh.model.sequence_parallel import shard_sizes
from expertmesh.model.sharded_attention import ShardedChunk, row_counts


@dataclass(frozen=True)
class ShardedOutput:
    scheduled: tuple[ScheduledRequest, ...]
    rows: np.ndarray
    """int64 [R]: rows the scheduled chunks put on each rank."""
    preempted: tuple[str, ...] = ()
    """Sharded sequences preempted this step."""
    preempted_ranks: tuple[str, ...] = ()
    """Ordinary requests that ranks preempted to give blocks to sharded sequences."""
    errors: tuple[RequestError, ...] = ()

    def __add__(self, other: ShardedOutput) -> ShardedOutput:
        """Two passes of one step (running, then admissions) as one output."""
        return ShardedOutput(self.scheduled + other.scheduled, self.rows + other.rows,
                             self.preempted + other.preempted, self.preempted_ranks + other.preempted_ranks,
                             self.errors + other.errors)


class ShardedScheduler:
    def __init__(self, config: SchedulerConfig, schedulers: Sequence[Scheduler], max_model_len: int,
                 min_tokens: int) -> None:
        """`schedulers`: the ranks' own schedulers, whose block managers hold the shards too."""
        self.config = config
        self.schedulers = list(schedulers)
        self.block_managers = [s.block_manager for s in self.schedulers]
        self.world = len(self.block_managers)
        self.block_size = self.block_managers[0].block_size
        self.max_model_len = max_model_len
        self.min_tokens = min_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self.homes: dict[str, int] = {}
        self._shards: dict[str, list[Request]] = {}
        """Per rank, a stand-in request whose block_ids are the sequence's shard there."""

    def wants(self, num_prompt_tokens: int) -> bool:
        """Whether a prompt this long is sharded (`sequence_parallel_min_tokens`; 0 never)."""
        return 0 < self.min_tokens <= num_prompt_tokens

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def load(self, rank: int) -> int:
        """Sharded sequences whose home is `rank`."""
        return sum(home == rank for home in self.homes.values())

    def num_computed_tokens(self, request_id: str) -> int:
        """Tokens of a sharded sequence whose KV is in its shards (0 once it is finished)."""
        req = self._requests.get(request_id)
        return 0 if req is None else req.num_computed_tokens

    def shard_blocks(self, request_id: str) -> list[list[int]]:
        """Each rank's blocks of a sharded sequence ([] on every rank once it is finished)."""
        shards = self._shards.get(request_id)
        return [list(s.block_ids) for s in shards] if shards else [[] for _ in range(self.world)]

    def add_request(self, req: Request, home: int) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already scheduled")
        self._requests[req.request_id] = req
        self.homes[req.request_id] = home
        # stand-ins' ids hold a NUL, which no client's id does: they never meet a request's hash state
        self._shards[req.request_id] = [Request(f"\x00shard{r}\x00{req.request_id}", [], req.params)
                                        for r in range(self.world)]
        self.waiting.append(req)

    @property
    def oldest_running(self) -> float | None:
        """Arrival time of the earliest running sharded sequence (None: none runs)."""
        return min((r.arrival_time for r in self.running), default=None)

    @property
    def head_arrival(self) -> float | None:
        """Arrival time of the next sharded sequence to admit (None: none waits)."""
        return self.waiting[0].arrival_time if self.waiting else None

    def schedule_running(self, budgets: Sequence[int]) -> ShardedOutput:
        """The running sharded sequences' chunks within `budgets` (rows per rank), in admission
        order: each the longest chunk whose rows fit the budgets and whose blocks fit every rank's
        free ones. With no block for even one token, the most recently arrived of the short
        rank's newest running request and the newest running sharded sequence is preempted
        (the rank's only if freeing its requests' blocks can cover the need)."""
        left = np.array(budgets, dtype=np.int64)
        scheduled, preempted, preempted_ranks, errors = [], [], [], []
        index = 0
        while index < len(self.running):
            req = self.running[index]
            if not self._fits(req, errors):
                continue
            if self._chunk(req, left, blocks=False) == 0:  # no budget for it this step
                index += 1
                continue
            n = self._chunk(req, left)
            while n == 0:  # budget, but not one token's blocks: make room
                rank = next(r for r in range(self.world) if self._needed(req, 1, r) > 0)
                victim, of_rank = self._victim(rank, req)
                (preempted_ranks if of_rank else preempted).append(victim)
                if req.status is not RequestStatus.RUNNING:
                    break
                n = self._chunk(req, left)
            if n == 0:
                break  # req preempted itself (it was the last running sharded sequence)
            self._allocate(req, n)
            scheduled.append(self._scheduled(req, n, left))
            index += 1
        return ShardedOutput(tuple(scheduled), np.array(budgets, dtype=np.int64) - left, tuple(preempted),
                             tuple(preempted_ranks), tuple(errors))

    def admit(self, budgets: Sequence[int]) -> ShardedOutput:
        """Waiting sharded sequences in FIFO order, each once the longest first chunk the budgets
        allow has its blocks free on every rank (never preempting to admit, nor admitting on a
        smaller chunk that the next step's growth would have to preempt again)."""
        left = np.array(budgets, dtype=np.int64)
        scheduled, errors = [], []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._fits(req, errors):
                continue
            n = self._chunk(req, left, blocks=False)
            if n == 0 or any(self._needed(req, n, r) > 0 for r in range(self.world)):
                break
            self._allocate(req, n)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, n, left))
        return ShardedOutput(tuple(scheduled), np.array(budgets, dtype=np.int64) - left, errors=tuple(errors))

    def _victim(self, rank: int, req: Request) -> tuple[str, bool]:
        """Preempt for req on `rank`, LIFO by arrival: the rank's newest running request if it
        arrived after the newest running sharded sequence and the rank's running requests hold
        blocks enough to cover the need; else that sharded sequence (possibly req). Returns
        (its id, whether it was the rank's)."""
        scheduler, bm = self.schedulers[rank], self.block_managers[rank]
        ordinary = scheduler.running[-1] if scheduler.running else None
        last = self.running[-1]
        held = sum(1 for r in scheduler.running for b in r.block_ids if bm.ref_counts[b] == 1)
        if ordinary is not None and ordinary.arrival_time > last.arrival_time and held >= self._needed(req, 1, rank):
            return scheduler.preempt_last(), True
        self.running.pop()
        self._preempt(last)
        return last.request_id, False

    def chunks(self, out: ShardedOutput) -> tuple[ShardedChunk, ...]:
        """The plan's form of the scheduled chunks (tokens and every rank's block table)."""
        chunks = []
        for item in out.scheduled:
            req = item.request
            tokens = _token_slice(req, item.start, item.start + item.num_tokens)
            tables = tuple(np.array(s.block_ids, dtype=np.int64) for s in self._shards[req.request_id])
            chunks.append(ShardedChunk(req.request_id, self.homes[req.request_id], item.start, tokens,
                                       item.samples, tables))
        return tuple(chunks)

    def update(self, out: ShardedOutput, sampled: dict[str, int]) -> None:
        for item in out.scheduled:
            req = item.request
            if req.finished or self._requests.get(req.request_id) is not req:
                continue
            req.num_computed_tokens = item.start + item.num_tokens
            if item.samples:
                req.output_token_ids.append(sampled[req.request_id])

    def finish(self, req_or_id: Request | str, status: RequestStatus) -> None:
        """End a sharded sequence: free its blocks on every rank. Unknown or finished: no-op."""
        if not status.finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status}")
        request_id = req_or_id if isinstance(req_or_id, str) else req_or_id.request_id
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
        self._free(req)
        del self._shards[request_id], self.homes[request_id]
        req.status = status

    # ---- internals ------------------------------------------------------------------------

    def _scheduled(self, req: Request, n: int, left: np.ndarray) -> ScheduledRequest:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens
        left -= row_counts(start, n, sample, self.homes[req.request_id], self.world, self.block_size)
        return ScheduledRequest(req, start, n, sample)

    def _chunk(self, req: Request, left: np.ndarray, blocks: bool = True) -> int:
        """The most tokens of req whose rows fit every rank's budget left and, with `blocks`, whose
        shard blocks fit every rank's free ones (0: none)."""
        start, remaining, home = req.num_computed_tokens, req.num_tokens - req.num_computed_tokens, \
            self.homes[req.request_id]

        def fits(n: int) -> bool:
            counts = row_counts(start, n, start + n == req.num_tokens, home, self.world, self.block_size)
            return bool((counts <= left).all()) and not (blocks and any(
                self._needed(req, n, r) > 0 for r in range(self.world)))

        lo, hi = 0, remaining  # rows and blocks grow with n: the largest n that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _needed(self, req: Request, n: int, rank: int) -> int:
        """Blocks rank still lacks for req's shard up to num_computed_tokens + n, beyond its free ones."""
        shard = self._shards[req.request_id][rank]
        bm = self.block_managers[rank]
        keys = int(shard_sizes(req.num_computed_tokens + n, self.world, self.block_size)[rank])
        return bm.num_blocks_for(keys) - len(shard.block_ids) - bm.num_free_blocks

    def _allocate(self, req: Request, n: int) -> None:
        """Grow req's shard on every rank to cover its tokens up to num_computed_tokens + n (which
        `_chunk` has checked the free blocks for)."""
        keys = shard_sizes(req.num_computed_tokens + n, self.world, self.block_size)
        for bm, shard, k in zip(self.block_managers, self._shards[req.request_id], keys.tolist()):
            if not bm.allocate(shard, k):  # stand-ins keep num_computed_tokens 0: k slots in all
                raise RuntimeError(f"rank block allocation for {req.request_id!r} failed after its check")

    def _free(self, req: Request) -> None:
        for bm, shard in zip(self.block_managers, self._shards[req.request_id]):
            bm.free(shard)

    def _preempt(self, req: Request) -> None:
        self._free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _fits(self, req: Request, errors: list[RequestError]) -> bool:
        """False (req finished with FINISHED_ERROR, out of the queues) if it can never run: more
        tokens than max_model_len, or a shard larger than a rank's whole cache."""
        n = req.num_tokens
        keys = int(shard_sizes(n, self.world, self.block_size).max())
        bm = self.block_managers[0]
        if n > self.max_model_len:
            message = f"{n} tokens exceed max_model_len={self.max_model_len}"
        elif bm.num_blocks_for(keys) > bm.num_blocks:
            message = (f"{n} tokens sharded over {self.world} ranks need {bm.num_blocks_for(keys)} KV blocks of "
                       f"{bm.block_size} on a rank; a rank's cache has {bm.num_blocks}")
        else:
            return True
        self.finish(req, RequestStatus.FINISHED_ERROR)
        errors.append(RequestError(req.request_id, message))
        return False


def _token_slice(req: Request, start: int, end: int) -> np.ndarray:
    """int64 tokens at positions start .. end - 1 (without concatenating a long prompt and its output)."""
    n = req.num_prompt_tokens
    head = req.prompt_token_ids[start:min(end, n)] if start < n else []
    tail = req.output_token_ids[max(start - n, 0):end - n] if end > n else []
    return np.array(head + tail, dtype=np.int64)


__all__ = ["ShardedOutput", "ShardedScheduler"]
