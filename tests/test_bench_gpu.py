"""bench/gpu.py's machinery on the CPU with a small shape: the transformers twin computes our
logits from views of our weights (so its figures are on the same weights), and the engine part,
the table and the plot run end to end."""
from __future__ import annotations

import pytest
import torch

from expertmesh.bench import gpu
from expertmesh.bench.ep import SMOKE_SHAPE
from expertmesh.bench.roofline import DeviceRates
from expertmesh.model.attention import AttentionMetadata
from expertmesh.model.config import ModelConfig


def test_transformers_twin_and_engine_part(tmp_path):
    engine = gpu.build_engine({**SMOKE_SHAPE, "max_position_embeddings": 1024}, 2, max_model_len=512,
                              max_num_seqs=4, kv_bytes=16 << 20, device="cpu", dtype="float32")
    runner = engine.executor.runner
    twin = gpu.hf_model_on(runner)
    ours_storage = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    assert all(p.untyped_storage().data_ptr() in ours_storage for p in twin.parameters())  # views, no copies
    ids = [5, 6, 7, 8, 9, 10]
    meta = AttentionMetadata.build(query_lens=[len(ids)], starts=[0], block_tables=[[0]], block_size=16,
                                   device=torch.device("cpu"))
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(torch.tensor(ids), meta, runner.kv_caches))
        theirs = twin(torch.tensor([ids])).logits[0].float()
    assert ours.abs().max() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    rows = gpu.part_engine(engine, rates, batches=(1, 2), hf_batches=(1,), new_tokens=4)
    assert [r["batch"] for r in rows] == [1, 2] and rows[0]["transformers_tok_s"] > 0
    assert all(r["n"] == 3 and r["worst_ms"] >= r["median_ms"] > 0 and r["ceiling_tok_s"] > 0 for r in rows)
    assert all(r["gc_worst_ms"] >= 0 for r in rows)
    result = {"device": "cpu", "rates": rates.__dict__, "engine": rows}
    assert "| 1 |" in gpu.markdown(result)
    gpu.plot(result, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 10_000


def test_gc_pauses_are_timed_per_step_and_the_callback_leaves():
    import gc

    with gpu.GcPauses() as pauses:
        assert pauses.seconds == 0.0
        gc.collect()
        collected = pauses.seconds
        pauses.seconds = 0.0  # the next step's
    assert collected > 0 and pauses._callback not in gc.callbacks
    gc.collect()
    assert pauses.seconds == 0.0  # no longer listening


TINY_FP8_SHAPE = {**SMOKE_SHAPE, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "max_position_embeddings": 4096}


def test_fp8_engine_part_keeps_fp8_weights_and_reports_beside_bf16():
    """part_engine_fp8 on the CPU (Triton's interpreter, 16x16 blocks that divide the tiny shape):
    the engine holds FP8 weights, its rows carry the FP8 ceiling and the ratio to the bf16 rows."""
    pytest.importorskip("triton")
    rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    bf16_rows = [{"batch": 1, "decode_tok_s": 100.0}, {"batch": 2, "decode_tok_s": 150.0}]
    rows = gpu.part_engine_fp8(rates, bf16_rows, batches=(1, 2), shape=TINY_FP8_SHAPE, layers=1, block=16,
                               new_tokens=2, prompt_len=8, device="cpu", dtype="float32", kernels="triton",
                               kv_bytes=16 << 20)
    assert [r["batch"] for r in rows] == [1, 2]
    assert [r["bf16_tok_s"] for r in rows] == [100.0, 150.0] and all(r["decode_tok_s"] > 0 for r in rows)
    assert rows[1]["fp8_over_bf16"] == pytest.approx(rows[1]["decode_tok_s"] / 150.0)
    config = ModelConfig.from_hf_dict({**TINY_FP8_SHAPE, "num_hidden_layers": 1,
                                       "quantization_config": {**gpu.FP8_BLOCK_CONFIG, "weight_block_size": [16, 16]}})
    fp8_ceiling = gpu.step_ceiling(config, rates, torch.float32, 1, 1, 8 + 1, fp8_weights=True)
    assert fp8_ceiling < gpu.step_ceiling(config, rates, torch.float32, 1, 1, 8 + 1)
    assert rows[0]["ceiling_step_ms"] == pytest.approx(fp8_ceiling * 1e3)
    assert "FP8 weights" in gpu.markdown({"device": "cpu", "rates": rates.__dict__, "engine_fp8": rows})


@pytest.mark.slow
def test_ep_part_walks_ep1_and_ep2_with_each_ranks_device_view(ray_session):
    """bench/gpu.py's ep part on two CPU ranks (Ray, gloo): every batch on EP=1 and EP=2, EP=2 beside
    EP=1, each rank's profiled window (on a CPU the ops stand in for kernels, gloo for NCCL)."""
    from expertmesh.bench import gpu_ep

    rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    rows = gpu_ep.part_ep(rates, 2, shape={**SMOKE_SHAPE, "max_position_embeddings": 1024}, layers=2,
                          batches=(1, 3), new_tokens=6, prompt_len=8, profile_steps=2, device="cpu",
                          dtype="float32", kv_bytes=16 << 20)
    assert [(r["ep"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in rows:
        assert row["n"] >= 3 and row["worst_ms"] >= row["median_ms"] > 0 and row["ceiling_tok_s_per_gpu"] > 0
        assert len(row["idle_us_per_rank"]) == row["ep"] and len(row["ranks"]) == row["ep"]
        assert all(r["busy_us"] > 0 and r["kernels"] > 0 for r in row["ranks"])
    for row in rows[2:]:
        assert row["a2a_us_per_layer"] > 0  # gloo's all-to-alls, inside each MoE layer
        assert row["throughput_over_ep1"] > 0 and row["step_over_ep1"] > 0
    table = "\n".join(gpu_ep.markdown_ep(rows))
    assert "| 2 | 3 |" in table and "| 1 | 1 |" in table
    # The whole-model FP8 row: EP=N alone, its ceiling reading one byte a weight.
    fp8_shape = {**SMOKE_SHAPE, "max_position_embeddings": 1024,
                 "quantization_config": {**gpu.FP8_BLOCK_CONFIG, "weight_block_size": [16, 16]}}
    fp8 = gpu_ep.part_ep(rates, 2, shape=fp8_shape, layers=1, batches=(2,), new_tokens=4, prompt_len=8,
                         profile_steps=1, with_ep1=False, device="cpu", dtype="float32", kv_bytes=16 << 20)
    assert [(r["ep"], r["batch"], r["fp8"]) for r in fp8] == [(2, 2, True)] and "throughput_over_ep1" not in fp8[0]
    config = ModelConfig.from_hf_dict({**fp8_shape, "num_hidden_layers": 1})
    ceiling = gpu.step_ceiling(config, rates, torch.float32, 2, 2, 8 + 2, 2, fp8_weights=True)
    assert fp8[0]["ceiling_step_ms"] == pytest.approx(ceiling * 1e3)


@pytest.mark.slow
def test_sp_part_prefills_one_long_prompt_on_one_rank_and_sharded_on_two(ray_session):
    from expertmesh.bench import gpu_ep

    rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    rows = gpu_ep.part_sp_prefill(rates, 2, shape={**SMOKE_SHAPE, "max_position_embeddings": 4096}, layers=2,
                                  length=600, min_tokens=256, device="cpu", dtype="float32", kv_bytes=16 << 20)
    assert [(r["ep"], r["sharded"]) for r in rows] == [(1, False), (2, True)]
    assert all(r["prefill_s"] > 0 and r["ceiling_s"] > 0 and r["steps"] >= 1 for r in rows)
    assert rows[1]["speedup_over_one_gpu"] == pytest.approx(rows[0]["prefill_s"] / rows[1]["prefill_s"])
    assert "| 2 | 600 | yes |" in "\n".join(gpu_ep.markdown_sp(rows))


@pytest.mark.slow
def test_eplb_part_skews_the_routing_and_the_balancer_evens_it(ray_session):
    """bench/gpu.py's eplb part on two CPU ranks: experts only rank 0 holds given the busiest experts'
    router rows make rank 0 the busiest; one balancer check moves experts (and fills the redundant
    slots), and the load after is more even than before."""
    from expertmesh.bench import gpu_ep

    rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    row = gpu_ep.part_eplb(rates, 2, shape={**SMOKE_SHAPE, "max_position_embeddings": 1024}, layers=2, batch=4,
                           steps=6, prompt_len=8, hot=4, device="cpu", dtype="float32",
                           kv_bytes=16 << 20)
    before, after = row["before"], row["after"]
    assert before["imbalance_mean"] > 1.2 and row["moved"]
    assert after["imbalance_mean"] < before["imbalance_mean"]
    assert before["n"] >= 5 and after["n"] >= 5 and row["ceiling_step_ms"] > 0
    assert "| before |" in "\n".join(gpu_ep.markdown_eplb(row))
