"""bench/moe_layer.py and bench/moe_sweep.py walked end to end on the CPU.

The benchmark runs on the GPU machine once, and must not need a fix there: here Triton's
interpreter runs the kernels (tests/conftest.py), a stand-in timer calls each path once, and the
test checks that every path runs and agrees with the others, that the sweep writes a data file
experts/moe_config.py reads back, and that the table renders.
"""
from __future__ import annotations

import json

import pytest
import torch

from expertmesh.experts.moe_config import ConfigTable, KernelConfig, MoeConfig, config_file_name

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the benchmark itself")


def test_sweep_threshold_is_the_largest_bucket_up_to_which_gemv_wins_every_bucket():
    from expertmesh.bench.moe_sweep import _table

    gemv = MoeConfig(KernelConfig(16, 256), KernelConfig(8, 128)).to_json()
    blocked = MoeConfig(KernelConfig(64, 128), KernelConfig(64, 128), 16).to_json()
    records = [
        {"tokens": 16, "copies": 128, "gemv_us": 90.0, "gemv": gemv, "blocked_us": 80.0, "blocked": blocked},
        {"tokens": 1, "copies": 8, "gemv_us": 50.0, "gemv": gemv, "blocked_us": 60.0, "blocked": blocked},
        {"tokens": 8, "copies": 64, "gemv_us": 70.0, "gemv": gemv, "blocked_us": 75.0, "blocked": blocked},
        {"tokens": 64, "copies": 512, "blocked_us": 900.0, "blocked": blocked},
        {"tokens": 4096, "copies": 32768, "skipped": True},
    ]
    table = _table(records)
    assert table.gemv_max_copies == 64
    assert [n for n, _ in table.gemv] == [8, 64]
    assert [n for n, _ in table.blocked] == [8, 64, 128, 512]
    assert ConfigTable.from_json(json.loads(json.dumps(table.to_json()))) == table


def test_routings_past_the_l2_for_the_decode_shapes():
    """Twice the H200's 50 MB of L2 in expert weights per timed call: three routings for one
    token of the 30B shape in FP8 (38 MB each), two in bf16, one for the 235B shape or many
    tokens (their experts already exceed it)."""
    from expertmesh.bench.moe_sweep import routings_past_l2

    l2 = 50 << 20
    w30_fp8 = torch.empty(128, 2 * 768, 2048, dtype=torch.float8_e4m3fn, device="meta")
    w30 = torch.empty(128, 2 * 768, 2048, dtype=torch.bfloat16, device="meta")
    w235 = torch.empty(128, 2 * 1536, 4096, dtype=torch.bfloat16, device="meta")
    assert routings_past_l2(w30_fp8, 8, 1, l2) == 3
    assert routings_past_l2(w30, 8, 1, l2) == 2
    assert routings_past_l2(w235, 8, 1, l2) == 1 and routings_past_l2(w30, 8, 64, l2) == 1


def test_sweep_times_each_candidate_over_several_routings(monkeypatch):
    """With an L2 that one routing's experts fit in, each timed call makes one launch per routing,
    each with its own routing, and the time per call is the timer's over their number."""
    from expertmesh.bench import moe_sweep
    from expertmesh.experts import triton_moe

    monkeypatch.setattr(moe_sweep, "GEMV_FIRST", [KernelConfig(64, 128)])
    monkeypatch.setattr(moe_sweep, "GEMV_SECOND", [KernelConfig(64, 64)])
    monkeypatch.setattr(moe_sweep, "GEMM_FIRST", {16: [KernelConfig(64, 128)]})
    monkeypatch.setattr(moe_sweep, "GEMM_SECOND", {16: [KernelConfig(128, 64)]})
    seen = []
    gemv = triton_moe.gemv_gate_up
    monkeypatch.setattr(triton_moe, "gemv_gate_up", lambda x, w, ids, *a, **k: seen.append(ids.tolist())
                        or gemv(x, w, ids, *a, **k))
    E, D, F, K = 16, 64, 32, 2
    w13, w2 = torch.randn(E, 2 * F, D) / 8, torch.randn(E, D, F) / 8
    per_call = K * 3 * F * D * 4  # one token's experts, float32
    timed = []

    def timer(fn):
        seen.clear()
        fn()
        timed.append([tuple(ids) for ids in seen])
        return 1e-6 * 4

    table, records = moe_sweep.sweep(w13, w2, K, [1], float("inf"), log=lambda *_: None, timer=timer,
                                     l2_bytes=2 * per_call)
    assert records[0]["routings"] == 4
    assert len(timed[0]) == 4 and len(set(timed[0])) > 1  # the GEMV: one launch per routing, each its own
    assert records[0]["gemv_us"] == pytest.approx(2.0)  # (4 us / 4 routings) for each of the two kernels
    assert table.gemv and table.blocked


