"""`ray_address="auto"` joins a cluster started outside expertmesh (`ray start --head`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from expertmesh.cluster.collective import free_port

pytestmark = pytest.mark.slow


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started outside expertmesh (`ray start --head`), on a free port."""
    ray_cli = shutil.which("ray") or pytest.skip("the ray command is not on PATH")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    # --block keeps the head in this process group, so stopping it touches no other Ray on the machine.
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--temp-dir={tmp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, 120)
        yield port, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def test_joining_a_running_cluster_with_ray_address_auto(qwen3_moe_path, ray_head):
    port, env = ray_head
    script = (
        "import json, ray\n"
        "from expertmesh import LLM, SamplingParams\n"
        f"llm = LLM({str(qwen3_moe_path)!r}, device='cpu', ep_size=2, ray_address='auto', progress=False)\n"
        "out = llm.generate(['hello'], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
        "print(json.dumps({'tokens': out[0].outputs[0].token_ids,\n"
        "                  'address': ray.get_runtime_context().gcs_address}))\n"
        "llm.shutdown()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert result.returncode == 0, result.stderr[-2000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reply["tokens"]) == 4
    assert reply["address"].endswith(f":{port}")  # it joined that cluster, not a new local one


def test_serve_an_ep_group_on_a_running_cluster(qwen3_moe_path, ray_head, tmp_path):
    """`expertmesh serve --ep-size 2 --ray-address`: the model replica and its two RankWorkers share
    the replica's one placement group, and the served greedy tokens are the in-process engine's."""
    import httpx

    from expertmesh import LLM, SamplingParams
    from expertmesh.bench.serve import wait_healthy

    port, env = ray_head
    http_port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "expertmesh", "serve", str(qwen3_moe_path), "--ep-size", "2", "--device", "cpu",
             "--ray-address", f"127.0.0.1:{port}", "--port", str(http_port), "--grpc-port", "0",
             "--max-model-len", "128"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_healthy(base, serve, 240, log)
        body = {"prompt": [[5, 6, 7, 8]], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        served = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
        tokens = served["choices"][0]["logprobs"]["tokens"]

        llm = LLM(qwen3_moe_path, device="cpu", progress=False, max_model_len=128)
        ids = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        expected = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids[0].outputs[0].token_ids]
        assert tokens == expected

        script = ("import json, ray\nfrom ray.util.placement_group import placement_group_table\n"
                  f"ray.init(address='127.0.0.1:{port}', log_to_driver=False)\n"
                  "print(json.dumps([t['bundles'] for t in placement_group_table().values()"
                  " if t['state'] == 'CREATED']))\n")
        groups = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        bundles = json.loads(groups.stdout.strip().splitlines()[-1])
        assert len(bundles) == 1 and len(bundles[0]) == 3  # the replica's bundle and one per rank, nothing else
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
