"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1's policy).

One step, `schedule()`, shares one token budget (`max_num_batched_tokens`) among all requests:

1. Running requests, in admission order: each gets `min(tokens left to compute, budget left)`
   tokens: 1 for a decode, a chunk for an unfinished prefill. When its blocks cannot be allocated,
   the most recently admitted running request is preempted (LIFO): its blocks are freed, it goes
   back to the FRONT of the waiting queue with num_computed_tokens = 0 and its output tokens kept,
   to be prefilled again as prompt + output. This repeats until the allocation fits or the request
   has preempted itself.
2. Only if nothing was preempted this step, waiting requests in FIFO order while budget and
   `max_num_seqs` allow: the prefix cache is consulted (`BlockManager.match_prefix`), the request
   gets a chunk of up to the budget left, its blocks are allocated and it joins the running list.
   The first one that does not fit stops admission (no skipping ahead, to stay fair); its matched
   blocks are released so that a waiting request never pins blocks.

A request whose tokens need more blocks than the whole cache holds, or more positions than
`max_model_len`, can never run: the scheduler finishes it with FINISHED_ERROR and reports it in
`SchedulerOutput.errors` instead of preempting everyone for it or waiting forever.

`update()` applies a step's results: computed tokens advance, sampled tokens are appended and
newly full blocks enter the prefix cache. Under async scheduling the engine calls `advance()` right
after `schedule()` (each sample a PLACEHOLDER, so the next step can be scheduled while the device
runs this one) and `update(..., advanced=True)` when the tokens arrive. Stops (EOS, stop strings,
max_tokens, max_model_len) are the engine's to decide; it calls `finish()`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.config import SchedulerConfig
from expertmesh.engine.request import Request, RequestStatus

PLACEHOLDER = -1
"""An output token sampled by a step still on the device (async scheduling): it counts as a token
(the next step computes it) but its value arrives with the step's results."""


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int
    """Position of the first token computed this step (num_computed_tokens when scheduled)."""
    num_tokens: int
    """Tokens computed this step, >= 1: positions start .. start + num_tokens - 1."""
    samples: bool
    """True when start + num_tokens == request.num_tokens: this step yields a next-token sample."""


