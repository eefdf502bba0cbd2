"""`/health`: is the engine behind this gateway making progress? (`/livez` asks only the gateway.)

    gateway ── heartbeat() (bounded by `call_timeout_s`) ──▶ engine: EngineHeartbeat, read without
                                                              waiting on the engine thread
    healthy   the engine answered, its thread runs, and it is idle or finished a loop turn
              (a step) within `stall_timeout_s`
    unhealthy the engine did not answer in time (replica dead, unreachable or overloaded), its
              thread stopped, or it has been busy without finishing a step for `stall_timeout_s`

An idle engine is healthy however long it idles. The report's `body` is a plain dict (JSON) that
callers may extend with their own fields before answering; `healthy` picks 200 or 503.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from expertmesh.engine.async_engine import EngineHeartbeat

DEFAULT_STALL_TIMEOUT_S = 30.0
DEFAULT_CALL_TIMEOUT_S = 5.0


@dataclass
class HealthReport:
    healthy: bool
    body: dict[str, Any]
    """{"status": "ok" | "unhealthy", "reason": str (unhealthy only), "engine": {...}}; extensible."""


def judge(beat: EngineHeartbeat, stall_timeout_s: float) -> HealthReport:
    """The verdict on one heartbeat (pure: tested without an engine)."""
    engine = {"alive": beat.alive, "busy": beat.busy, "seconds_since_step": round(beat.seconds_since_beat, 3),
              "num_requests": beat.num_requests}
    if not beat.alive:
        reason = "the engine loop is not running" + (f": {beat.error}" if beat.error else "")
        return HealthReport(False, {"status": "unhealthy", "reason": reason, "engine": engine})
    if beat.busy and beat.seconds_since_beat > stall_timeout_s:
        reason = (f"engine has not completed a step for {beat.seconds_since_beat:.0f} s with "
                  f"{beat.num_requests} requests waiting (limit {stall_timeout_s:g} s)")
        return HealthReport(False, {"status": "unhealthy", "reason": reason, "engine": engine})
    return HealthReport(True, {"status": "ok", "engine": engine})


async def engine_health(client: Any, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> HealthReport:
    """Ask `client.heartbeat()` (an engine client) and judge it; never waits longer than `call_timeout_s`."""
    try:
        beat = await asyncio.wait_for(client.heartbeat(), timeout=call_timeout_s)
    except asyncio.TimeoutError:
        return HealthReport(False, {"status": "unhealthy",
                                    "reason": f"the engine did not answer within {call_timeout_s:g} s"})
    except Exception as exc:  # a dead replica, a broken connection: unhealthy, never a 500
        return HealthReport(False, {"status": "unhealthy",
                                    "reason": f"the engine is unreachable: {str(exc)[:300]}"})
    return judge(beat, stall_timeout_s)
