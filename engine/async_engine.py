"""`AsyncEngine`: an `EngineCore` driven by its own thread, with requests as async streams.

    asyncio callers ──add/abort (command queue)──▶ engine thread: loop { apply commands; step() }
                    ◀──RequestOutput per step (loop.call_soon_threadsafe into a per-request queue)──

Only the engine thread touches the `EngineCore`'s requests, so a long model step never blocks the
event loop and callers never race the scheduler. Grammars are compiled before a request is queued,
in the grammar compiler processes (`EngineCore.prepare`): the caller awaits them, the engine loop
never does, so a schema that takes minutes to compile delays nobody else. A request's stream is
an async generator: leaving it early (a client that disconnected, a cancelled task) aborts the
request on the next loop turn, which frees its KV blocks. A stream yields lists: everything that
arrived for the request since the consumer last looked, so a slow consumer catches up in one
message instead of one per step.

The engine thread beats once per loop turn (after every step, and every `idle_wait_s` while it
waits for work). `heartbeat()` reads that beat from any thread without waiting on the engine, so
a health check can tell a busy engine that makes progress from one stuck in a step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from expertmesh.engine.core import EngineCore, Resume
from expertmesh.engine.outputs import CompletionOutput, RequestOutput
from expertmesh.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or crashed), or the replica that ran it is gone;
    no request can run there."""


@dataclass(frozen=True)
class EngineHeartbeat:
    """What a health check needs to know of an engine, read without waiting on it.

    `busy`: the engine thread is working (a step, or applying requests), not waiting for work.
    `seconds_since_beat`: since the thread last finished a loop turn (a step, or an idle wait);
    a busy engine whose beat grows past a limit is stuck. `num_requests`: requests whose callers
    wait on this engine. `error`: why the thread stopped, when it did."""
    alive: bool
    busy: bool
    seconds_since_beat: float
    num_requests: int
    error: str | None = None


class AsyncEngine:
    def __init__(self, core: EngineCore, idle_wait_s: float = 0.5) -> None:
        self.core = core
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams (event loop threads vs the engine thread)
        self._wake = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._stopped = False
        self._error: BaseException | None = None
        self._stats: dict[str, float] = core.stats()
        self._beat = time.monotonic()
        self._busy = True  # until the loop first waits for work
        self._thread = threading.Thread(target=self._loop, name="expertmesh-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any event loop) ----------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, resume: Resume | None = None) -> AsyncIterator[list[RequestOutput]]:
        """Stream a request's outputs (each a list of one or more step outputs, deltas in order).
        Bad input raises ValueError before anything is queued; that includes a grammar that is
        invalid, over a cap or too slow to compile, which this awaits (compiled in the grammar
        processes: neither this event loop nor the engine loop waits for it)."""
        self._check_alive()
        if params.guided_decoding is None and params.thinking_budget is None:
            prepared = self.core.prepare(prompt_token_ids, params)  # cheap checks only
        else:  # caps and the first use of the grammar backend (building the vocabulary) off the loop
            prepared = await asyncio.to_thread(self.core.prepare, prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        finished = False
        try:
            # A caller that leaves while this waits cancels only its own Future: the compile runs
            # on (or is killed at its time budget) and nothing of the request was queued.
            compiled = await asyncio.wrap_future(prepared)
            added = stream.loop.create_future()
            self._submit(("add", request_id, list(prompt_token_ids), params, prompt, added, compiled, resume))
            await added  # add_request's own ValueError (e.g. a request id in use) lands here
            while not finished:
                batch = [await stream.queue.get()]
                while not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
                finished = batch[-1].finished
                yield batch
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._submit(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def stats(self) -> dict[str, float]:
        """The engine's counters as of its last step (a snapshot; no wait on the engine)."""
        return dict(self._stats)

    async def call(self, fn):
        """Run fn(core) on the engine thread between steps (e.g. reading counters the workers hold)."""
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self._submit(("call", fn, future))
        return await future

    def heartbeat(self) -> EngineHeartbeat:
        """The engine thread's last beat (no wait on the engine: safe while it is stuck)."""
        with self._lock:
            num_requests = len(self._streams)
        return EngineHeartbeat(alive=self.alive, busy=self._busy, seconds_since_beat=time.monotonic() - self._beat,
                               num_requests=num_requests, error=None if self._error is None else str(self._error))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped and self._error is None

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.core.shutdown()

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineDeadError(f"the engine is not running{f': {self._error}' if self._error else ''}")

    # ---- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._apply_commands()
                if not self.core.has_unfinished():
                    self._stats = self.core.stats()
                    self._busy = False
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    self._beat, self._busy = time.monotonic(), True
                    continue
                outputs = self.core.step()
                self._beat = time.monotonic()
                self._stats = self.core.stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the engine cannot go on: fail every stream, loudly
            log.exception("the engine loop crashed")
            self._error = exc
            with self._lock:
                streams = list(self._streams.items())
            for request_id, _ in streams:
                self._deliver(request_id, EngineDeadError(f"the engine crashed: {exc}"))
            raise

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.core.abort(command[1])
                continue
            if command[0] == "call":
                _, fn, future = command
                try:
                    result, error = fn(self.core), None
                except Exception as exc:
                    result, error = None, exc
                _settle(future.get_loop(), future, error, result)
                continue
            _, request_id, ids, params, prompt, added, compiled, resume = command
            with self._lock:
                stream = self._streams.get(request_id)
            if stream is None:  # the caller left before its request was added
                continue
            try:
                self.core.add_request(request_id, ids, params, prompt=prompt, stream=True, compiled=compiled,
                                      resume=resume)
            except ValueError as exc:
                _settle(stream.loop, added, exc)
            else:
                _settle(stream.loop, added, None)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: it is not listening any more
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: BaseException | None,
            result=None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


def merge_outputs(batch: list[RequestOutput]) -> RequestOutput:
    """Several step outputs of one request as one: deltas joined, totals from the newest."""
    if len(batch) == 1:
        return batch[0]
    by_index: dict[int, CompletionOutput] = {}
    for out in batch:
        for c in out.outputs:
            prev = by_index.get(c.index)
            if prev is None:
                by_index[c.index] = c
                continue
            logprobs_delta = None
            if prev.logprobs_delta is not None or c.logprobs_delta is not None:
                logprobs_delta = (prev.logprobs_delta or []) + (c.logprobs_delta or [])
            by_index[c.index] = CompletionOutput(
                c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason,
                c.error, prev.text_delta + c.text_delta, prev.token_ids_delta + c.token_ids_delta, logprobs_delta)
    last = batch[-1]
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids,
                         [by_index[i] for i in sorted(by_index)], last.finished, last.num_cached_tokens)