@dataclass(frozen=True)
class RequestError:
    request_id: str
    message: str


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]
    """Ids of requests preempted this step (back in the waiting queue, blocks freed)."""
    num_batched_tokens: int
    errors: tuple[RequestError, ...] = ()
    """Requests the scheduler finished with FINISHED_ERROR this step, and why."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def __add__(self, other: SchedulerOutput) -> SchedulerOutput:
        """Two passes of one step as one output."""
        return SchedulerOutput(self.scheduled + other.scheduled, self.preempted + other.preempted,
                               self.num_batched_tokens + other.num_batched_tokens, self.errors + other.errors)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """In admission order: the last one is the preemption victim."""
        self._requests: dict[str, Request] = {}

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def add_request(self, req: Request) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already scheduled")
        if req.status is not RequestStatus.WAITING or req.num_computed_tokens or req.block_ids:
            raise ValueError(f"request {req.request_id!r} must be new (WAITING, nothing computed)")
        self._requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self, budget: int | None = None, admit_before: float | None = None) -> SchedulerOutput:
        """One step's chunks within `budget` tokens (default: max_num_batched_tokens; the engine
        passes less when sharded sequences took part of this rank's): the running requests, then,
        if none was preempted, admissions (only of requests that arrived before `admit_before`,
        when given: the engine holds the rest back for an older sharded sequence)."""
        budget = total = self.config.max_num_batched_tokens if budget is None else budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        errors: list[RequestError] = []

        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            fits = self._check_length(req, errors)
            if fits is None:  # rejected: finished and out of the running list
                continue
            if not fits:  # only its sample in flight overflows: wait for it (it may be the last)
                index += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute until update() appends its sample
                index += 1
                continue
            while not self.block_manager.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                index += 1
                continue
            break  # req preempted itself; it was the last running request

        if not preempted:
            budget = self._admit(budget, scheduled, errors, admit_before)
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            num_batched_tokens=total - budget,
            errors=tuple(errors),
        )

    def admit(self, budget: int, admit_before: float | None = None) -> SchedulerOutput:
        """Admissions alone (a second pass of a step, after a sharded sequence took its share)."""
        scheduled: list[ScheduledRequest] = []
        errors: list[RequestError] = []
        left = self._admit(budget, scheduled, errors, admit_before)
        return SchedulerOutput(tuple(scheduled), (), budget - left, tuple(errors))

    def _admit(self, budget: int, scheduled: list[ScheduledRequest], errors: list[RequestError],
               admit_before: float | None) -> int:
        """Waiting requests in FIFO order while budget, max_num_seqs and blocks allow; the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if admit_before is not None and req.arrival_time >= admit_before:
                break
            fits = self._check_length(req, errors)
            if fits is None:
                continue
            if not fits:
                break
            self.block_manager.match_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.block_manager.allocate(req, num_new):
                self.block_manager.free(req)
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        return budget

    def update(self, output: SchedulerOutput, sampled: dict[str, int], advanced: bool = False) -> None:
        """Apply one step: advance computed tokens, append samples (`sampled[request_id]` for every
        ScheduledRequest with samples=True), cache newly full blocks. Requests finished since
        `schedule()` (aborted) are skipped. With `advanced`, the step went through `advance` when it
        was scheduled: its samples replace their placeholders instead (a request preempted since
        gets its token too, for its recompute, but caches nothing)."""
        for item in output.scheduled:
            req = item.request
            if req.finished or self._requests.get(req.request_id) is not req:
                continue
            computed = item.start + item.num_tokens
            if not advanced:
                req.num_computed_tokens = computed
                if item.samples:
                    req.output_token_ids.append(sampled[req.request_id])
            else:
                if item.samples:
                    index = computed - req.num_prompt_tokens
                    if req.output_token_ids[index] != PLACEHOLDER:
                        raise RuntimeError(f"request {req.request_id!r}: output {index} is not a placeholder")
                    req.output_token_ids[index] = sampled[req.request_id]
                if req.status is not RequestStatus.RUNNING:
                    continue  # preempted after this step was scheduled: its blocks are gone
            self.block_manager.cache_blocks(req, computed)

    def advance(self, output: SchedulerOutput) -> None:
        """Take a scheduled step as done before its tokens are known (async scheduling): computed
        tokens advance and every sample is a PLACEHOLDER in the request's output, so that the next
        `schedule()` can run while the device computes this step. `update(..., advanced=True)`
        fills the placeholders in later; until then no block holding one is cached."""
        for item in output.scheduled:
            req = item.request
            req.num_computed_tokens = item.start + item.num_tokens
            if item.samples:
                req.output_token_ids.append(PLACEHOLDER)

    def finish(self, req_or_id: Request | str, status: RequestStatus) -> None:
        """End a request: free its blocks, drop it from the queues. Unknown or finished: no-op."""
        if not status.finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status}")
        request_id = req_or_id if isinstance(req_or_id, str) else req_or_id.request_id
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status

    def abort(self, request_ids: str | list[str] | tuple[str, ...]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def preempt_last(self) -> str:
        """Preempt the most recently admitted running request, returning its id: how a sharded
        sequence gets this rank's blocks (engine/sharded.py)."""
        victim = self.running.pop()
        self._preempt(victim)
        return victim.request_id

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, start, num_new, samples=start + num_new == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = req.num_cached_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _check_length(self, req: Request, errors: list[RequestError]) -> bool | None:
        """True if req's tokens fit (max_model_len, the whole cache); None if they never can: req is
        finished with FINISHED_ERROR. False if only a sample still in flight (async scheduling)
        takes it over: that sample may end the request, so it is judged once the sample is back."""
        bm = self.block_manager
        known = req.num_tokens - (req.output_token_ids[-1:] == [PLACEHOLDER])
        for n in (known, req.num_tokens):
            if n > self.max_model_len:
                message = f"{n} tokens exceed max_model_len={self.max_model_len}"
            elif bm.num_blocks_for(n) > bm.num_blocks:
                message = (f"{n} tokens need {bm.num_blocks_for(n)} KV blocks of {bm.block_size}; "
                           f"the cache has {bm.num_blocks}")
            else:
                continue
            if n > known:
                return False
            self.finish(req, RequestStatus.FINISHED_ERROR)
            errors.append(RequestError(req.request_id, message))
            return None
        return True
