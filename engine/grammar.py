"""Constrained decoding and thinking, on the driver: grammars compiled once, one matcher per sequence.

    GuidedDecodingParams ──GrammarBackend.compile_async──▶ Future of an xgrammar CompiledGrammar
        (size caps checked at once; built and compiled in a compiler process with a time budget,
         engine/grammar_pool.py; cached per engine, and one compile shared by identical requests)
    add_request ──GrammarBackend.guide──▶ SequenceGuide (one per sequence; None if nothing to do)
    each step:  guide.needs_mask ──fill_mask──▶ one int32 bitmask row ──StepPlan──▶ ranks (unpacked there)
    each token: guide.accept(token) ──▶ phase transition / matcher advance / terminated

A sequence of a `reasoning` request goes through phases (Qwen3's `<think>…</think>`):

    PENDING  --<think>--> THINKING --</think>--> ANSWER
    PENDING  --any other token (fed to the grammar)--> ANSWER

The start phase comes from the prompt's last turn (tokens after the last `<|im_start|>`): an open
`<think>` (Thinking-2507 templates) starts in THINKING, a closed `</think>` (enable_thinking=False)
in ANSWER, anything else in PENDING. Without `reasoning`, or without think tokens in the
vocabulary, a sequence starts in ANSWER. Masks:

    PENDING   grammar's allowed tokens ∪ {<think>}  (a model that does not think is constrained at once)
    THINKING  none; only `</think>` once `thinking_budget` tokens were thought
    ANSWER    grammar's allowed tokens (after thinking, the grammar is prefixed with up to 8
              whitespace characters: Qwen writes "</think>\\n\\n" before its answer)

The matcher only sees ANSWER tokens. Its stop tokens are the engine's EOS ids: once the grammar
is complete the mask allows EOS (or more, where the grammar may go on), and a matcher that
accepted EOS is terminated: the sequence ends with finish_reason "stop", whatever `ignore_eos`
and `min_tokens` say (the grammar decides when a constrained answer ends).

Vocabulary: the tokenizer's tokens, byte-level decoded (`VocabType.BYTE_LEVEL` for GPT-2-style
BPE such as Qwen3's), with added non-special tokens (`<think>`, `<tool_call>`) as ordinary tokens
and special ones (`<|im_start|>`) never allowed; ids past the tokenizer up to the model's vocab
size never are either. Tool calls are an xgrammar structural tag whose `<tool_call>` and
`</tool_call>` are those single tokens.

The grammars themselves (JSON schemas with `json.dumps` spacing and no raw control character in
strings, regexes, choices, EBNF, tool calls) are built in engine/grammar_build.py.

Nothing here compiles on the caller's thread: the async engine awaits `compile_for_async` before
it queues a request, so the step loop only ever creates matchers from compiled grammars.
"""
from __future__ import annotations

import concurrent.futures
import enum
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from expertmesh.engine.config import LimitsConfig
from expertmesh.engine.grammar_build import GrammarSpec, ToolTokens, grammar_spec
from expertmesh.engine.grammar_pool import GrammarCompilePool
from expertmesh.engine.sampling_params import GuidedDecodingParams, SamplingParams

THINK_OPEN, THINK_CLOSE, TURN_START = "<think>", "</think>", "<|im_start|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CACHE_LIMIT_BYTES = 512 << 20
"""Compiled grammars kept (LRU): a server sees many schemas over its life."""


class Phase(enum.Enum):
    PENDING = "pending"
    THINKING = "thinking"
    ANSWER = "answer"


def bitmask_width(vocab_size: int) -> int:
    """int32 words per packed mask row."""
    return (vocab_size + 31) // 32


def _vocab_type(raw_tokenizer):
    """BYTE_LEVEL for a byte-level decoder (GPT-2 / Qwen BPE), BYTE_FALLBACK for `<0x..>` byte
    tokens (Llama / SentencePiece style), RAW otherwise."""
    import xgrammar as xgr

    types = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(raw_tokenizer.to_str()).get("decoder"))
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in types:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


@dataclass(frozen=True)
class CompiledGuide:
    """A request's compiled grammar: as given, and (if the request may think first) with
    leading whitespace allowed, for the answer after `</think>`."""
    plain: object | None
    after_thinking: object | None


