"""The one definition of the settings (engine/config_fields.py) and the settings it carries."""
from __future__ import annotations

import pytest

from expertmesh.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelLoadConfig,
    ParallelConfig,
    SchedulerConfig,
    engine_settings,
)
from expertmesh.engine.config_fields import settings_of
from expertmesh.engine.model_runner import gpu_kv_budget


def test_settings_read_type_default_bounds_and_docstring():
    by_name = {s.name: s for s in engine_settings()}
    s = by_name["num_kv_blocks"]  # the public name of CacheConfig.num_blocks
    assert (s.attr, s.owner, s.type, s.optional, s.default, s.ge, s.flag) == \
        ("num_blocks", CacheConfig, int, True, None, 1, "--num-kv-blocks")
    assert s.help.startswith("KV-cache blocks per rank; wins over gpu_memory_utilization")
    assert by_name["dtype"].choices == ("auto", "float32", "bfloat16", "float16")
    assert "cpu_kv_cache_bytes" not in by_name  # internal fields stay out of the public surface
    assert "cpu_kv_cache_bytes" in {s.name for s in settings_of(CacheConfig, public_only=False)}
    assert all(s.help for s in engine_settings())


def test_every_check_names_the_setting():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be <= 1.0, got 1.5"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be > 0.0, got 0"):
        CacheConfig(gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="step_channel must be one of 'compiled', 'ray_call', got 'grpc'"):
        ParallelConfig(step_channel="grpc")
    with pytest.raises(ValueError, match="load_format must be one of"):
        ModelLoadConfig("m", load_format="gguf")
    for bad in ("no", 0, None, [False]):  # a switch given a string or number must not read as truthy
        with pytest.raises(ValueError, match=r"async_scheduling must be (true or false|set)"):
            SchedulerConfig(async_scheduling=bad)
    with pytest.raises(ValueError, match="enforce_eager must be true or false, got 'false'"):
        EngineConfig.from_kwargs(model="m", enforce_eager="false")


def test_from_kwargs_fills_each_sub_config():
    config = EngineConfig.from_kwargs(model="m", num_kv_blocks=8, ep_size=2, max_num_seqs=3)
    assert (config.load.model, config.cache.num_blocks, config.parallel.ep_size, config.scheduler.max_num_seqs) == \
        ("m", 8, 2, 3)
    with pytest.raises(TypeError, match="'num_blocks'; did you mean 'num_kv_blocks'"):
        EngineConfig.from_kwargs(num_blocks=8)


def test_gpu_memory_utilization_is_a_share_of_the_total():
    """vLLM's meaning: the engine's share of the GPU's total memory; the KV cache gets what the weights
    and other users leave of it (not a share of what is free)."""
    gib = 1 << 30
    assert gpu_kv_budget(free_bytes=100 * gib, total_bytes=140 * gib, gpu_memory_utilization=0.9) == 86 * gib
    assert gpu_kv_budget(free_bytes=100 * gib, total_bytes=140 * gib, gpu_memory_utilization=0.5) == 30 * gib
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.2 leaves no memory for the KV cache"):
        gpu_kv_budget(free_bytes=100 * gib, total_bytes=140 * gib, gpu_memory_utilization=0.2)
