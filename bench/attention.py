"""Paged attention on one GPU: the Triton kernel's decode bandwidth and prefill FLOP rate.

Shapes of Qwen3-30B-A3B (32 query / 4 KV heads) and Qwen3-235B-A22B (64/4), head dim 128, bf16,
KV blocks of 16 scattered at random over a cache pool. Each kind sweeps a few kernel configs and
keeps the fastest, which is written in the configs table's format (model/configs/attention_*.json).

  decode:  B=1 at 256/1k/4k/32k/262k, B=64 at 4k, 63 sequences of 1k plus one of 262k (32/4
           heads), planned as the engine plans them (model/attention.py `decode_split_args`: short
           contexts of a small batch split into pieces of the kernel's BLOCK_N). Timed as CUDA-graph
           replays of the step's launches (what the engine replays), each replay with other random
           block tables so that no rep finds its keys in L2. Figure: GB/s of K/V read against the
           copy bandwidth measured in the same run. Then, with the best config, the short contexts
           under three split rules: the default (pieces >= 256 keys), the engine's, and pieces of
           one BLOCK_N tile each.
  prefill: a 32k prompt in chunks of 2048 and of 8192 queries, each against its cached context,
           and the last 8192-query chunk of a 262,144-token prompt (32/4 and 64/4 heads). Figure:
           TFLOP/s of causal attention (4*d*H per attended (query, key) pair) against the bf16
           matmul rate, beside torch SDPA (flash) with the same causal mask on contiguous K/V.

    python -m expertmesh.bench.attention --out DIR     (about 2-3 minutes on an H200, compiles included)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertmesh.bench.roofline import measure_rates
from expertmesh.model.paged_attention import AttentionConfig, config_key, default_config, plan_attention, plan_to_device

D, S = 128, 16
DECODE_HEADS = (32, 4)
PREFILL_HEADS = ((32, 4), (64, 4))
DECODE_CASES = (("B=1 ctx 256", [256]), ("B=1 ctx 1k", [1024]), ("B=1 ctx 4k", [4096]), ("B=1 ctx 32k", [32768]),
                ("B=1 ctx 262k", [262144]),
                ("B=64 ctx 4k", [4096] * 64), ("63 x 1k + 1 x 262k", [1024] * 63 + [262144]))
PREFILL_CASES = (("32k prompt, chunks of 2048", 32768, 2048, False), ("32k prompt, chunks of 8192", 32768, 8192, False),
                 ("last 8192 of a 262k prompt", 262144, 8192, True))
# (block_m, block_n, num_warps, num_stages); the default config comes first, so it is always measured.
DECODE_SWEEP = ((16, 32, 4, 4), (16, 32, 4, 6), (16, 64, 4, 5), (16, 128, 4, 3), (16, 128, 4, 5), (16, 128, 8, 3),
                (16, 256, 8, 2))
PREFILL_SWEEP = ((128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
                 (64, 64, 4, 3), (128, 32, 4, 3))
SPLIT_CASES = ("B=1 ctx 256", "B=1 ctx 1k", "B=1 ctx 4k")  # compared under the three split rules
SPLIT_RULES = ("default", "engine", "tile")
SMOKE = dict(decode_cases=(("B=2 ctx 40/70", [40, 70]), ("B=1 ctx 300", [300])), split_cases=("B=1 ctx 300",),
             prefill_cases=(("96 prompt, chunks of 32", 96, 32, False),), decode_sweep=((16, 16, 4, 2),),
             prefill_sweep=((32, 16, 4, 2),))


class Rig:
    """Timing and capture that work on the GPU (CUDA events and graphs) and, for --smoke, on the
    CPU with Triton's interpreter (wall clock, eager)."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn) -> float:
        fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graphed(self, fn):
        """fn captured in a CUDA graph (after one eager run that compiles), or fn itself on the CPU."""
        fn()
        self.sync()
        if not self.cuda:
            return fn
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


