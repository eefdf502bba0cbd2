"""bench/linear.py walked end to end on the CPU (--smoke: Triton's interpreter, tiny shapes), so
the GPU run needs no fix: every row is measured and correct, and the configs table it writes is
one model/triton_linear.py reads back."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the benchmark itself")


def test_smoke_run_writes_a_table_the_kernel_reads(tmp_path, capsys):
    from expertmesh.bench import linear
    from expertmesh.model.triton_linear import select_config

    assert linear.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| smoke gate |")  # the table comes last
    result = json.loads((tmp_path / "linear.json").read_text())
    assert [(r["shape"], r["T"]) for r in result["rows"]] == [("smoke wide", 1), ("smoke wide", 2),
                                                              ("smoke gate", 1), ("smoke gate", 2)]
    for row in result["rows"]:
        assert row["rel_err"] < 1e-5 and row["ours_us"] > 0 and row["f_linear_us"] > 0
        assert len(row["sweep"]) == 2  # the heuristic's FMA form and the dot form
    table = json.loads((tmp_path / "linear_cpu.json").read_text())
    assert set(table["cpu"]) == {"96,128", "8,64"}
    for key, entry in table["cpu"].items():
        N, K = map(int, key.split(","))
        for T in (1, 2):
            chosen = select_config(N, K, T, "cpu", table)
            assert chosen is None or entry["max_t"] < T or chosen.block_n >= 1
    assert "| smoke wide | 96,128 | 1 |" in (tmp_path / "linear.md").read_text()


def test_table_max_t_is_the_largest_t_up_to_which_ours_wins_every_t():
    from expertmesh.bench.linear import table_entries

    config = dict(block_n=1, block_k=64, num_warps=4, num_stages=1, dot=False)
    rows = [{"N": 8, "K": 64, "T": t, "ours_us": ours, "f_linear_us": 3.0, "config": config}
            for t, ours in ((1, 1.0), (2, 2.0), (4, 4.0), (8, 1.0))]  # loses at 4: cuBLAS from 4 on, 8 too
    rows += [{"N": 16, "K": 64, "T": 1, "ours_us": 5.0, "f_linear_us": 3.0, "config": config}]
    entries = table_entries(rows)
    assert entries["8,64"]["max_t"] == 2 and set(entries["8,64"]) == {"1", "2", "4", "8", "max_t"}
    assert entries["16,64"]["max_t"] == 0
