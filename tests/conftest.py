"""Shared fixtures: tiny checkpoints of each supported family, built once per test session."""
from __future__ import annotations

import contextlib

import pytest
import torch

from expertmesh.model.tiny import make_tiny


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
