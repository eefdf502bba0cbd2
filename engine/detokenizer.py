"""Output token ids to text, a few tokens at a time, and stop strings over the growing text.

`IncrementalDetokenizer` keeps two offsets into a short window of token ids (the prefix/read
offset method of vLLM and text-generation-inference):

    window: | prefix tokens | pending tokens |
            0               read_offset      end
    delta = decode(window)[len(decode(window[:read_offset])):]

 1. Each new token is appended; the window is decoded with the prefix tokens in front, so
    spacing and merges come out as they would inside the whole sequence.
 2. While the window's text ends in U+FFFD (a character whose bytes have not all arrived) or
    adds nothing (skipped special tokens), the tokens stay pending.
 3. Otherwise the new text is emitted, the pending tokens become the next prefix, and older
    ids are dropped, so a call costs O(new tokens + window), never a re-decode of the output.
 4. Should more than `_MAX_PENDING` tokens pile up (a model emitting invalid UTF-8), all but
    the last 4 are released as they decode (with U+FFFD, as the full decode has it).

`StopChecker` finds stop strings in the text and says how much of it is safe to stream:
it holds back any tail that could still grow into a stop string. It scans each new character
once through one Aho–Corasick automaton of the request's stops, so its cost per token does not
grow with their number or length (the engine caps both as well: `LimitsConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass

import tokenizers

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5
"""Prompt tokens decoded ahead of the first output token, for its leading space."""
_MAX_PENDING = 16
_KEEP_PENDING = 4
"""A UTF-8 character is at most 4 bytes, so at most 4 byte tokens can be waiting for it."""


class IncrementalDetokenizer:
    """Streams one request's output text. `add` returns only complete new text; `text` is all so far."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        """The window: prefix tokens (already released, kept as context), then pending ones."""
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.text = ""
        """All output text released so far."""

    def add(self, token_ids: list[int]) -> str:
        """Append output tokens; return the text they complete (possibly "")."""
        deltas = []
        for token_id in token_ids:
            self._ids.append(token_id)
            deltas.append(self._step())
        delta = "".join(deltas)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Release whatever is pending, incomplete characters included (at the end of a request)."""
        delta = self._release(len(self._ids), force=True)
        self.text += delta
        return delta

    def _step(self) -> str:
        delta = self._release(len(self._ids), force=False)
        if not delta and len(self._ids) - self._read_offset > _MAX_PENDING:
            delta = self._release(len(self._ids) - _KEEP_PENDING, force=True)
        return delta

    def _release(self, end: int, force: bool) -> str:
        text = self._decode(self._ids[:end])
        if not force and (len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT)):
            return ""
        delta = text[len(self._prefix_text):]
        # The released tokens become the next prefix; ids before them are no longer needed.
        del self._ids[:self._read_offset]
        self._read_offset = end - self._read_offset
        self._prefix_text = self._decode(self._ids[:self._read_offset])
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def find_stop_string(text: str, new_text_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The stop string that ends first inside the last new_text_len chars of text (it may begin
    in older text), as (index where it begins, the stop string); None if none does.

    "First" is by end position, as if the text had arrived one character at a time, so the
    answer does not depend on how the text was cut into deltas; on a tie the longer one wins.
    This is the plain reference (its cost grows with the number of stops); `StopChecker` gets the
    same answers from a `StopAutomaton` whose cost does not.
    """
    best: tuple[int, int, str] | None = None  # (end, -len, stop)
    for stop in stops:
        start = max(0, len(text) - new_text_len - len(stop) + 1)
        index = text.find(stop, start)
        if index >= 0:
            candidate = (index + len(stop), -len(stop), stop)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    end, _, stop = best
    return end - len(stop), stop


