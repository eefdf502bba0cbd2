"""Grammar compilation off the step loop: a few compiler processes, each job with a time budget.

    GrammarBackend.compile_async ──submit(spec)──▶ queue ──slot thread──▶ compiler process
                                                               │  (build_grammar + compile_grammar)
          concurrent Future ◀── serialized CompiledGrammar ◀───┘  or ValueError (invalid, or too slow)

Why processes: xgrammar releases the GIL while it compiles, so a thread would keep the engine
responsive, but a thread cannot be stopped. A JSON schema with 100,000 enum values compiles for
minutes on every core; a process that runs past `timeout_s` is killed, so an abandoned compile
costs nothing after its budget (the next job gets a fresh process). The budget counts from the
moment a ready process takes the job: starting a process (importing xgrammar, about 2 s) and
waiting in the queue are not the job's fault.

Each slot thread owns one process and talks to it over a socket pair (pickled messages):

    parent → child   {"tokenizer_info": json, "max_threads": n, "tool_tokens": ToolTokens}   once
    child  → parent  ("ready",)
    parent → child   GrammarSpec                                                              per job
    child  → parent  ("ok", serialized CompiledGrammar) | ("error", message)

A process is started as `python -m expertmesh.engine.grammar_pool FD` with the parent's
`sys.path`, so it imports the same expertmesh as the engine; it exits when its socket closes or
its parent is gone.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection

from expertmesh.engine.grammar_build import GrammarSpec, ToolTokens, build_grammar, xgrammar_message

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 300.0
"""How long a compiler process may take to import xgrammar and load the vocabulary."""
_POLL_S = 0.25
_WORKER_NICENESS = 5
"""Compiler processes yield the CPU to the step loop when both want it."""


class GrammarCompileTimeout(ValueError):
    """A grammar took longer than its budget to compile (its compile was abandoned)."""


class GrammarCompilePool:
    """`workers` compiler processes for one vocabulary. `submit` is thread-safe and returns a
    concurrent Future of the serialized compiled grammar (`CompiledGrammar.serialize_json()`),
    failing with ValueError naming the problem, or `GrammarCompileTimeout`."""

    def __init__(self, tokenizer_info_json: str, tool_tokens: ToolTokens, *, workers: int, timeout_s: float,
                 max_threads: int) -> None:
        self.timeout_s = timeout_s
        self._init = {"tokenizer_info": tokenizer_info_json, "max_threads": max_threads, "tool_tokens": tool_tokens}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = [_Slot(self, i) for i in range(workers)]
        self._closed = False
        self.num_killed = 0
        """Compiler processes killed for running past the budget (for tests and logs)."""
        self._finalizer = weakref.finalize(self, _stop_all, list(self._slots), self._jobs)
        for slot in self._slots:
            slot.thread.start()

    def submit(self, spec: GrammarSpec) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the grammar compiler pool is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((spec, future))
        return future

    def processes(self) -> list[subprocess.Popen]:
        """The compiler processes alive now."""
        return [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]

    def shutdown(self) -> None:
        self._closed = True
        self._finalizer()
        for slot in self._slots:
            slot.thread.join(timeout=10)


class _Slot:
    """One compiler process and the thread that feeds it jobs."""

    def __init__(self, pool: GrammarCompilePool, index: int) -> None:
        self.pool_ref = weakref.ref(pool)
        self.jobs = pool._jobs
        self.init = pool._init
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self._lock = threading.Lock()  # kill() runs on the slot thread and at shutdown
        self.thread = threading.Thread(target=self._loop, name=f"expertmesh-grammar-{index}", daemon=True)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            spec, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._compile(spec))
            except BaseException as exc:  # every failure reaches the waiter; the slot goes on
                future.set_exception(exc)

    def _compile(self, spec: GrammarSpec) -> str:
        conn, proc = self._ensure_started()
        pool = self.pool_ref()
        timeout_s = pool.timeout_s if pool is not None else 0.0
        try:
            conn.send(spec)
            deadline = time.monotonic() + timeout_s
            while not conn.poll(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    self.kill()
                    if pool is not None:
                        pool.num_killed += 1
                    log.warning("a %s grammar took longer than %.3g s to compile; its compiler process was "
                                "killed", spec.kind, timeout_s)
                    raise GrammarCompileTimeout(
                        f"guided_decoding ({spec.kind}) did not compile within {timeout_s:g} s "
                        f"(grammar_compile_timeout_s): use a smaller or simpler {_what(spec.kind)}")
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:  # the process died under this job (or was shut down)
            code = proc.poll()
            self.kill()
            raise ValueError(f"guided_decoding ({spec.kind}): the grammar compiler failed on this "
                             f"{_what(spec.kind)} (process exit code {code}): {exc or type(exc).__name__}") from None
        if status == "error":
            raise ValueError(payload)
        return payload

    def _ensure_started(self) -> tuple[Connection, subprocess.Popen]:
        with self._lock:
            conn, proc = self.conn, self.proc
        if conn is not None and proc is not None and proc.poll() is None:
            return conn, proc
        self.kill()
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the engine's own expertmesh
        try:
            proc = subprocess.Popen([sys.executable, "-m", "expertmesh.engine.grammar_pool", str(child.fileno())],
                                    pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        conn = Connection(parent.detach())
        with self._lock:
            self.conn, self.proc = conn, proc
        try:
            conn.send(self.init)
            if not conn.poll(_STARTUP_TIMEOUT_S):
                raise RuntimeError(f"the grammar compiler process did not start within {_STARTUP_TIMEOUT_S:g} s")
            ready = conn.recv()
            if ready != ("ready",):
                raise RuntimeError(f"the grammar compiler process failed to start: {ready!r}")
        except (EOFError, OSError) as exc:
            self.kill()
            raise RuntimeError(f"the grammar compiler process exited while starting (exit code {proc.poll()}): "
                               f"{exc or type(exc).__name__}") from None
        except BaseException:
            self.kill()
            raise
        return conn, proc

    def kill(self) -> None:
        with self._lock:
            conn, proc, self.conn, self.proc = self.conn, self.proc, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _stop_all(slots: list[_Slot], jobs: queue.SimpleQueue) -> None:
    """Kills every compiler process and ends the slot threads (at shutdown, or when the pool is
    collected or the interpreter exits)."""
    for slot in slots:
        jobs.put(None)
        with contextlib.suppress(Exception):  # at interpreter exit, as much as can be done
            slot.kill()


def _what(kind: str) -> str:
    return {"json": "JSON schema", "tool_calls": "set of tool parameter schemas", "choice": "list of choices",
            "grammar": "grammar", "regex": "regex"}.get(kind, kind)


# ---- the compiler process ---------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _serve(fd: int) -> None:
    import xgrammar as xgr

    conn = Connection(fd)
    try:
        init = conn.recv()
    except EOFError:
        return
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(OSError):
        os.nice(_WORKER_NICENESS)
    info = xgr.TokenizerInfo.deserialize_json(init["tokenizer_info"])
    compiler = xgr.GrammarCompiler(info, max_threads=init["max_threads"], cache_enabled=False)
    tool_tokens = init["tool_tokens"]
    conn.send(("ready",))
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        try:
            grammar = build_grammar(spec, tool_tokens)
            try:
                compiled = compiler.compile_grammar(grammar)
            except Exception as e:
                raise ValueError(f"invalid guided_decoding ({spec.kind}): {xgrammar_message(e)}") from e
            reply = ("ok", compiled.serialize_json())
        except ValueError as e:
            reply = ("error", str(e))
        except RecursionError:
            reply = ("error", f"invalid guided_decoding ({spec.kind}): nested too deeply")
        except Exception as e:  # anything else about this spec is still the spec's problem
            reply = ("error", f"invalid guided_decoding ({spec.kind}): {type(e).__name__}: {e}")
        conn.send(reply)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
