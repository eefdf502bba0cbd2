"""The decode projections on one GPU: our small-batch GEMV (model/triton_linear.py) against
F.linear (cuBLAS) and the memory ceiling, at the Qwen3-30B-A3B and Qwen3-235B-A22B shapes.

Shapes (bf16 weights [N, K]): qkv_proj, o_proj and the router gate of each model, at T = 1, 2, 4
and 8 rows of x (the CUDA-graph batch sizes of decode). Every call reads another copy of the
weight, rotating through enough copies (>= 256 MB) that none is still in the 50 MB L2 when its
turn comes, as in a forward step where 48 layers' weights pass between two uses; the copies'
calls are captured in one CUDA graph and replayed, so launch gaps do not count (bench/gpu_timing.py's
method). The ceiling is the weight's bytes at the copy bandwidth measured in the same run.

For each shape and T a small candidate set of configs is swept (the heuristic's first, then
FMA and dot forms; `candidates`), the fastest kept, and written in the configs table's format
(model/configs/linear_<device>.json: copy it there to make it the default) with max_t = the
largest T up to which ours beat F.linear at every measured T (0: F.linear everywhere).

    python -m expertmesh.bench.linear --out DIR     (about a minute on an H200, compiles included)
    python -m expertmesh.bench.linear --smoke       (tiny shapes on the CPU under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name -> (N, K)
    "30b qkv": (5120, 2048), "30b o_proj": (2048, 4096), "30b gate": (128, 2048),
    "235b qkv": (9216, 4096), "235b o_proj": (4096, 8192), "235b gate": (128, 4096),
}
TS = (1, 2, 4, 8)
SMOKE_SHAPES = {"smoke wide": (96, 128), "smoke gate": (8, 64)}
ROTATION_BYTES = 256 << 20
MIN_LAUNCHES = 64
# (block_n, block_k, num_warps, num_stages, dot): block_k is capped to K and halved until the
# FMA accumulator fits the T's rows; configs with fewer than 32 programs are left out.
SWEEP = ((1, 4096, 4, 1, False), (1, 4096, 8, 1, False), (1, 1024, 4, 2, False), (2, 2048, 4, 1, False),
         (4, 1024, 4, 2, False), (8, 512, 4, 2, False), (8, 1024, 8, 2, False), (16, 512, 8, 2, False),
         (16, 256, 4, 3, False),
         (16, 128, 4, 4, True), (16, 256, 4, 4, True), (16, 512, 4, 3, True), (32, 128, 4, 4, True),
         (32, 256, 8, 3, True))
SMOKE_SWEEP = ((16, 128, 4, 4, True),)


def candidates(N: int, K: int, T: int, sweep=SWEEP, min_programs: int = 32) -> list:
    """The configs swept for T rows of an [N, K] weight: the heuristic's first, then `sweep`
    adapted to the shape (grids of fewer than min_programs programs left out), without repeats."""
    from expertmesh.model.triton_linear import LinearConfig, heuristic_config

    k_cap = 1 << max(4, (K - 1).bit_length())
    out = [heuristic_config(N, K, T)]
    for block_n, block_k, warps, stages, dot in sweep:
        config = LinearConfig(block_n, min(block_k, k_cap), warps, stages, dot)
        while not config.fits(N, K, T) and not config.dot and config.block_k > 64:
            config = LinearConfig(block_n, config.block_k // 2, warps, stages, dot)
        if config.fits(N, K, T) and -(-N // block_n) >= min(min_programs, N) and config not in out:
            out.append(config)
    return out


class Timer:
    """Seconds per call of fn(i) over the rotation: CUDA-graph replays on the GPU (launch gaps
    removed), wall clock of eager calls on the CPU (--smoke)."""

    def __init__(self, device: torch.device, repeats: int = 5) -> None:
        self.device, self.repeats = device, repeats

    def __call__(self, fn, copies: int) -> float:
        launches = max(copies, MIN_LAUNCHES) if self.device.type == "cuda" else copies
        order = [i % copies for i in range(launches)]

        def rotation():
            for i in order:
                fn(i)

        if self.device.type != "cuda":
            rotation()  # compiles, warms up
            t0 = time.perf_counter()
            rotation()
            return (time.perf_counter() - t0) / launches
        side = torch.cuda.Stream()  # warm up off the default stream before capture (bench/gpu_timing.py's way)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            rotation()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rotation()
        graph.replay()
        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / launches)
        del graph
        return statistics.median(times)


def bench_shape(name, N, K, timer, rates, deadline, device, dtype, *, ts=TS, sweep=SWEEP, rotation_bytes=ROTATION_BYTES,
                min_programs=32):
    from expertmesh.model.layers import linear_reference
    from expertmesh.model.triton_linear import linear_small

    gen = torch.Generator(device=device).manual_seed(N + K)
    weight_bytes = N * K * torch.empty((), dtype=dtype).element_size()
    copies = max(2, -(-rotation_bytes // weight_bytes))
    weights = [torch.randn(N, K, generator=gen, device=device).div_(K ** 0.5).to(dtype) for _ in range(copies)]
    rows = []
    for T in ts:
        x = torch.randn(T, K, generator=gen, device=device).to(dtype)
        out = torch.empty(T, N, device=device, dtype=dtype)
        ref = linear_reference(x, weights[0])
        flinear_s = timer(lambda i, x=x: F.linear(x, weights[i]), copies)
        tried = []
        for config in candidates(N, K, T, sweep, min_programs):
            if tried and time.monotonic() > deadline:
                break  # out of budget: the heuristic (first) is always measured
            try:
                got = linear_small(x, weights[0], config=config)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                s = timer(lambda i, x=x, out=out, config=config: linear_small(x, weights[i], out=out, config=config),
                          copies)
            except Exception as exc:  # a config that does not compile here (resources) is skipped, said so
                print(json.dumps({"shape": name, "T": T, "config": asdict(config), "error": repr(exc)[:300]}),
                      flush=True)
                continue
            tried.append({"config": asdict(config), "us": s * 1e6, "rel_err": err})
        best = min(tried, key=lambda r: r["us"])
        ceiling_us = weight_bytes / (rates.copy_gb_s * 1e3)
        row = {"shape": name, "N": N, "K": K, "T": T, "ours_us": best["us"], "config": best["config"],
               "rel_err": best["rel_err"], "heuristic_us": tried[0]["us"], "f_linear_us": flinear_s * 1e6,
               "ceiling_us": ceiling_us, "ours_pct_of_copy": 100 * ceiling_us / best["us"],
               "f_linear_pct_of_copy": 100 * ceiling_us / (flinear_s * 1e6), "copies": copies, "sweep": tried}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
    weights.clear()  # frees the rotation before the next shape's
    return rows


def table_entries(rows) -> dict:
    """{"N,K": entry} in the configs table's format; max_t: ours won at every T up to it."""
    from expertmesh.model.triton_linear import LinearConfig, config_entry

    entries = {}
    for key in sorted({(r["N"], r["K"]) for r in rows}):
        mine = sorted((r for r in rows if (r["N"], r["K"]) == key), key=lambda r: r["T"])
        max_t = 0
        for r in mine:
            if r["ours_us"] > r["f_linear_us"]:
                break
            max_t = r["T"]
        entries[f"{key[0]},{key[1]}"] = config_entry({r["T"]: LinearConfig(**r["config"]) for r in mine}, max_t)
    return entries