class GrammarBackend:
    """One per `EngineCore`: the vocabulary as xgrammar sees it, the compiler processes, and the
    cache of compiled grammars. Thread-safe: requests are prepared on the callers' threads while
    the engine thread makes matchers and masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                 limits: LimitsConfig | None = None) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.limits = limits or LimitsConfig()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        raw = tokenizer.raw
        encoded = [""] * vocab_size  # "" marks a token xgrammar never allows (special, or past the tokenizer)
        for token, token_id in raw.get_vocab(with_added_tokens=True).items():
            if token_id < vocab_size:
                encoded[token_id] = token
        for token_id in tokenizer.special_token_ids:
            if token_id < vocab_size:
                encoded[token_id] = ""
        self.vocab_type = _vocab_type(raw)
        self.tokenizer_info = xgr.TokenizerInfo(encoded, self.vocab_type, vocab_size=vocab_size,
                                                stop_token_ids=self.stop_token_ids)
        self.think_open = tokenizer.token_to_id(THINK_OPEN)
        self.think_close = tokenizer.token_to_id(THINK_CLOSE)
        self.turn_start = tokenizer.token_to_id(TURN_START)
        self.tool_tokens = ToolTokens(tokenizer.token_to_id(TOOL_CALL_OPEN), tokenizer.token_to_id(TOOL_CALL_CLOSE))
        self.width = bitmask_width(vocab_size)
        self.pool = GrammarCompilePool(self.tokenizer_info.serialize_json(), self.tool_tokens,
                                       workers=self.limits.grammar_compile_workers,
                                       timeout_s=self.limits.grammar_compile_timeout_s,
                                       max_threads=min(8, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._cache_bytes = 0
        self._inflight: dict[GrammarSpec, concurrent.futures.Future] = {}
        """Compiles under way, by spec: identical requests wait on one compile."""

    @property
    def has_think_tokens(self) -> bool:
        return self.think_open is not None and self.think_close is not None

    def shutdown(self) -> None:
        self.pool.shutdown()

    # ---- compiling ------------------------------------------------------------------------------

    def compile_async(self, guided: GuidedDecodingParams, after_thinking: bool = False) -> concurrent.futures.Future:
        """A Future of the compiled grammar (`after_thinking` allows leading whitespace). The caps
        are checked at once (ValueError naming the setting); the Future fails with ValueError if the
        constraint is invalid or does not compile within the time budget. Each call gets its own
        Future, so a caller that stops waiting (cancels it) disturbs no other."""
        spec = grammar_spec(guided, self.limits, after_thinking)
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return done_future(hit)
            shared = self._inflight.get(spec)
            if shared is None:
                shared = self._inflight[spec] = concurrent.futures.Future()
                submitted = self.pool.submit(spec)
                submitted.add_done_callback(lambda f: self._settle(spec, shared, f))
        return _follow(shared)

    def compile(self, guided: GuidedDecodingParams, after_thinking: bool = False):
        """The compiled grammar, waiting for it (ValueError as for `compile_async`)."""
        return self.compile_async(guided, after_thinking).result()

    def _settle(self, spec: GrammarSpec, shared: concurrent.futures.Future, done: concurrent.futures.Future) -> None:
        """On a pool thread: deserialize the compiled grammar into this process and cache it."""
        compiled, error = None, done.exception()
        if error is None:
            try:
                compiled = self._xgr.CompiledGrammar.deserialize_json(done.result(), self.tokenizer_info)
            except Exception as exc:
                error = RuntimeError(f"the compiled grammar could not be loaded: {exc}")
        with self._lock:
            self._inflight.pop(spec, None)
            if compiled is not None:
                self._cache[spec] = compiled
                self._cache_bytes += compiled.memory_size_bytes
                while self._cache_bytes > _CACHE_LIMIT_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.memory_size_bytes
        if error is None:
            shared.set_result(compiled)
        else:
            shared.set_exception(error)

    @property
    def num_compiling(self) -> int:
        """Distinct compiles under way (or queued)."""
        with self._lock:
            return len(self._inflight)

    # ---- sequences -------------------------------------------------------------------------------

    def start_phase(self, params: SamplingParams, prompt_token_ids: list[int]) -> Phase:
        if not params.reasoning or not self.has_think_tokens:
            return Phase.ANSWER
        start = next((i for i in range(len(prompt_token_ids) - 1, -1, -1)
                      if prompt_token_ids[i] == self.turn_start), -1)
        tail = prompt_token_ids[start + 1:]
        opened = max((i for i, t in enumerate(tail) if t == self.think_open), default=-1)
        closed = max((i for i, t in enumerate(tail) if t == self.think_close), default=-1)
        if closed >= 0:
            return Phase.ANSWER if closed > opened else Phase.THINKING
        return Phase.THINKING if opened >= 0 else Phase.PENDING

    def compile_for_async(self, params: SamplingParams, prompt_token_ids: list[int]) -> concurrent.futures.Future:
        """A Future of what a request needs compiled (a `CompiledGuide`, or None if nothing is
        constrained and nothing tracked). Caps are checked at once, as in `compile_async`."""
        phase = self.start_phase(params, prompt_token_ids)
        guided = params.guided_decoding
        if guided is None:
            untracked = phase is Phase.ANSWER or params.thinking_budget is None
            return done_future(None if untracked else CompiledGuide(None, None))
        plain = self.compile_async(guided) if phase is not Phase.THINKING else done_future(None)
        after = self.compile_async(guided, after_thinking=True) if phase is not Phase.ANSWER else done_future(None)
        return _both(plain, after)

    def compile_for(self, params: SamplingParams, prompt_token_ids: list[int]) -> CompiledGuide | None:
        """`compile_for_async`, waiting for it."""
        return self.compile_for_async(params, prompt_token_ids).result()

    def guide(self, params: SamplingParams, prompt_token_ids: list[int],
              compiled: CompiledGuide | None = None) -> SequenceGuide | None:
        """A new sequence's guide (compiling unless `compiled` is given); None if it needs none."""
        compiled = compiled or self.compile_for(params, prompt_token_ids)
        if compiled is None:
            return None
        return SequenceGuide(self, compiled, self.start_phase(params, prompt_token_ids), params.thinking_budget)

    def allocate(self, n: int) -> torch.Tensor:
        """int32 [n, W] mask rows, to be filled by `SequenceGuide.fill_mask`."""
        return torch.empty((n, self.width), dtype=torch.int32)

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)


