"""A request's state as it moves through the engine.

    WAITING ──schedule──▶ RUNNING ──stop/length/abort──▶ FINISHED_*
       ▲                    │
       └──── preempted ─────┘   (blocks freed; its tokens so far are recomputed on resume)

`num_computed_tokens` counts the tokens whose K/V sit in the request's KV blocks. A preempted
request keeps its output tokens: on resume, prompt and output are prefilled again as one
prompt, so the tokens it goes on to generate are the ones it would have generated anyway.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from expertmesh.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value not in ("waiting", "running")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first schedule (for usage and metrics)."""
    num_preemptions: int = 0
    num_resumptions: int = 0
    """Times it resumed on a fresh EP group after its group's workers died."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if one did."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length", "abort" or "error"; None while running."""
        return self.status.value if self.finished else None