def _config(spec) -> AttentionConfig:
    return AttentionConfig(*spec)


def _sweep(specs, default: AttentionConfig):
    """The default first, then the other candidates."""
    first = (default.block_m, default.block_n, default.num_warps, default.num_stages)
    return [_config(first)] + [_config(s) for s in specs if tuple(s) != first]


def _tables(lens, num_blocks, count, device, gen):
    """`count` block tables [B, M] of distinct random blocks for sequences of `lens` keys."""
    need = [-(-n // S) for n in lens]
    M = max(need)
    out = []
    for _ in range(count):
        pick = torch.randperm(num_blocks, generator=gen, device=device)[: sum(need)].to(torch.int32)
        table = torch.zeros(len(lens), M, dtype=torch.int32, device=device)
        at = 0
        for b, n in enumerate(need):
            table[b, :n] = pick[at: at + n]
            at += n
        out.append(table)
    return out


def _split_args(rule, qs, lens, num_sms, block_n):
    """plan_attention's split arguments under a rule: "default", "engine" (what the engine's
    planner passes: model/attention.py decode_split_args) or "tile" (pieces of one BLOCK_N)."""
    from expertmesh.model.attention import decode_split_args

    H, G = DECODE_HEADS
    if rule == "engine":
        return decode_split_args(qs, lens, num_q_heads=H, num_kv_heads=G, num_sms=num_sms, block_n=block_n)
    return {} if rule == "default" else dict(min_split_keys=block_n, split_granule=block_n)


def _time_decode(rig, rates, cache, num_sms, name, lens, cfg, gen, rule="engine"):
    """One decode case with this config, planned under `rule`: a table row."""
    from expertmesh.model.triton_attention import AttentionWorkspace, paged_attention

    H, G = DECODE_HEADS
    device = cache.device
    B = len(lens)
    qs = np.arange(B + 1)
    split = _split_args(rule, qs, np.asarray(lens), num_sms, cfg.block_n)
    plan = plan_attention(qs, np.asarray(lens), num_q_heads=H, num_kv_heads=G, num_sms=num_sms, capacity=B, **split)
    pt = plan_to_device(plan, device)
    ws = AttentionWorkspace.allocate(plan.partial_rows, D, device)
    q = torch.randn(B, H, D, generator=gen, device=device).to(cache.dtype)
    out, lse = torch.empty_like(q), torch.empty(B, H, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q_start = torch.arange(B + 1, dtype=torch.int32, device=device)
    reps = 16 if sum(lens) < 1 << 20 else 4  # enough tables that one replay overflows L2
    tables = _tables(lens, cache.shape[1], reps, device, gen)

    def launches():
        for table in tables:
            paged_attention(q, cache, table, seq_lens, q_start, pt, scale=D ** -0.5, out=out, lse=lse,
                            workspace=ws, configs={"decode": cfg})

    us = rig.time_ms(rig.graphed(launches)) * 1e3 / len(tables)
    kv_bytes = 2 * sum(lens) * G * D * cache.element_size()
    return {"case": name, "time_us": us, "kv_gb_s": kv_bytes / us / 1e3,
            "pct_of_copy": 100 * kv_bytes / us / 1e3 / rates.copy_gb_s,
            "items": plan.decode.num_items, "splits": plan.decode.num_groups, "rule": rule, "split_args": split}


def bench_decode(rig, rates, cache, num_sms, cases, sweep, deadline, gen, split_cases=SPLIT_CASES):
    results = []
    for cfg in _sweep(sweep, default_config("decode", D)):
        if time.monotonic() > deadline and results:
            break
        rows = []
        try:
            for name, lens in cases:
                rows.append(_time_decode(rig, rates, cache, num_sms, name, lens, cfg, gen))
        except Exception as exc:  # a config that does not fit (shared memory, registers) is skipped
            print(json.dumps({"decode_config": asdict(cfg), "error": repr(exc)[:300]}), flush=True)
            continue
        score = statistics.geometric_mean([r["kv_gb_s"] for r in rows])
        results.append({"config": asdict(cfg), "geomean_gb_s": score, "rows": rows})
        print(json.dumps(results[-1]), flush=True)
    if not results:
        raise RuntimeError("no decode config ran (see the errors above)")
    best = max(results, key=lambda r: r["geomean_gb_s"])
    cfg = AttentionConfig(**best["config"])
    splits = [_time_decode(rig, rates, cache, num_sms, name, lens, cfg, gen, rule)
              for name, lens in cases if name in split_cases for rule in SPLIT_RULES]
    for row in splits:
        print(json.dumps({"split_rule": row}), flush=True)
    return {"sweep": results, "best": best, "splits": splits}


def _prefill_inputs(prompt, H, G, device, dtype, gen):
    blocks = -(-prompt // S)
    cache = torch.randn(2, blocks + 8, S, G, D, generator=gen, device=device).to(dtype)
    table = torch.randperm(blocks + 8, generator=gen, device=device)[:blocks].to(torch.int32)[None]
    return cache, table


def _chunks(prompt, chunk, last_only):
    starts = list(range(0, prompt, chunk))
    return [(c, min(prompt, c + chunk)) for c in (starts[-1:] if last_only else starts)]


def _causal_flops(c0, c1, H):
    """Query positions c0..c1-1, each attending keys 0..p: (c0+1) + ... + c1 pairs."""
    return 4 * D * H * (c1 - c0) * (c0 + 1 + c1) // 2


def bench_prefill(rig, rates, H, G, num_sms, cases, sweep, deadline, gen, device, dtype):
    from expertmesh.model.triton_attention import paged_attention

    inputs = {}
    for prompt in sorted({case[1] for case in cases}):
        inputs[prompt] = _prefill_inputs(prompt, H, G, device, dtype, gen)
    qs = {}
    results = []
    for cfg in _sweep(sweep, default_config("prefill", D)):
        if time.monotonic() > deadline and results:
            break
        rows = []
        try:
            for name, prompt, chunk, last_only in cases:
                cache, table = inputs[prompt]
                steps = []
                for c0, c1 in _chunks(prompt, chunk, last_only):
                    key = (prompt, c0, c1)
                    if key not in qs:
                        qs[key] = torch.randn(c1 - c0, H, D, generator=gen, device=device).to(dtype)
                    plan = plan_attention(np.array([0, c1 - c0]), np.array([c1]), num_q_heads=H, num_kv_heads=G,
                                          num_sms=num_sms, prefill_block_m=cfg.block_m)
                    steps.append((qs[key], torch.tensor([c1], dtype=torch.int32, device=device),
                                  torch.tensor([0, c1 - c0], dtype=torch.int32, device=device),
                                  plan_to_device(plan, device), torch.empty_like(qs[key])))

                def run(steps=steps, cache=cache, table=table, cfg=cfg):
                    for q, seq_lens, q_start, pt, out in steps:
                        paged_attention(q, cache, table, seq_lens, q_start, pt, scale=D ** -0.5, out=out,
                                        configs={"prefill": cfg})

                ms = rig.time_ms(run)
                flops = sum(_causal_flops(c0, c1, H) for c0, c1 in _chunks(prompt, chunk, last_only))
                rows.append({"case": name, "time_ms": ms, "tflop_s": flops / ms / 1e9,
                             "pct_of_matmul": 100 * flops / ms / 1e9 / rates.matmul_tflop_s})
        except Exception as exc:
            print(json.dumps({"prefill_config": asdict(cfg), "heads": f"{H}/{G}", "error": repr(exc)[:300]}),
                  flush=True)
            continue
        score = statistics.geometric_mean([r["tflop_s"] for r in rows])
        results.append({"config": asdict(cfg), "geomean_tflop_s": score, "rows": rows})
        print(json.dumps({"heads": f"{H}/{G}", **results[-1]}), flush=True)
    if not results:
        raise RuntimeError(f"no prefill config ran for {H}/{G} heads (see the errors above)")
    best = max(results, key=lambda r: r["geomean_tflop_s"])
    sdpa = bench_sdpa(rig, H, G, cases, inputs, qs, best["config"], num_sms, device)
    return {"sweep": results, "best": best, "sdpa": sdpa}


def bench_sdpa(rig, H, G, cases, inputs, qs, best_cfg, num_sms, device):
    """torch SDPA on contiguous K/V (the cache gathered, heads expanded), the same causal mask
    (lower-right for a chunk after its context), flash backend where it takes it. Also the
    largest difference between its output and ours on each case's last chunk."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from expertmesh.model.triton_attention import paged_attention

    rows = []
    for name, prompt, chunk, last_only in cases:
        cache, table = inputs[prompt]
        n = table.shape[1]
        k_HLd, v_HLd = (cache[i][table[0].long()].reshape(n * S, G, D)[:prompt].transpose(0, 1)
                        .repeat_interleave(H // G, dim=0)[None] for i in (0, 1))
        chunks = _chunks(prompt, chunk, last_only)

        def sdpa(c0, c1, k_HLd=k_HLd, v_HLd=v_HLd, prompt=prompt):
            q = qs[(prompt, c0, c1)].transpose(0, 1)[None]
            k, v = k_HLd[:, :, :c1], v_HLd[:, :, :c1]
            if c0 == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c1 - c0, c1), scale=D ** -0.5)

        row = {"case": name}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    ms = rig.time_ms(lambda chunks=chunks, sdpa=sdpa: [sdpa(c0, c1) for c0, c1 in chunks])
                    ref = sdpa(*chunks[-1])[0].transpose(0, 1)
                flops = sum(_causal_flops(c0, c1, H) for c0, c1 in chunks)
                row.update(backend=backend.name.lower(), time_ms=ms, tflop_s=flops / ms / 1e9)
                break
            except Exception as exc:  # e.g. a backend that does not take the lower-right mask
                row["error_" + backend.name.lower()] = repr(exc)[:200]
        if "time_ms" in row:
            c0, c1 = chunks[-1]
            plan = plan_attention(np.array([0, c1 - c0]), np.array([c1]), num_q_heads=H, num_kv_heads=G,
                                  num_sms=num_sms, prefill_block_m=best_cfg["block_m"])
            ours, _ = paged_attention(qs[(prompt, c0, c1)], cache, table, torch.tensor([c1], dtype=torch.int32,
                                      device=device), torch.tensor([0, c1 - c0], dtype=torch.int32, device=device),
                                      plan_to_device(plan, device), scale=D ** -0.5,
                                      configs={"prefill": AttentionConfig(**best_cfg)})
            row["max_abs_diff_vs_ours"] = (ours.float() - ref.float()).abs().max().item()
        rows.append(row)
        print(json.dumps({"heads": f"{H}/{G}", "sdpa": row}), flush=True)
        del k_HLd, v_HLd
    return rows


def _slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower().replace("nvidia", "")).strip("_") or "device"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for attention.json, attention.md and attention_<device>.json")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="stop sweeping new configs after this many seconds (the best so far is kept)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one config: checks the script, on the CPU too")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("needs a CUDA device (or --smoke, with TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    small = SMOKE if args.smoke else {}
    decode_cases = small.get("decode_cases", DECODE_CASES)
    prefill_cases = small.get("prefill_cases", PREFILL_CASES)
    rig = Rig(device, reps=2 if args.smoke else 5)
    gen = torch.Generator(device=device).manual_seed(0)
    rates = measure_rates(device, dtype)
    print(json.dumps({"device": device_name, "sms": num_sms, **asdict(rates)}), flush=True)

    pool_tokens = max(sum(lens) for _, lens in decode_cases)
    pool_blocks = 2 * -(-pool_tokens // S) + 64  # room for tables that differ from rep to rep
    cache = torch.randn(2, pool_blocks, S, DECODE_HEADS[1], D, generator=gen, device=device).to(dtype)
    decode = bench_decode(rig, rates, cache, num_sms, decode_cases, small.get("decode_sweep", DECODE_SWEEP),
                          deadline - 0.6 * args.budget_s, gen, small.get("split_cases", SPLIT_CASES))
    del cache
    prefill = {}
    for i, (H, G) in enumerate(PREFILL_HEADS):
        share = deadline - 0.3 * args.budget_s * (len(PREFILL_HEADS) - 1 - i)
        prefill[f"{H}/{G}"] = bench_prefill(rig, rates, H, G, num_sms, prefill_cases,
                                            small.get("prefill_sweep", PREFILL_SWEEP), share, gen, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = {device_name: {config_key("decode", D, DECODE_HEADS[0] // DECODE_HEADS[1]): decode["best"]["config"]}}
    for H, G in PREFILL_HEADS:
        table[device_name][config_key("prefill", D, H // G)] = prefill[f"{H}/{G}"]["best"]["config"]
    lines = [f"Paged attention (Triton), bf16, d={D}, blocks of {S}, {device_name}: copy {rates.copy_gb_s:.0f} GB/s, "
             f"matmul {rates.matmul_tflop_s:.0f} TFLOP/s; {time.monotonic() - start:.0f} s with compiles", "",
             f"decode, {DECODE_HEADS[0]}/{DECODE_HEADS[1]} heads, config {decode['best']['config']}", "",
             "| case | us | KV GB/s | % of copy | items | split seqs |", "|---|---:|---:|---:|---:|---:|"]
    for r in decode["best"]["rows"]:
        lines.append(f"| {r['case']} | {r['time_us']:.1f} | {r['kv_gb_s']:.0f} | {r['pct_of_copy']:.0f}% "
                     f"| {r['items']} | {r['splits']} |")
    lines += ["", "decode split rules (default: pieces >= 256 keys; engine: decode_split_args; tile: one BLOCK_N "
              "a piece), same config", "", "| case | rule | us | pieces (items) | split args |",
              "|---|---|---:|---:|---|"]
    for r in decode["splits"]:
        lines.append(f"| {r['case']} | {r['rule']} | {r['time_us']:.1f} | {r['items']} | {r['split_args'] or '-'} |")
    for heads, res in prefill.items():
        lines += ["", f"prefill, {heads} heads, config {res['best']['config']}", "",
                  "| case | ms | TFLOP/s | % of matmul | SDPA TFLOP/s | ours / SDPA | max diff |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r, s in zip(res["best"]["rows"], res["sdpa"]):
            sdpa = f"{s['tflop_s']:.0f} ({s['backend']})" if "tflop_s" in s else "n/a"
            ratio = f"{r['tflop_s'] / s['tflop_s']:.2f}x" if "tflop_s" in s else "n/a"
            diff = f"{s['max_abs_diff_vs_ours']:.1e}" if "max_abs_diff_vs_ours" in s else "n/a"
            lines.append(f"| {r['case']} | {r['time_ms']:.2f} | {r['tflop_s']:.0f} | {r['pct_of_matmul']:.0f}% "
                         f"| {sdpa} | {ratio} | {diff} |")
    report = "\n".join(lines) + "\n"
    table_json = json.dumps(table, indent=2)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention.json").write_text(json.dumps({"device": device_name, "rates": asdict(rates),
                                                        "decode": decode, "prefill": prefill}, indent=2))
        (out / "attention.md").write_text(report)
        (out / f"attention_{_slug(device_name)}.json").write_text(table_json + "\n")
    print(report)
    print(f"configs table (model/configs/attention_{_slug(device_name)}.json):\n{table_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