class StopAutomaton:
    """Aho–Corasick over a request's stop strings, fed one character at a time.

    Built once per request (a trie of the stops with failure links): O(total characters of the
    stops). Each fed character then costs O(1) amortized, however many stops there are: the
    state is the longest tail of the text that begins some stop, so `partial` is the text to hold
    back, and each state knows the longest stop that ends there.
    """

    def __init__(self, stops: list[str]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._match: list[str | None] = [None]
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self._goto[state].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][ch] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._match.append(None)
                state = nxt
            self._match[state] = stop
        self._fail = [0] * len(self._goto)
        queue = list(self._goto[0].values())  # breadth first: a state's failure is shallower than it
        for state in queue:
            for ch, child in self._goto[state].items():
                queue.append(child)
                fail = self._fail[state]
                while fail and ch not in self._goto[fail]:
                    fail = self._fail[fail]
                target = self._goto[fail].get(ch, 0)
                self._fail[child] = target if target != child else 0
                if self._match[child] is None:  # a stop ending here is at most as long as the state
                    self._match[child] = self._match[self._fail[child]]
        self._state = 0
        self.steps = 0
        """Transitions taken so far (at most two per fed character): the matcher's work."""

    def feed(self, ch: str) -> str | None:
        """Advance by one character; the longest stop string ending with it, or None."""
        state = self._state
        while state and ch not in self._goto[state]:
            state = self._fail[state]
            self.steps += 1
        self._state = self._goto[state].get(ch, 0)
        self.steps += 1
        return self._match[self._state]

    @property
    def partial(self) -> int:
        """Length of the longest tail of the text fed so far that is a prefix of some stop string."""
        return self._depth[self._state]


@dataclass(frozen=True)
class StopUpdate:
    delta: str
    """Text newly safe to stream to the client."""
    stop_str: str | None
    """The stop string matched in this update; None while running."""
    text_end: int | None
    """When stopped: the request's final text is text[:text_end]."""


class StopChecker:
    """Per request: call `update(detokenizer.text)` after each `add`, and `update(...,
    finished=True)` once when the request ends otherwise (EOS, length), to release the text held
    back. Streamed deltas concatenate to the request's final text. Only the characters added since
    the last call are scanned, one automaton step each, so a call costs O(new text), whatever the
    number and length of the stop strings."""

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False) -> None:
        self._automaton = StopAutomaton(list(stops)) if stops else None
        self._include = include_stop_str_in_output
        self._scanned = 0
        self._streamed = 0
        self.stopped = False

    @property
    def steps(self) -> int:
        """The automaton's transitions so far (its work; 0 without stop strings)."""
        return self._automaton.steps if self._automaton is not None else 0

    def update(self, text: str, finished: bool = False, check: bool = True) -> StopUpdate:
        """`text` is the request's whole text so far (it only grows). check=False (the request is
        still under min_tokens): release the text, match nothing; a stop that begins here and ends
        after min_tokens still counts."""
        if self.stopped:
            return StopUpdate("", None, None)
        automaton, start = self._automaton, self._scanned
        self._scanned = len(text)
        if automaton is None:
            return StopUpdate(self._advance(text, len(text)), None, None)
        for offset, ch in enumerate(text[start:]):
            stop = automaton.feed(ch)
            if stop is not None and check:
                self.stopped = True
                end = start + offset + 1
                end = end if self._include else end - len(stop)
                return StopUpdate(self._advance(text, end), stop, end)
        if finished or not check:
            return StopUpdate(self._advance(text, len(text)), None, None)
        return StopUpdate(self._advance(text, len(text) - automaton.partial), None, None)

    def resume(self, text: str, streamed: int) -> str | None:
        """Continue a request that ran elsewhere: `text` (its text so far) scanned, its first
        `streamed` characters already with the client. Returns a stop string it already holds
        (then the request had ended there), else None."""
        found = None
        if self._automaton is not None:
            for ch in text[self._scanned:]:
                found = self._automaton.feed(ch) or found
        self._scanned = len(text)
        self._streamed = streamed
        return found

    def _advance(self, text: str, end: int) -> str:
        delta = text[self._streamed:end]
        self._streamed = max(self._streamed, end)
        return delta
