"""`SamplingParams`: how one request is sampled and when it stops (vLLM's names and defaults).

Every field is checked once, in `__post_init__`; a bad value raises `ValueError` naming the
field, so nothing malformed reaches the scheduler or the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    """Completions to return for the prompt (each its own sequence, sharing the prompt's KV blocks)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. In (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's. In [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated. In [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of tokens in the prompt or output are divided (if > 0) or multiplied by it. > 0."""
    seed: int | None = None
    """Seed of this request's own generator: the same seed gives the same tokens."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string itself is left out of the text unless asked."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation, beside the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's length."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are masked until this many tokens exist."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many most likely alternatives (0..20)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0.0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
               f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63 - self.n),
               f"seed must be an integer in [0, 2**63 - n), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
