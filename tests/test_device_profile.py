"""`engine/device_profile.py`: a rank's busy, idle and collective time from profiler records (the
arithmetic on hand-made records; the window on the CPU, where ops stand in for kernels), and the
executors' open/close calls."""
from __future__ import annotations

import pytest
import torch

from expertmesh.engine.device_profile import KernelWindow, Record, WindowSlot, busy_us, is_collective, summarize


def test_busy_time_is_the_union_of_overlapping_and_nested_intervals():
    records = [Record("a", 0, 10), Record("b", 5, 10), Record("c", 6, 2), Record("d", 30, 5), Record("e", 35, 1)]
    assert busy_us(records) == 15 + 6  # [0, 15) and [30, 36)
    assert busy_us([]) == 0


def test_summary_per_step_and_per_layer():
    records = [Record("gemm", 0, 40), Record("ncclDevKernel_SendRecv", 40, 20), Record("gemm", 70, 10),
               Record("ncclDevKernel_SendRecv", 80, 20)]
    s = summarize(records, window_us=200, steps=2, moe_layers=4)
    assert s == {"window_us": 100, "busy_us": 45, "idle_us": 55, "collective_us": 20, "a2a_us_per_layer": 5,
                 "kernels": 2}
    assert is_collective("void at::symm_mem::all_to_all_vdev_kernel") and not is_collective("triton_gemv")
    with pytest.raises(ValueError, match="steps must be > 0"):
        summarize(records, 200, 0, 4)


def test_window_on_the_cpu_sees_work_and_a_gloo_all_to_all(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        window = KernelWindow(torch.device("cpu"))
        window.start()
        x = torch.randn(256, 256)
        for _ in range(4):
            x = torch.tanh(x @ x)
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x)
        s = window.stop(steps=4, moe_layers=2)
    finally:
        dist.destroy_process_group()
    assert s["busy_us"] > 0 and s["kernels"] >= 3
    assert 0 < s["collective_us"] <= s["busy_us"] <= s["window_us"] + 1
    assert s["a2a_us_per_layer"] == pytest.approx(s["collective_us"] / 2)


def test_a_window_opens_once_and_closes_once():
    slot = WindowSlot()
    with pytest.raises(RuntimeError, match="no profiling window is open"):
        slot.toggle(torch.device("cpu"), 3, 1)
    assert slot.toggle(torch.device("cpu"), 0, 1) is None
    with pytest.raises(RuntimeError, match="open already"):
        slot.toggle(torch.device("cpu"), 0, 1)
    torch.randn(64, 64) @ torch.randn(64, 64)
    assert slot.toggle(torch.device("cpu"), 1, 1)["busy_us"] > 0
