"""Streams that survive failures, on real Ray Serve (CPU, the tiny model, two engine replicas):
20 greedy streams run while a process is SIGKILLed, found by its PID: the engine replica's own
process (ep_size 1 and 2: the gateway resumes its streams on a healthy replica from what they had
streamed), or one rank of an EP group (ep_size 2: the replica restarts its group and resumes its
sequences). Every stream completes without an error, with exactly the tokens the same request
gives on the undisturbed server."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import pytest
from serve_app_helper import running_app

pytestmark = pytest.mark.slow

PROMPTS = [f"Stream number {i} says:" for i in range(20)]
MAX_TOKENS = 160


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def served(request, qwen3_moe_path):
    import openai

    args = {"model": str(qwen3_moe_path), "device": "cpu", "grpc_port": 0, "engine_replicas": 2,
            "ep_size": request.param, "num_kv_blocks": 2048}
    with running_app(args, num_cpus=4) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        yield {"client": client, "model": model, "ep_size": request.param, "base": base}


def _streams(served, on_started=None):
    """The 20 greedy streams at once: each one's token ids (from logprobs' tokens) and failures.
    `on_started` runs once every stream has its first chunk."""
    client, model = served["client"], served["model"]
    results, failures = {}, []
    started = threading.Barrier(len(PROMPTS) + 1)

    def one(i):
        try:
            text, first = "", True
            for chunk in client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if first:
                    first = False
                    started.wait(timeout=120)
                text += chunk.choices[0].text
                if chunk.choices[0].finish_reason:
                    results[i] = (text, chunk.choices[0].finish_reason)
        except Exception as exc:  # every failure is counted and reported
            failures.append(f"stream {i}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    if on_started is not None:
        on_started()
    for t in threads:
        t.join(timeout=300)
    return results, failures


def _resumptions(served) -> float:
    """The gateway's moves of streams to another engine replica, as /metrics counts them (a rank's
    death is resumed inside its replica, whose count /metrics shows only when it reads that one:
    that case shows by the fresh group below instead)."""
    text = httpx.get(served["base"] + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("expertmesh_num_replica_resumptions "))


def _pid_of(class_name: str) -> int:
    """The PID of a live actor whose class name holds `class_name` (from the GCS's actor table: no
    dashboard needed)."""
    from ray._private import state

    pids = [a["Pid"] for a in state.actors().values() if a.get("State") == "ALIVE"
            and class_name in a.get("ActorClassName", "")]
    assert pids, f"no live actor {class_name}"
    return pids[0]


@pytest.fixture(scope="module")
def undisturbed(served):
    results, failures = _streams(served)
    assert not failures and len(results) == len(PROMPTS)
    assert all(reason == "length" for _, reason in results.values())
    return results


@pytest.mark.parametrize("victim", ["engine replica", "rank"])
def test_every_stream_completes_with_the_undisturbed_tokens_through_a_sigkill(served, undisturbed, victim):
    if victim == "rank" and served["ep_size"] == 1:
        pytest.skip("ep_size 1 has no rank processes besides the replica")
    class_name = "ExpertMeshEngine" if victim == "engine replica" else "RankWorker"
    pid = _pid_of(class_name)
    before = _resumptions(served)
    results, failures = _streams(served, on_started=lambda: os.kill(pid, signal.SIGKILL))
    assert not failures, failures[:3]
    assert results == undisturbed
    if victim == "engine replica":  # the gateway's own count: streams moved to the other replica
        assert _resumptions(served) > before
    deadline, replaced = time.time() + 120, False  # and the app is whole again: a fresh process
    while not replaced and time.time() < deadline:
        with contextlib.suppress(AssertionError):  # none alive just now
            replaced = _pid_of(class_name) != pid
        time.sleep(0 if replaced else 1)
    assert replaced, f"no new {class_name} process replaced {pid}"
    again, failures = _streams(served)
    assert not failures and again == undisturbed
