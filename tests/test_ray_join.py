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


def test_joining_a_running_cluster_with_ray_address_auto(qwen3_moe_path):
    ray_cli = shutil.which("ray") or pytest.skip("the ray command is not on PATH")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    # --block keeps the head in this process group, so stopping it touches no other Ray on the machine.
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--temp-dir={tmp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, 120)
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
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
