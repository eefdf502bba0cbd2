"""What the serving layer needs of an engine (`EngineClient`) and of a token limiter, and the
in-process engine client. The Ray Serve model deployment's handle (`serve_app.py`) is the other
engine client."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from expertmesh.engine.async_engine import AsyncEngine, EngineHeartbeat
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import SamplingParams


class EngineClient(Protocol):
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[list[RequestOutput]]: ...

    async def stats(self) -> dict[str, float]: ...

    async def expert_load(self) -> dict | list[list[float]] | None: ...

    async def heartbeat(self) -> EngineHeartbeat: ...


class TokenLimiter(Protocol):
    """A per-key tokens-per-minute budget (`Authenticator`): `reserve` before the engine sees a
    request (APIError 429 when its most tokens do not fit), `settle` when it ends, however it ends."""

    async def reserve(self, tokens: int) -> Any: ...

    async def settle(self, reservation: Any, used: int) -> None: ...


class LocalEngineClient:
    """The in-process engine (no Ray Serve): `expertmesh serve --no-ray` style apps and tests."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def generate(self, request_id, prompt_token_ids, params, prompt=None):
        return self.engine.generate(request_id, prompt_token_ids, params, prompt)

    async def stats(self) -> dict[str, float]:
        return self.engine.stats()

    async def expert_load(self) -> dict | None:
        return await self.engine.call(expert_load_lists)

    async def heartbeat(self) -> EngineHeartbeat:
        return self.engine.heartbeat()


def expert_load_lists(core) -> dict | None:
    """The expert-load report of an engine for /metrics: `expert_load` (tokens per MoE layer and
    expert since start) and, from an EP group, `rank_imbalance` (per layer, the busiest rank's load
    over the mean since the last load-balancer check) and `rebalances`; None for dense models."""
    load = core.expert_load()
    if load is None:
        return None
    report = getattr(core.executor, "load_report", None)
    return {"expert_load": load.tolist(), **(report(load) if report is not None else {})}
