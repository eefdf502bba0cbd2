"""Shared fixtures: tiny checkpoints of each supported family, built once per test session."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (model/, experts/, router/) run in Triton's interpreter on the CPU, so the
    # CPU suite holds them to their references too. Set before triton is first imported (triton.jit
    # reads it when a kernel is defined, and triton.language binds its own jit functions at import).
    # Production code on the CPU never imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every Ray this test process starts runs without token auth (as the subprocesses the tests start
# do): Ray reads RAY_AUTH_MODE once per process, so a module that turned it off for its own Ray
# would leave a later module's Ray (started with a token) unreachable from this process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from expertmesh.cluster.collective import free_port
from expertmesh.model.tiny import make_tiny


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_gpu_engines(request):
    """A GPU engine freezes its start-up heap (`freeze_startup_heap`), so the cycles of an engine
    a test built outlive the test: put them back in the collector's reach and free their memory,
    or the next GPU test in the process runs out of it (a 30B-shape engine holds ~124 GiB)."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available():
        gc.unfreeze()
        gc.collect()
        torch.cuda.empty_cache()


MODEL_KWARGS = {
    "qwen3_moe": dict(model_type="qwen3_moe"),
    "qwen3": dict(model_type="qwen3"),
    "qwen2_moe": dict(model_type="qwen2_moe"),
    "mixtral": dict(model_type="mixtral"),
    "qwen3_moe_yarn": dict(model_type="qwen3_moe", max_position_embeddings=512,
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """name -> checkpoint directory, for every entry of MODEL_KWARGS."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, **kwargs) for name, kwargs in MODEL_KWARGS.items()}


@pytest.fixture(scope="session")
def qwen3_moe_path(tiny_models):
    return tiny_models["qwen3_moe"]


def opening_think_template(template: str) -> str:
    """The default template made Qwen3-2507-thinking style: with thinking on, the generation
    prompt ends in `<think>\\n`, so the model's output holds only the closing tag."""
    tail = "{%- endif -%}\n{%- endif -%}"
    assert template.rstrip().endswith(tail)
    return template.rstrip()[: -len(tail)] + "{%- else -%}\n{{- '<think>\\n' -}}\n" + tail + "\n"


@pytest.fixture(scope="session")
def thinking_model_path(qwen3_moe_path, tmp_path_factory):
    """The tiny Qwen3-MoE checkpoint with a template that opens `<think>` in the prompt."""
    import shutil

    from expertmesh.model.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("thinking") / "tiny-thinking"
    shutil.copytree(qwen3_moe_path, path)
    template = Tokenizer.from_pretrained(qwen3_moe_path).chat_template
    (path / "chat_template.jinja").write_text(opening_think_template(template), encoding="utf-8")
    return path


@contextlib.contextmanager
def local_serving(max_model_len: int, **llm_kwargs):
    """The OpenAI serving layer over the in-process engine (embedded default model, `LLM` keyword
    arguments such as limits in `llm_kwargs`), with an event loop on a background thread for
    servers; `run(coro)` runs a coroutine there and waits."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from expertmesh import LLM
    from expertmesh.engine.async_engine import AsyncEngine
    from expertmesh.gateway.serving import LocalEngineClient, OpenAIServing, ServingSettings

    llm = LLM(max_model_len=max_model_len, **llm_kwargs)
    engine = AsyncEngine(llm.engine)
    serving = OpenAIServing(LocalEngineClient(engine), llm.tokenizer, ServingSettings("tiny", llm.engine.max_model_len))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="serving-test-loop", daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    try:
        yield SimpleNamespace(serving=serving, engine=engine, tokenizer=llm.tokenizer, run=run)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        engine.shutdown()


# ---- a real redis-server (tests/test_state.py, tests/test_auth_limits.py) ---------------------

REDIS = shutil.which("redis-server")


class RedisServer:
    """A redis-server on a free port, persisting to `directory` (append-only file)."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
             "--appendonly", "yes", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SIGTERM: redis-server flushes the append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def flush(self) -> None:
        """FLUSHALL: every key gone."""
        with self.client() as c:
            c.flushall()

    def restart_empty(self) -> None:
        """Stop, lose the data directory's files, start again on the same port: a Redis whose
        volume was lost (or that never persisted) comes back empty."""
        self.stop()
        for path in self.directory.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.start()

    def client(self):
        import redis

        return redis.Redis(port=self.port, decode_responses=True)


def start_redis_server(directory: Path) -> RedisServer:
    """A started redis-server persisting to `directory`; the test is skipped without redis-server."""
    if REDIS is None:
        pytest.skip("redis-server is not installed (.ci/run installs it: apt-get install redis-server)")
    server = RedisServer(directory)
    server.start()
    return server


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for a module's EP groups; eight logical CPUs, so that four half-CPU ranks and
    their engine fit on a two-core CI machine."""
    import ray

    from expertmesh.cluster.bootstrap import NCCL_ENV

    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": dict(NCCL_ENV)},
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
