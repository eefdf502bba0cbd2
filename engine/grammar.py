"""Constrained decoding and thinking, on the driver: grammars compiled once, one matcher per sequence.

    GuidedDecodingParams ──GrammarBackend.compile──▶ xgrammar CompiledGrammar (cached per engine)
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

JSON follows `json.dumps` spacing (`{"a": 1, "b": [2, 3]}`), not free whitespace: a model never
loops on whitespace inside the answer, and the format is the one Qwen writes in tool calls.
"""
from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from expertmesh.engine.sampling_params import GuidedDecodingParams, SamplingParams

THINK_OPEN, THINK_CLOSE, TURN_START = "<think>", "</think>", "<|im_start|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CACHE_LIMIT_BYTES = 512 << 20
"""Compiled grammars kept (LRU) by the compiler: a server sees many schemas over its life."""
_NO_PARAMETERS = {"type": "object", "properties": {}}
"""The arguments of a tool without `parameters`: `{}` (strict: no properties)."""
_LEADING_WHITESPACE = "root ::= [ \\t\\r\\n]{0,8}"
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class Phase(enum.Enum):
    PENDING = "pending"
    THINKING = "thinking"
    ANSWER = "answer"


def bitmask_width(vocab_size: int) -> int:
    """int32 words per packed mask row."""
    return (vocab_size + 31) // 32


def _xgrammar_message(exc: Exception) -> str:
    """xgrammar's error text without its log prefix ("[12:00:00] /project/cpp/x.cc:12: ")."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _XGRAMMAR_PREFIX.sub("", lines[0]) if lines else "the grammar compiler refused it without saying why"


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
    """One per `EngineCore`: the vocabulary as xgrammar sees it and a caching GrammarCompiler."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
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
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=min(8, os.cpu_count() or 1),
                                            cache_limit_bytes=_CACHE_LIMIT_BYTES)
        self.think_open = tokenizer.token_to_id(THINK_OPEN)
        self.think_close = tokenizer.token_to_id(THINK_CLOSE)
        self.turn_start = tokenizer.token_to_id(TURN_START)
        self.tool_call_open = tokenizer.token_to_id(TOOL_CALL_OPEN)
        self.tool_call_close = tokenizer.token_to_id(TOOL_CALL_CLOSE)
        self.width = bitmask_width(vocab_size)

    @property
    def has_think_tokens(self) -> bool:
        return self.think_open is not None and self.think_close is not None

    # ---- compiling ------------------------------------------------------------------------------

    def grammar(self, guided: GuidedDecodingParams):
        """The xgrammar `Grammar` of a constraint; ValueError naming the problem if it is invalid."""
        xgr = self._xgr
        if guided.json is not None:
            return _built("invalid JSON schema",
                          lambda: xgr.Grammar.from_json_schema(json.dumps(guided.schema), any_whitespace=False))
        if guided.json_object:
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if guided.regex is not None:
            return _built(f"invalid regex {guided.regex!r}", lambda: xgr.Grammar.from_regex(guided.regex))
        if guided.choice is not None:
            alternatives = " | ".join(_ebnf_string(c) for c in guided.choice)
            return _built(f"invalid choice {guided.choice!r}",
                          lambda: xgr.Grammar.from_ebnf(f"root ::= {alternatives}"))
        if guided.grammar is not None:
            return _built(f"invalid grammar {_short(guided.grammar)}", lambda: xgr.Grammar.from_ebnf(guided.grammar))
        if guided.tool_calls is not None:
            return self._tool_calls_grammar(guided)
        raise ValueError("guided_decoding sets no constraint")

    def _tool_calls_grammar(self, guided: GuidedDecodingParams):
        from xgrammar import structural_tag as st

        calls = []
        for fn in guided.tool_calls.functions:
            name, params = fn["name"], fn.get("parameters")
            try:
                schema = dict(params or _NO_PARAMETERS)
                schema.setdefault("type", "object")  # Qwen's wire format: arguments are an object
                args = self._xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
            except Exception as e:
                raise ValueError(f"invalid JSON schema for the parameters of tool {name!r}: "
                                 f"{_xgrammar_message(e)}") from e
            calls.append(st.SequenceFormat(elements=[
                st.ConstStringFormat(value='\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '),
                st.GrammarFormat(grammar=str(args)),
                st.ConstStringFormat(value="}\n")]))

        def tag(token_id: int | None, text: str):
            return st.TokenFormat(token=token_id) if token_id is not None else text

        block = st.TagFormat(begin=tag(self.tool_call_open, TOOL_CALL_OPEN),
                             content=calls[0] if len(calls) == 1 else st.OrFormat(elements=calls),
                             end=tag(self.tool_call_close, TOOL_CALL_CLOSE))
        more = st.StarFormat(content=st.SequenceFormat(elements=[st.ConstStringFormat(value="\n"), block]))
        return _built("invalid tool_calls constraint", lambda: self._xgr.Grammar.from_structural_tag(
            st.StructuralTag(format=st.SequenceFormat(elements=[block, more]))))

    def compile(self, guided: GuidedDecodingParams, after_thinking: bool = False):
        """The compiled grammar (cached by the compiler); `after_thinking` allows leading whitespace."""
        grammar = self.grammar(guided)
        if after_thinking:
            grammar = self._xgr.Grammar.concat(self._xgr.Grammar.from_ebnf(_LEADING_WHITESPACE), grammar)
        return _built(f"invalid guided_decoding ({', '.join(guided.kinds)})",
                      lambda: self.compiler.compile_grammar(grammar))

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

    def compile_for(self, params: SamplingParams, prompt_token_ids: list[int]) -> CompiledGuide | None:
        """Compile what a request needs (ValueError if it cannot be); None if nothing is constrained
        and nothing tracked."""
        phase = self.start_phase(params, prompt_token_ids)
        guided = params.guided_decoding
        if guided is None:
            if phase is Phase.ANSWER or params.thinking_budget is None:
                return None
            return CompiledGuide(None, None)
        plain = self.compile(guided) if phase is not Phase.THINKING else None
        after = self.compile(guided, after_thinking=True) if phase is not Phase.ANSWER else None
        return CompiledGuide(plain, after)

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


def _built(problem: str, build):
    """build(), with any xgrammar error turned into a ValueError that starts with `problem`."""
    try:
        return build()
    except Exception as e:
        raise ValueError(f"{problem}: {_xgrammar_message(e)}") from e


def _set_bit(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    word = token_id >> 5
    words = bitmask[row].numpy().view(np.uint32)
    words[word] |= np.uint32(1 << (token_id & 31))


def _ebnf_string(text: str) -> str:
    """An EBNF string literal for `text` (JSON escapes: \\" \\\\ \\n \\uXXXX, which xgrammar reads)."""
    return json.dumps(text, ensure_ascii=False)


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
