"""EP groups on the machine's real CPUs: fractional CPU ranks fit, and a group that can never be placed
fails within seconds, naming what it asked for and what the cluster has (LLM, generate/chat, serve)."""
from __future__ import annotations

import time

import pytest

from expertmesh import LLM, SamplingParams
from expertmesh.cluster.collective import free_port
from expertmesh.gateway.cli import main

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "a"]


@pytest.fixture(scope="module")
def ray_cpus():
    """A local Ray with this machine's own CPU count (no logical CPUs added, unlike tests/test_ep_ray.py)."""
    import ray

    from expertmesh.cluster.bootstrap import NCCL_ENV

    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(NCCL_ENV)}, configure_logging=False,
             log_to_driver=False)
    yield ray.cluster_resources()["CPU"]
    ray.shutdown()


def _params():
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(qwen3_moe_path):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]


@pytest.mark.parametrize("ep_size", [3, 4])
def test_more_cpu_ranks_than_cores_give_the_ep1_tokens(ray_cpus, qwen3_moe_path, expected, ep_size):
    if ray_cpus < ep_size * 0.5:
        pytest.skip(f"{ray_cpus:g} CPUs hold no {ep_size} ranks of half a CPU")
    llm = LLM(qwen3_moe_path, device="cpu", ep_size=ep_size, progress=False)
    try:
        assert llm.engine.executor.placement_group.bundle_specs == [{"CPU": 0.5}] * ep_size
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())] == expected
    finally:
        llm.shutdown()


def _asks_too_much(ray_cpus: float) -> str:
    return str(ray_cpus)  # per rank: two ranks ask for twice the cluster


def test_an_unplaceable_group_fails_fast_naming_the_resources(ray_cpus, qwen3_moe_path):
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        LLM(qwen3_moe_path, device="cpu", ep_size=2, cpus_per_rank=ray_cpus, progress=False)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "an EP group of 2 CPU ranks cannot be placed" in message
    assert f"It asks for CPU {2 * ray_cpus:g}" in message and f"the Ray cluster has CPU {ray_cpus:g}" in message
    assert "--cpus-per-rank" in message
    import ray

    deadline = time.monotonic() + 30  # nothing is left reserved (earlier groups' removal is asynchronous)
    while ray.available_resources().get("CPU", 0) < ray_cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == ray_cpus


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat", "--message", "hi"]])
def test_generate_and_chat_fail_fast_too(ray_cpus, qwen3_moe_path, capsys, command):
    start = time.monotonic()
    assert main([*command, "--model", str(qwen3_moe_path), "--device", "cpu", "--ep-size", "2",
                 "--cpus-per-rank", _asks_too_much(ray_cpus)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "cannot be placed" in err and f"the Ray cluster has CPU {ray_cpus:g}" in err


def test_serve_fails_fast_too(ray_cpus, qwen3_moe_path, capsys):
    start = time.monotonic()
    assert main(["serve", str(qwen3_moe_path), "--device", "cpu", "--ep-size", "2", "--cpus-per-rank",
                 _asks_too_much(ray_cpus), "--port", str(free_port()), "--grpc-port", "0"]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "the expertmesh app (1 engine replica(s) of ep_size 2, 1 gateway replica(s)) cannot be placed" in err
    assert f"the Ray cluster has CPU {ray_cpus:g}" in err
