"""`EngineCore`: requests in, token and text deltas out; one `step()` per model step.

    add_request ─▶ Scheduler (waiting) ─schedule()─▶ StepPlan ─executor.execute()─▶ sampled tokens
        ─▶ Scheduler.update ─▶ stops (EOS, stop tokens, stop strings, max_tokens, max_model_len)
        ─▶ incremental detokenizer ─▶ RequestOutput deltas

A request with n > 1 becomes n sequences ("id#0", "id#1", ...) on one rank; their outputs come
back together under the request's id. (They are admitted together, so each prefills the prompt
itself: the prefix cache only serves blocks registered by an earlier step.)
A failure inside a step ends that step's requests with finish_reason "error" and the engine
goes on: a bad request never takes the engine down.

Streamed outputs are deltas (vLLM's DELTA kind): each carries `text_delta`, `token_ids_delta`
and `logprobs_delta`; the totals (`text`, `token_ids`, `logprobs`) and the prompt come only with a
sequence's last output.

Constrained decoding and thinking (`guided_decoding`, `reasoning`, `thinking_budget`) are the
core's too: each such sequence has a `SequenceGuide` (engine/grammar.py) holding its phase and
grammar matcher. Before a step, every guided sequence that samples in it fills one row of the
step's packed token masks (`StepPlan.token_masks`); after it, the sampled token advances the
guide, and a grammar that accepted its stop token ends the sequence ("stop"). Grammars compile
in compiler processes with a time budget (`prepare` starts them, its caller waits), never in
`step`; a bad, oversized or too-slow schema, regex or grammar is a ValueError before anything is
queued. Stop strings and grammars are capped by `LimitsConfig`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.config import SEQUENCE_PARALLEL_MIN_TOKENS, EngineConfig
from expertmesh.engine.detokenizer import IncrementalDetokenizer, StopChecker
from expertmesh.engine.executor import Executor, ExecutorDiedError
from expertmesh.engine.grammar import CompiledGuide, GrammarBackend, SequenceGuide, done_future
from expertmesh.engine.outputs import CompletionOutput, RequestOutput
from expertmesh.engine.request import Request, RequestStatus
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scheduler import Scheduler, SchedulerOutput
from expertmesh.engine.sharded import ShardedOutput, ShardedScheduler
from expertmesh.engine.step import Chunk, NewRequest, RankChunks, SampledToken, StepPlan, StepResult, TokenMasks

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    request: Request
    parent: str
    rank: int
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    output: CompletionOutput
    stop_token_ids: frozenset[int] = frozenset()
    changed: bool = False
    sharded: bool = False
    """Its KV is spread over every rank (engine/sharded.py); `rank` is its home."""


@dataclass(frozen=True)
class Resume:
    """Where a request stood on the replica it ran on before: the tokens it produced and the text the
    client received (which may stop short of those tokens' text: stop-string look-ahead)."""

    token_ids: tuple[int, ...]
    text: str = ""


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    stream: bool = True
    children: list[str] = field(default_factory=list)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer) -> None:
        model_config = executor.model_config
        self.max_model_len = config.load.max_model_len or model_config.max_position_embeddings
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.executor = executor
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model_config.eos_token_ids)
        self.config = config
        self.num_ranks = getattr(executor, "num_ranks", 1)
        self._reset_schedulers()
        self._sequences: dict[str, _Sequence] = {}
        self._parents: dict[str, _Parent] = {}
        self._new: list[NewRequest] = []
        self._dropped: list[str] = []
        self._grammar: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()
        self._guides: dict[str, SequenceGuide] = {}
        """Sequences with a grammar or thinking to track (unconstrained ones never appear here)."""
        self._needs_sync: set[str] = set()
        """Sequences whose sampling reads the values of earlier outputs (penalties): while one
        runs, every step waits for the one before (no async scheduling)."""
        self._in_flight: list[SchedulerOutput] | None = None
        """Async scheduling: the step submitted to the executor whose tokens are not back yet."""
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_resumptions = 0
        """Sequences resumed on a fresh group after their group's workers died."""
        self.compute_seconds = 0.0

    def _reset_schedulers(self) -> None:
        """One scheduler and block manager per data-parallel rank (each rank's KV is its own), and
        the scheduler of sharded sequences over all of them."""
        cache = self.config.cache
        self.block_managers = [BlockManager(self.executor.num_blocks, cache.block_size, cache.enable_prefix_caching)
                               for _ in range(self.num_ranks)]
        self.schedulers = [Scheduler(self.config.scheduler, bm, self.max_model_len) for bm in self.block_managers]
        threshold = self.config.parallel.sequence_parallel_min_tokens
        window = self.executor.model_config.sliding_window
        if threshold and window is not None:
            raise ValueError(f"sequence_parallel_min_tokens: this model attends within a sliding window of {window} "
                             "tokens, which sharded attention does not apply; leave it unset or 0")
        if threshold is None:
            threshold = SEQUENCE_PARALLEL_MIN_TOKENS if self.num_ranks > 1 and window is None else 0
        self.sharded = ShardedScheduler(self.config.scheduler, self.schedulers, self.max_model_len, threshold)

    def _scheduler_of(self, seq: _Sequence) -> Scheduler | ShardedScheduler:
        return self.sharded if seq.sharded else self.schedulers[seq.rank]

    @property
    def scheduler(self) -> Scheduler:
        """Rank 0's scheduler (the only one when attention is not data-parallel)."""
        return self.schedulers[0]

    @property
    def block_manager(self) -> BlockManager:
        """Rank 0's block manager (the only one when attention is not data-parallel)."""
        return self.block_managers[0]

    def _pick_rank(self) -> int:
        """The data-parallel rank with the fewest requests (lowest index on a tie)."""
        load = [s.num_running + s.num_waiting + self.sharded.load(r) for r, s in enumerate(self.schedulers)]
        return load.index(min(load))

    # ---- requests -------------------------------------------------------------------------

    @property
    def grammar_backend(self) -> GrammarBackend:
        """The xgrammar vocabulary and compiler processes, built on first use (unconstrained serving
        never pays). Thread-safe: requests are prepared on their callers' threads."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids, self.config.limits)
            return self._grammar

    def validate_guided_decoding(self, params: SamplingParams,
                                 prompt_token_ids: list[int] | None = None) -> CompiledGuide | None:
        """Compile what the request's guided_decoding (and thinking) need; ValueError naming the
        problem ("invalid JSON schema: ...", "invalid regex ...", "invalid grammar ...", a cap, or the
        compile time budget) if it cannot be. Without prompt ids, checks the grammar as if the answer
        started at once and after thinking."""
        if params.guided_decoding is None and params.thinking_budget is None:
            return None
        if prompt_token_ids is None:
            if params.guided_decoding is not None:
                self.grammar_backend.compile(params.guided_decoding)
                self.grammar_backend.compile(params.guided_decoding, after_thinking=True)
            return None
        return self.grammar_backend.compile_for(params, prompt_token_ids)

    def prepare(self, prompt_token_ids: list[int], params: SamplingParams) -> concurrent.futures.Future:
        """Check a request (ValueError naming the problem, at once) and start compiling what it
        needs in the grammar compiler processes: a Future of the `CompiledGuide` (or None) to hand
        to `add_request`, which fails with ValueError if the grammar is invalid or too slow to
        compile. Safe on any thread; the caller waits, never the step loop."""
        self._check(prompt_token_ids, params)
        if params.guided_decoding is None and params.thinking_budget is None:
            return done_future(None)
        return self.grammar_backend.compile_for_async(params, prompt_token_ids)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> CompiledGuide | None:
        """Raise ValueError naming the problem if this request cannot run (grammars included, which
        this compiles and waits for); returns what `add_request` needs compiled."""
        return self.prepare(prompt_token_ids, params).result()

    def _check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The cheap checks (no grammar is compiled here)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt is {len(prompt_token_ids)} tokens, longer than this model allows: "
                f"max_model_len is {self.max_model_len} (prompt plus at least one generated token)")
        limits = self.config.limits
        if len(params.stop) > limits.max_stop_strings:
            raise ValueError(f"stop: {len(params.stop)} stop strings, over the limit of {limits.max_stop_strings} "
                             "(max_stop_strings)")
        longest = max(map(len, params.stop), default=0)
        if longest > limits.max_stop_string_chars:
            raise ValueError(f"stop: a stop string of {longest} characters, over the limit of "
                             f"{limits.max_stop_string_chars} (max_stop_string_chars)")
        if params.top_k > self.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size ({self.vocab_size}), got {params.top_k}")
        if params.thinking_budget is not None and params.thinking_budget > self.max_model_len:
            raise ValueError(f"thinking_budget must be at most max_model_len ({self.max_model_len}), "
                             f"got {params.thinking_budget}")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}); got {bad[:5]}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = True, compiled: CompiledGuide | None = None,
                    resume: Resume | None = None) -> None:
        """Queue a request. With stream=True, every step that changes it yields a RequestOutput
        (deltas and totals so far); with stream=False, only the final one (vLLM's FINAL_ONLY).
        `compiled` is what `prepare` gave; without it a constrained request is compiled here,
        waiting (the offline `LLM` does that; the async engine never does, so its loop never waits).
        `resume`: the request ran elsewhere (an engine replica that died) and streamed these tokens
        and this text: it goes on from there (n = 1 only)."""
        prompt_token_ids = list(prompt_token_ids)
        self._check(prompt_token_ids, params)
        if resume is not None:
            self._check_resume(resume, params)
        if compiled is None and (params.guided_decoding is not None or params.thinking_budget is not None):
            compiled = self.grammar_backend.compile_for(params, prompt_token_ids)
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [i for i in [request_id, *child_ids] if i in self._parents or i in self._sequences]
        if taken:  # checked before anything changes, so a rejected request leaves no trace
            raise ValueError(f"request id {taken[0]!r} is already in use")
        parent = _Parent(request_id, prompt, prompt_token_ids, stream)
        rank = self._pick_rank()  # all n sequences on one rank: they share the prompt's blocks
        sharded = self.sharded.wants(len(prompt_token_ids))  # or over all ranks, `rank` their home
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                child_params = replace(params, n=1, seed=seed)
            req = Request(child_id, prompt_token_ids, child_params, self.eos_token_ids)
            if compiled is not None:  # one matcher per sequence; the compiled grammar is shared
                self._guides[child_id] = self.grammar_backend.guide(child_params, prompt_token_ids, compiled)
            self._sequences[child_id] = _Sequence(
                req, request_id, rank,
                IncrementalDetokenizer(self.tokenizer.raw, prompt_token_ids, params.skip_special_tokens),
                StopChecker(params.stop, params.include_stop_str_in_output),
                CompletionOutput(index, logprobs=[] if params.logprobs is not None else None,
                                 cumulative_logprob=0.0 if params.logprobs is not None else None),
                frozenset(params.stop_token_ids), sharded=sharded)
            parent.children.append(child_id)
            if _reads_outputs(child_params):
                self._needs_sync.add(child_id)
            if resume is not None:
                try:
                    self._prime(self._sequences[child_id], resume)
                except ValueError:  # nothing of the request stays behind
                    del self._sequences[child_id]
                    self._forget(child_id)
                    raise
            if sharded:
                self.sharded.add_request(req, rank)
            else:
                self.schedulers[rank].add_request(req)
            self._new.append(NewRequest(child_id, prompt_token_ids, child_params, self.eos_token_ids, rank,
                                        output_token_ids=list(req.output_token_ids)))
        self._parents[request_id] = parent

    def _check_resume(self, resume: Resume, params: SamplingParams) -> None:
        if params.n != 1:
            raise ValueError("resume: only a request with n = 1 resumes")
        bad = [t for t in resume.token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"resume: token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        if params.max_tokens is not None and len(resume.token_ids) >= params.max_tokens:
            raise ValueError(f"resume: {len(resume.token_ids)} tokens already, max_tokens is {params.max_tokens}")

    def _prime(self, seq: _Sequence, resume: Resume) -> None:
        """Set a new sequence where a resumed one stood: its tokens computed again as its prompt's
        continuation, its detokenizer, stop strings and grammar advanced over them, and the text the
        client already has counted as streamed (what the old replica held back comes next)."""
        tokens = list(resume.token_ids)
        seq.request.output_token_ids = list(tokens)
        seq.request.num_resumptions = 1
        guide = self._guides.get(seq.request.request_id)
        if guide is not None and not all(guide.accept(t) for t in tokens):
            raise ValueError("resume: the tokens do not match the request's grammar")
        if guide is not None and guide.terminated:
            raise ValueError("resume: the tokens already complete the request's grammar")
        seq.detokenizer.add(tokens)
        text = seq.detokenizer.text
        if not text.startswith(resume.text):
            raise ValueError("resume: the text streamed is not the text of the tokens")
        if seq.stop_checker.resume(text, len(resume.text)) is not None:
            raise ValueError("resume: the text already holds one of the request's stop strings")
        seq.output.token_ids = list(tokens)
        seq.output.text = resume.text
        self.num_resumptions += 1

    def abort(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            for child_id in parent.children:
                seq = self._sequences.pop(child_id)
                self._scheduler_of(seq).finish(seq.request, RequestStatus.FINISHED_ABORTED)
                self._forget(child_id)
                self._release(child_id)

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def shutdown(self) -> None:
        """Stop the grammar compiler processes and release the executor's workers."""
        if self._in_flight is not None:
            self._finish_in_flight()
        if self._grammar is not None:
            self._grammar.shutdown()
        self.executor.shutdown()

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; the outputs of the tokens that came back.

        Async scheduling (`async_scheduling`, where the executor overlaps: one in-process GPU
        rank): the step is scheduled with the samples of the step still on the device as
        placeholders, submitted, and only then are that earlier step's tokens collected and
        applied, so the host's work of a step (scheduling, input staging, detokenizing, stops)
        runs while the GPU computes. A sequence that stops is found one step late: the step in
        flight computed one more token for it, which is dropped. Steps whose sampling needs the
        tokens before them (grammars, thinking, penalties) wait for the step in flight first."""
        overlap = self.can_overlap()
        if not overlap and self._in_flight is not None:
            self._finish_in_flight()
        sharded, outs = self._schedule()
        submitted = None
        if any(out.scheduled for out in outs) or (sharded is not None and sharded.scheduled):
            if overlap:
                submitted = self._submit(outs)
            else:
                self._run(outs, sharded)
        if self._in_flight is not None:
            self._finish_in_flight()
        # A step submitted for sequences that have all ended since stays in flight: the next step
        # (or shutdown) collects it and drops its tokens; returning now keeps the last outputs
        # from waiting for a step no one needs.
        self._in_flight = submitted
        return self._collect()

    def can_overlap(self) -> bool:
        """Whether the next step is scheduled while the one before is on the device (async
        scheduling on, an executor that overlaps, no grammar, thinking, penalty or sharded
        sequence running: the plan carries a sharded sequence's tokens, so it needs them known)."""
        return (self.config.scheduler.async_scheduling and getattr(self.executor, "overlaps_steps", False)
                and not self._guides and not self._needs_sync and not self.sharded.has_unfinished())

    def _schedule(self) -> tuple[ShardedOutput | None, list[SchedulerOutput]]:
        """The step's chunks in arrival order across ordinary and sharded sequences (the steps of
        engine/sharded.py's docstring): running sharded sequences, each rank's running requests
        and the admissions that came before the oldest waiting sharded sequence, then that
        sharded sequence's admission, then the admissions held back for it."""
        budget = self.config.scheduler.max_num_batched_tokens
        sp = self.sharded
        if not sp.has_unfinished():
            outs = [scheduler.schedule(budget) for scheduler in self.schedulers]
            self._note(outs)
            return None, outs
        world = self.num_ranks
        sharded = ShardedOutput((), np.zeros(world, dtype=np.int64))
        if sp.running:
            oldest = sp.oldest_running
            reserve = [min(budget, sum(req.num_tokens - req.num_computed_tokens if req.arrival_time < oldest else 1
                                       for req in scheduler.running)) for scheduler in self.schedulers]
            sharded = sp.schedule_running([budget - r for r in reserve])
        outs = [scheduler.schedule(budget - int(sharded.rows[r]), admit_before=sp.head_arrival)
                for r, scheduler in enumerate(self.schedulers)]
        if sp.waiting and not (sharded.preempted or sharded.preempted_ranks or any(o.preempted for o in outs)):
            used = sharded.rows + np.array([o.num_batched_tokens for o in outs])
            sharded = sharded + sp.admit([budget - int(u) for u in used])
            if not sp.waiting:
                used = sharded.rows + np.array([o.num_batched_tokens for o in outs])
                outs = [out if out.preempted else out + scheduler.admit(budget - int(u))
                        for out, scheduler, u in zip(outs, self.schedulers, used)]
        self.num_preemptions += len(sharded.preempted) + len(sharded.preempted_ranks)
        for error in sharded.errors:
            self._finish(self._sequences[error.request_id], RequestStatus.FINISHED_ERROR, error=error.message)
        self._note(outs)
        return sharded, outs

    def _note(self, outs: list[SchedulerOutput]) -> None:
        """Count the rank schedulers' preemptions, end the requests they refused."""
        for out in outs:
            self.num_preemptions += len(out.preempted)
            for error in out.errors:
                self._finish(self._sequences[error.request_id], RequestStatus.FINISHED_ERROR, error=error.message)

    def _plan(self, outs: list[SchedulerOutput], sharded: ShardedOutput | None = None) -> StepPlan:
        plan = StepPlan(
            new_requests=tuple(self._new),
            chunks_by_rank=tuple(
                RankChunks.from_chunks(Chunk(s.request.request_id, s.start, s.num_tokens, s.request.block_ids,
                                             s.samples) for s in out.scheduled)
                for out in outs),
            finished_request_ids=tuple(self._dropped),
            token_masks=self._token_masks(outs, sharded) if self._guides else (),
            sharded=() if sharded is None else self.sharded.chunks(sharded),
        )
        self._new, self._dropped = [], []
        return plan

    def _run(self, outs: list[SchedulerOutput], sharded: ShardedOutput | None = None) -> None:
        plan = self._plan(outs, sharded)
        try:
            result = self.executor.execute(plan)
        except ExecutorDiedError as exc:
            log.error("the executor's workers died: %s", exc)
            self._fail_all(f"the engine's workers failed and were replaced: {exc}")
            return
        except Exception as exc:
            self._step_failed(outs, exc, plan, sharded)
            return
        if sharded is not None:
            self.sharded.update(sharded, {rid: tok.token_id for rid, tok in result.sampled.items()})
        self._apply(outs, result, advanced=False, sharded=sharded)

    def _submit(self, outs: list[SchedulerOutput]) -> list[SchedulerOutput] | None:
        """Async scheduling: advance the schedulers past this step (placeholders for its samples)
        and hand it to the executor without waiting; the step's outputs, or None if it failed."""
        plan = self._plan(outs)
        for scheduler, out in zip(self.schedulers, outs):
            scheduler.advance(out)
        try:
            self.executor.submit(plan)
        except ExecutorDiedError as exc:
            log.error("the executor's workers died: %s", exc)
            self._fail_all(f"the engine's workers failed and were replaced: {exc}")
            return None
        except Exception as exc:
            self._step_failed(outs, exc, plan)
            return None
        return outs

    def _finish_in_flight(self) -> None:
        """Wait for the step in flight and apply its tokens."""
        outs, self._in_flight = self._in_flight, None
        try:
            result = self.executor.collect()
        except ExecutorDiedError as exc:
            log.error("the executor's workers died: %s", exc)
            self._fail_all(f"the engine's workers failed and were replaced: {exc}")
            return
        except Exception as exc:
            self._step_failed(outs, exc)
            return
        self._apply(outs, result, advanced=True)

    def _step_failed(self, outs: list[SchedulerOutput], exc: Exception, plan: StepPlan | None = None,
                     sharded: ShardedOutput | None = None) -> None:
        """A step raised: its requests end with an error, the engine goes on."""
        log.error("step failed", exc_info=exc)
        failed = {s.request.request_id for out in [*outs, *([sharded] if sharded else [])] for s in out.scheduled}
        for request_id in failed:
            seq = self._sequences.get(request_id)
            if seq is not None and not seq.output.finished:
                self._finish(seq, RequestStatus.FINISHED_ERROR,
                             error=f"the engine failed while running this request: {exc}")
        if plan is not None:  # requests that arrived with this plan but did not run it are announced again
            self._new = [n for n in plan.new_requests if n.request_id not in failed] + self._new

    def _apply(self, outs: list[SchedulerOutput], result: StepResult, advanced: bool,
               sharded: ShardedOutput | None = None) -> None:
        self.num_steps += 1
        self.compute_seconds += result.compute_seconds
        sampled = result.sampled
        token_ids = {rid: tok.token_id for rid, tok in sampled.items()}
        for scheduler, out in zip(self.schedulers, outs):
            scheduler.update(out, token_ids, advanced=advanced)
        scheduled = {s.request.request_id: s.request for out in [*outs, *([sharded] if sharded else [])]
                     for s in out.scheduled}
        for rid, token in sampled.items():
            seq = self._sequences.get(rid)
            # Under async scheduling a sequence may have ended (stopped, aborted) while this step
            # was on the device, and its id may even be in use again: its extra token is dropped.
            if seq is not None and seq.request is scheduled.get(rid) and not seq.output.finished:
                self._on_token(seq, token)

    def _token_masks(self, outs: list[SchedulerOutput],
                     sharded: ShardedOutput | None = None) -> tuple[TokenMasks | None, ...]:
        """Per rank, the packed masks of guided sequences that sample this step: one int32 array
        for the step, a row per such sequence, filled by its guide (grammar and thinking phase).
        A sharded sequence's row is its home rank's."""
        scheduled = [list(out.scheduled) for out in outs]
        for s in sharded.scheduled if sharded is not None else ():
            scheduled[self.sharded.homes[s.request.request_id]].append(s)
        per_rank = [[(s.request.request_id, guide) for s in items if s.samples
                     and (guide := self._guides.get(s.request.request_id)) is not None and guide.needs_mask]
                    for items in scheduled]
        total = sum(len(rows) for rows in per_rank)
        if not total:
            return ()
        bitmask = self.grammar_backend.allocate(total)
        array = bitmask.numpy()  # shares memory: the rows filled below are the plan's
        masks, row = [], 0
        for rows in per_rank:
            start = row
            for _, guide in rows:
                guide.fill_mask(bitmask, row)
                row += 1
            masks.append(TokenMasks(tuple(rid for rid, _ in rows), array[start:row]) if rows else None)
        return tuple(masks)

    def _release(self, request_id: str) -> None:
        """Tell the ranks to drop a sequence with the next plan, or, if they have not heard of it
        yet, not announce it at all: a plan's drops then always concern sequences announced by
        earlier plans, so the ranks drop before they add and an id may be reused at once."""
        unsent = [n for n in self._new if n.request_id != request_id]
        if len(unsent) < len(self._new):
            self._new = unsent
        else:
            self._dropped.append(request_id)

    def _forget(self, request_id: str) -> None:
        """Drop what a sequence held beside its scheduler state (its grammar matcher)."""
        self._needs_sync.discard(request_id)
        guide = self._guides.pop(request_id, None)
        if guide is not None:
            guide.close()

    def _fail_all(self, error: str) -> None:
        """The executor's workers died (a rank of the group, or the group's step timed out): a fresh
        group is started, the block managers are rebuilt for its cache, and every sequence in
        flight resumes on it from its prompt and the tokens it has produced (recomputed, as after a
        preemption: the stream goes on, and greedy decoding gives the tokens it would have given).
        Its detokenizer, stop strings and grammar live here and go on as they were. A sequence
        that has resumed `max_resumptions` times already ends with the error instead. If the
        restart fails, the next step's execute fails again and the count goes up."""
        resumable = []
        for seq in list(self._sequences.values()):
            if seq.output.finished:
                continue
            if seq.request.num_resumptions < self.config.parallel.max_resumptions:
                resumable.append(seq)
                continue
            seq.output.finish_reason = RequestStatus.FINISHED_ERROR.value
            seq.output.error = (f"{error} (the request was resumed {seq.request.num_resumptions} times, "
                                f"max_resumptions)")
            seq.changed = True
            self._forget(seq.request.request_id)
        self._in_flight = None
        self._new, self._dropped = [], []
        try:
            self.executor.restart()
        except Exception:
            log.exception("restarting the executor failed")
        self._reset_schedulers()
        for seq in resumable:
            self._resume(seq)
        if resumable:
            log.warning("%s: %d sequences resume on the fresh group", error, len(resumable))

    def _resume(self, seq: _Sequence) -> None:
        """Queue `seq` again on the fresh schedulers: its prompt and the tokens it has produced (what
        the client has seen: `seq.output.token_ids`) to recompute, then on from there."""
        old = seq.request
        req = Request(old.request_id, old.prompt_token_ids, old.params, old.eos_token_ids,
                      arrival_time=old.arrival_time)
        req.output_token_ids = list(seq.output.token_ids)
        req.num_resumptions = old.num_resumptions + 1
        req.num_preemptions = old.num_preemptions
        seq.request = req
        self.num_resumptions += 1
        if seq.sharded:
            self.sharded.add_request(req, seq.rank)
        else:
            self.schedulers[seq.rank].add_request(req)
        self._new.append(NewRequest(req.request_id, req.prompt_token_ids, req.params, req.eos_token_ids, seq.rank,
                                    output_token_ids=list(req.output_token_ids)))

    def _on_token(self, seq: _Sequence, token: SampledToken) -> None:
        req, params, output = seq.request, seq.request.params, seq.output
        output.token_ids.append(token.token_id)
        output.token_ids_delta.append(token.token_id)
        if output.logprobs is not None:
            entry = dict(token.top_logprobs)
            entry[token.token_id] = token.logprob
            output.logprobs.append(entry)
            output.logprobs_delta = (output.logprobs_delta or []) + [entry]
            output.cumulative_logprob += token.logprob
        seq.changed = True

        num_out = len(output.token_ids)  # req's own list may hold a placeholder beyond (async scheduling)
        status, stop_reason = None, None
        guide = self._guides.get(req.request_id) if self._guides else None
        if guide is not None:
            if not guide.accept(token.token_id):
                self._finish(seq, RequestStatus.FINISHED_ERROR,
                             error=f"sampled token {token.token_id} does not match the request's grammar")
                return
            if guide.terminated:  # the grammar is complete and took EOS: ends even with ignore_eos/min_tokens
                status = RequestStatus.FINISHED_STOPPED
        if status is None and num_out >= params.min_tokens:
            if token.token_id in seq.stop_token_ids:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, token.token_id
            elif not params.ignore_eos and token.token_id in req.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
        if status is None:  # a stop token's own text never reaches the output
            seq.detokenizer.add([token.token_id])
            update = seq.stop_checker.update(seq.detokenizer.text, check=num_out >= params.min_tokens)
            output.text_delta += update.delta
            output.text += update.delta
            if update.stop_str is not None:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, update.stop_str
        if status is None and (
            (params.max_tokens is not None and num_out >= params.max_tokens)
            or req.num_prompt_tokens + num_out >= self.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            req.stop_reason = stop_reason
            self._finish(seq, status)

    def _finish(self, seq: _Sequence, status: RequestStatus, error: str | None = None) -> None:
        if not seq.stop_checker.stopped:  # release held-back text, also of a request that failed
            seq.detokenizer.flush()
            update = seq.stop_checker.update(seq.detokenizer.text, finished=True)
            seq.output.text_delta += update.delta
            seq.output.text += update.delta
        self._scheduler_of(seq).finish(seq.request, status)
        self._forget(seq.request.request_id)
        seq.output.finish_reason = status.value
        seq.output.stop_reason = seq.request.stop_reason
        seq.output.error = error
        seq.changed = True
        self._release(seq.request.request_id)

    def _collect(self) -> list[RequestOutput]:
        outputs = []
        for parent_id in list(self._parents):
            parent = self._parents[parent_id]
            seqs = [self._sequences[c] for c in parent.children]
            changed = [s for s in seqs if s.changed]
            finished = all(s.output.finished for s in seqs)
            if not changed or not (parent.stream or finished):
                continue
            # A streamed output carries totals (text, token ids, logprobs, the prompt) only once its
            # sequence has finished; before that only the deltas: copying and shipping totals every
            # step would cost O(length) per request per step.
            outputs.append(RequestOutput(
                parent_id, parent.prompt if finished else None, parent.prompt_token_ids if finished else [],
                [s.output.snapshot() if s.output.finished else s.output.delta_only() for s in changed], finished,
                num_cached_tokens=max(s.request.num_cached_tokens for s in seqs)))
            for s in changed:
                s.changed = False
                s.output.text_delta, s.output.token_ids_delta, s.output.logprobs_delta = "", [], None
            if finished:
                del self._parents[parent_id]
                for c in parent.children:
                    del self._sequences[c]
        return outputs

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Totals over the data-parallel ranks."""
        bms = self.block_managers
        num_blocks = sum(bm.num_blocks for bm in bms)
        return {
            "num_running": sum(s.num_running for s in self.schedulers) + self.sharded.num_running,
            "num_waiting": sum(s.num_waiting for s in self.schedulers) + self.sharded.num_waiting,
            "kv_usage": sum(bm.usage * bm.num_blocks for bm in bms) / num_blocks,
            "num_free_blocks": sum(bm.num_free_blocks for bm in bms),
            "num_blocks": num_blocks,
            "prefix_cache_queries": sum(bm.prefix_cache_queries for bm in bms),
            "prefix_cache_hits": sum(bm.prefix_cache_hits for bm in bms),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "num_resumptions": self.num_resumptions,
        }

    def expert_load(self):
        return self.executor.expert_load()


def _reads_outputs(params: SamplingParams) -> bool:
    """Whether sampling reads the values of the sequence's earlier tokens (penalties do)."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0