@pytest.mark.slow
def test_moe_layer_bench_runs_every_path_and_writes_its_sweep(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from expertmesh.bench import moe_layer, moe_sweep
    from expertmesh.bench.ep import SMOKE_SHAPE
    from expertmesh.bench.roofline import DeviceRates

    monkeypatch.setitem(moe_layer.SHAPES, "smoke", (SMOKE_SHAPE, [1, 6], [6, 1]))
    monkeypatch.setattr(moe_sweep, "GEMV_FIRST", [KernelConfig(64, 128)])
    monkeypatch.setattr(moe_sweep, "GEMV_SECOND", [KernelConfig(64, 64), KernelConfig(128, 64)])
    monkeypatch.setattr(moe_sweep, "GEMM_FIRST", {16: [KernelConfig(64, 128)]})
    monkeypatch.setattr(moe_sweep, "GEMM_SECOND", {16: [KernelConfig(128, 64)]})
    graphs_asked = []

    def timer(fn, graphs):
        fn()
        graphs_asked.append(graphs)
        return 1e-6, "graph" if graphs else "eager"

    def sweep_timer(fn):
        fn()
        return 1e-6

    rates = DeviceRates(copy_gb_s=4000.0, matmul_tflop_s=700.0)
    result = moe_layer.run_shape("smoke", [1, 6], True, float("inf"), rates, tmp_path, device=torch.device("cpu"),
                                 dtype=torch.float32, timer=timer, sweep_timer=sweep_timer, fp8=True, fp8_block=32)
    assert [r["tokens"] for r in result["rows"]] == [1, 6]
    assert all(graphs_asked)  # small T: every path asked for graph replay
    for row in result["rows"]:
        for name in ("fused", "fused_moe", "grouped_mm", "transformers"):
            assert row[f"{name}_us"] == 1.0, row[f"{name}_mode"]
        assert row["rel_err_vs_grouped_mm"] < 1e-4
        assert row["rel_err_transformers_vs_grouped_mm"] < 1e-4
        assert row["ceiling_us"] > 0
        assert row["fused_moe_fp8_us"] == 1.0 and 0 < row["rel_err_fp8_vs_bf16"] < 0.1  # FP8 rounds, a little
        assert row["ceiling_fp8_us"] < row["ceiling_us"]
    name = config_file_name(16, 64, 256, "float32", "cpu")
    written = ConfigTable.from_json(json.loads((tmp_path / "configs" / name).read_text()))
    assert written == ConfigTable.from_json(result["sweep"]["table"])
    assert written.gemv_max_copies == 24  # GEMV (2 kernels) beat blocked (4 steps) at 4 and 24 copies
    fp8_name = config_file_name(16, 64, 256, "float8_e4m3fn", "cpu")  # FP8 weights swept on their own
    assert result["sweep_fp8"]["file"] == fp8_name
    assert ConfigTable.from_json(json.loads((tmp_path / "configs" / fp8_name).read_text())) == \
        ConfigTable.from_json(result["sweep_fp8"]["table"])
    text = moe_layer.markdown([result], rates, "cpu")
    assert "| 6 | 1.0 | 1.0 | 1.0 | 1.0 |" in text and "GEMV" in text
    assert "FP8 experts" in text and "| 6 | 1.0 | 1.0 | 1.00 |" in text
