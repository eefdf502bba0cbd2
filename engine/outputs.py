"""What the engine hands back, in vLLM's shapes: `RequestOutput` holding `CompletionOutput`s.

A streamed request's outputs carry the delta since the last output (`text_delta`,
`token_ids_delta`, `logprobs_delta`); its last output also carries the totals (`text`,
`token_ids`, `logprobs`) and the prompt. A request that is not streamed gets that last one only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token_id: logprob} of the sampled token and the top alternatives."""
    finish_reason: str | None = None
    """"stop", "length", "abort" or "error"; None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it, if one did."""
    error: str | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def delta_only(self) -> CompletionOutput:
        """A copy carrying only this step's deltas (what a streamed, unfinished output sends)."""
        return CompletionOutput(self.index, cumulative_logprob=self.cumulative_logprob, error=self.error,
                                text_delta=self.text_delta, token_ids_delta=list(self.token_ids_delta),
                                logprobs_delta=self.logprobs_delta)

    def snapshot(self) -> CompletionOutput:
        """A copy of the totals and deltas as they stand (the lists copied: the engine goes on with its own)."""
        return replace(self, token_ids=list(self.token_ids), token_ids_delta=list(self.token_ids_delta),
                       logprobs=None if self.logprobs is None else list(self.logprobs))


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