class SequenceGuide:
    """One sequence's phase, thinking count and grammar matcher (see the module doc)."""

    def __init__(self, backend: GrammarBackend, compiled: CompiledGuide, phase: Phase,
                 thinking_budget: int | None) -> None:
        self.backend = backend
        self.compiled = compiled
        self.phase = phase
        self.thinking_budget = thinking_budget
        self.thinking_tokens = 0
        self.matcher = None
        if phase is not Phase.THINKING and compiled.plain is not None:
            self.matcher = backend.matcher(compiled.plain)

    @property
    def budget_spent(self) -> bool:
        return self.thinking_budget is not None and self.thinking_tokens >= self.thinking_budget

    @property
    def needs_mask(self) -> bool:
        if self.phase is Phase.THINKING:
            return self.budget_spent
        return self.matcher is not None

    @property
    def terminated(self) -> bool:
        """The grammar is complete and accepted its stop token: the sequence is done."""
        return self.matcher is not None and self.matcher.is_terminated()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed tokens into bitmask[row] (call only when `needs_mask`)."""
        if self.phase is Phase.THINKING:
            bitmask[row] = 0
            _set_bit(bitmask, row, self.backend.think_close)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.phase is Phase.PENDING:
            _set_bit(bitmask, row, self.backend.think_open)

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False if the grammar rejects it (the mask was not applied)."""
        b = self.backend
        if self.phase is Phase.PENDING:
            if token_id == b.think_open:
                self.phase, self.matcher = Phase.THINKING, None
                return True
            self.phase = Phase.ANSWER
        elif self.phase is Phase.THINKING:
            if token_id == b.think_close:
                self.phase = Phase.ANSWER
                if self.compiled.after_thinking is not None:
                    self.matcher = b.matcher(self.compiled.after_thinking)
            else:
                self.thinking_tokens += 1
            return True
        return self.matcher is None or self.matcher.accept_token(token_id)

    def close(self) -> None:
        self.matcher = None


def done_future(value) -> concurrent.futures.Future:
    """A Future already settled with `value`."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future


def _follow(source: concurrent.futures.Future) -> concurrent.futures.Future:
    """A new Future settled as `source` is; cancelling it leaves `source` alone."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def copy(done: concurrent.futures.Future) -> None:
        if future.cancelled():
            return
        try:
            if done.exception() is None:
                future.set_result(done.result())
            else:
                future.set_exception(done.exception())
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    source.add_done_callback(copy)
    return future


def _both(plain: concurrent.futures.Future, after: concurrent.futures.Future) -> concurrent.futures.Future:
    """A Future of CompiledGuide(plain, after), failing with the first error of either."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    lock = threading.Lock()

    def settle(_) -> None:
        with lock:
            failed = [f.exception() for f in (plain, after) if f.done() and f.exception() is not None]
            try:
                if failed:
                    future.set_exception(failed[0])
                elif plain.done() and after.done():
                    future.set_result(CompiledGuide(plain.result(), after.result()))
            except concurrent.futures.InvalidStateError:  # settled already, or cancelled by its waiter
                pass

    plain.add_done_callback(settle)
    after.add_done_callback(settle)
    return future


def _set_bit(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    word = token_id >> 5
    words = bitmask[row].numpy().view(np.uint32)
    words[word] |= np.uint32(1 << (token_id & 31))