def markdown(rows, rates, device_name, seconds) -> str:
    lines = [f"Small-batch GEMV (Triton) vs F.linear, {device_name}: copy {rates.copy_gb_s:.0f} GB/s; weights cold "
             f"(rotated), CUDA-graph replays; {seconds:.0f} s with compiles", "",
             "| shape | N,K | T | ours us | F.linear us | ceiling us | ours % copy | F.linear % copy | ours/F.linear "
             "| heuristic us | config |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r["config"]
        form = f"{'dot' if c['dot'] else 'fma'} n{c['block_n']} k{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
        lines.append(f"| {r['shape']} | {r['N']},{r['K']} | {r['T']} | {r['ours_us']:.2f} | {r['f_linear_us']:.2f} "
                     f"| {r['ceiling_us']:.2f} | {r['ours_pct_of_copy']:.0f}% | {r['f_linear_pct_of_copy']:.0f}% "
                     f"| {r['ours_us'] / r['f_linear_us']:.2f} | {r['heuristic_us']:.2f} | {form} |")
    return "\n".join(lines) + "\n"


def _slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower().replace("nvidia", "")).strip("_") or "device"


def main(argv: list[str] | None = None) -> int:
    from expertmesh.bench.roofline import DeviceRates, measure_rates

    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for linear.json, linear.md and linear_<device>.json")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="after this many seconds only the heuristic's config is measured (it is always)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two configs: checks the script, on the CPU too")
    args = p.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("needs a CUDA device (or --smoke, with TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.smoke and device.type == "cpu":
        rates = DeviceRates(copy_gb_s=10.0, matmul_tflop_s=0.1)
    else:
        rates = measure_rates(device, dtype)
    print(json.dumps({"device": device_name, **asdict(rates)}), flush=True)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    kw = dict(ts=(1, 2), sweep=SMOKE_SWEEP, rotation_bytes=1 << 16, min_programs=1) if args.smoke else {}
    timer = Timer(device)
    rows = []
    for name, (N, K) in shapes.items():
        rows += bench_shape(name, N, K, timer, rates, start + args.budget_s, device, dtype, **kw)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = {device_name: table_entries(rows)}
    report = markdown(rows, rates, device_name, time.monotonic() - start)
    table_json = json.dumps(table, indent=2)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "linear.json").write_text(json.dumps({"device": device_name, "rates": asdict(rates), "rows": rows},
                                                    indent=2))
        (out / "linear.md").write_text(report)
        (out / f"linear_{_slug(device_name)}.json").write_text(table_json + "\n")
    print(f"configs table (model/configs/linear_{_slug(device_name)}.json):\n{table_json}")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
