"""bench/gpu.py's parts for N GPUs: `ep`, decode of the 235B layer shape on EP=1 and EP=N, one
GPU per rank, each figure beside its per-GPU ceiling and EP=1's, and every rank's device view
(idle time, the all-to-all per MoE layer) from torch.profiler's kernel records with CUDA graphs
on; `sp`, one 262,144-token prompt prefilled on one GPU and sequence-parallel on N."""
from __future__ import annotations

import gc
import json

import torch

from expertmesh.bench.ep import QWEN3_235B_LAYER
from expertmesh.bench.gpu import LONG, QWEN3_30B, StepRecorder, _free, _prompts, _series, build_engine, run
from expertmesh.bench.roofline import DeviceRates, step_ceiling
from expertmesh.engine.core import EngineCore
from expertmesh.engine.sampling_params import SamplingParams


def _dtype(engine: EngineCore) -> torch.dtype:
    """The weights' dtype as the ceilings count it (the bench loads bfloat16, or float32 on a CPU)."""
    return torch.float32 if engine.config.load.dtype == "float32" else torch.bfloat16


def profiled_decode(engine: EngineCore, prompts: list[list[int]], steps: int, tag: str) -> list[dict]:
    """Each rank's device view of `steps` decode steps of `prompts` (`engine/device_profile.py`:
    busy, idle and collective time per step, all-to-all per MoE layer), CUDA graphs on."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 4,
                                                                  ignore_eos=True), stream=False)
    recorder: StepRecorder = engine.executor
    recorder.steps = []
    while not (recorder.steps and recorder.steps[-1]["decode"] and recorder.steps[-1]["seqs"] == len(prompts)):
        engine.step()  # the prefills, then one decode step
    engine.executor.profile_window()
    for _ in range(steps):
        engine.step()
    ranks = engine.executor.profile_window(steps)
    while engine.has_unfinished():
        engine.step()
    return ranks


def part_ep(rates: DeviceRates, ep: int, *, shape: dict = QWEN3_235B_LAYER, layers: int = 24,
            batches=(1, 64, 256), new_tokens: int = 40, prompt_len: int = 128, profile_steps: int = 8,
            with_ep1: bool = True, **engine_kwargs) -> list[dict]:
    """Decode of the 235B layer shape on EP=1 and EP=`ep` (one GPU per rank), each batch's step
    (median and worst) beside its per-GPU ceiling, tokens/s per GPU, EP=`ep` over EP=1 at the same
    batch, and every rank's device view of a profiled window: idle time per step, all-to-all per
    MoE layer (NCCL's kernels) and its share of the device's busy time. `with_ep1` False: EP=`ep`
    alone (a model one GPU cannot hold). A `quantization_config` in `shape` stores the weights as
    Qwen's FP8 checkpoints are, and the ceiling reads them as one byte each. The shape and
    build_engine's keywords are parameters so the CPU tests can walk it."""
    rows = []
    fp8 = "quantization_config" in shape
    for size in sorted({1, ep} if with_ep1 else {ep}):
        engine = build_engine(shape, layers, max_model_len=prompt_len + new_tokens + 16, max_num_seqs=max(batches),
                              max_num_batched_tokens=max(8192, max(batches) * prompt_len // size),
                              ep=size, **{"kv_bytes": 6 << 30, **engine_kwargs})
        c = engine.executor.model_config
        dtype = _dtype(engine)
        for batch in batches:
            prompts = _prompts(batch, prompt_len, c.vocab_size, seed=batch)
            run(engine, prompts, 4, f"warm{size}-{batch}")
            gc.collect()
            result = run(engine, prompts, new_tokens, f"ep{size}-b{batch}")
            decode = [s for s in result["steps"] if s["decode"] and s["seqs"] == batch]
            series = _series(decode, lambda s: True)
            ceiling = step_ceiling(c, rates, dtype, batch, batch, prompt_len + new_tokens // 2, size,
                                   fp8_weights=fp8)
            ranks = profiled_decode(engine, prompts, profile_steps, f"prof{size}-{batch}")
            row = {"ep": size, "batch": batch, "layers": layers, "fp8": fp8, "ceiling_step_ms": ceiling * 1e3,
                   **series,
                   "tok_s_per_gpu": batch / (series["engine_median_ms"] / 1e3) / size,
                   "ceiling_tok_s_per_gpu": batch / ceiling / size,
                   "a2a_us_per_layer": max(r["a2a_us_per_layer"] for r in ranks),
                   "a2a_share_of_busy": max(r["collective_us"] / r["busy_us"] if r["busy_us"] else 0.0 for r in ranks),
                   "idle_us_per_rank": [r["idle_us"] for r in ranks], "ranks": ranks}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
        _free(engine)
    one = {r["batch"]: r for r in rows if r["ep"] == 1}
    for row in rows:
        if row["ep"] > 1 and row["batch"] in one:
            base = one[row["batch"]]
            row["throughput_over_ep1"] = row["tok_s_per_gpu"] * row["ep"] / base["tok_s_per_gpu"]
            row["step_over_ep1"] = row["engine_median_ms"] / base["engine_median_ms"]
    return rows


def part_sp_prefill(rates: DeviceRates, ep: int, *, shape: dict | None = None, layers: int = 48,
                    length: int = LONG, min_tokens: int | None = None, **engine_kwargs) -> list[dict]:
    """One `length`-token prompt (the 30B shape by default) prefilled on one GPU and, sequence-
    parallel, on `ep` (the default threshold shards it: each rank holds 1/ep of its KV and computes
    1/ep of each chunk's attention). Time to the first token beside the compute ceiling of the
    same prefill on that many GPUs (communication not counted), and the speed-up over one GPU.
    `min_tokens`: the sharding threshold on N GPUs (None: the engine's default, 32,768)."""
    rows = []
    for size in sorted({1, ep}):
        engine = build_engine(shape or QWEN3_30B, layers, max_model_len=length + 1024, max_num_seqs=8, ep=size,
                              sequence_parallel_min_tokens=min_tokens if size > 1 else None,
                              **{"kv_bytes": 34 << 30, **engine_kwargs})
        c = engine.executor.model_config
        dtype = _dtype(engine)
        run(engine, _prompts(2, 256, c.vocab_size, seed=1), 2, f"warm-sp{size}")  # kernels and graphs warm
        prompt = _prompts(1, length, c.vocab_size, seed=length + size)[0]
        result = run(engine, [prompt], 1, f"sp{size}")
        ceiling = step_ceiling(c, rates, dtype, length, 1, length // 2, size)
        row = {"ep": size, "prompt_tokens": length, "prefill_s": result["wall_s"], "ceiling_s": ceiling,
               "steps": len(result["steps"]), "sharded": engine.sharded.wants(length),
               **_series(result["steps"], lambda s: True)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        _free(engine)
    if len(rows) == 2:
        rows[1]["speedup_over_one_gpu"] = rows[0]["prefill_s"] / rows[1]["prefill_s"]
    return rows


def _decode_window(engine: EngineCore, prompts: list[list[int]], steps: int, tag: str) -> dict:
    """`steps` decode steps of `prompts` (after their prefill): the step series, and the ranks' load
    imbalance over the window (busiest rank's routed copies over the mean, per MoE layer, under
    the layouts in force)."""
    executor = engine.executor.inner
    start = executor.expert_load()
    result = run(engine, prompts, steps, tag)
    imbalance = executor.balancer.rank_imbalance(executor.expert_load() - start)
    decode = [s for s in result["steps"] if s["decode"] and s["seqs"] == len(prompts)]
    return {**_series(decode, lambda s: True), "imbalance_mean": sum(imbalance) / len(imbalance),
            "imbalance_max": max(imbalance)}


def part_eplb(rates: DeviceRates, ep: int, *, shape: dict = QWEN3_235B_LAYER, layers: int = 24, batch: int = 256,
              steps: int = 32, prompt_len: int = 128, hot: int = 8, factor: float = 2.0, redundant: int | None = None,
              **engine_kwargs) -> dict:
    """The load balancer under a skewed routing load at EP=`ep`. After a warm-up, each MoE layer's
    router rows of `hot` experts that only rank 0 holds become `factor` x the rows of that layer's
    `hot` busiest experts (`RankWorker.skew_router`: random weights then send rank 0 the popular
    choices); `redundant` extra slots (default: `hot`). Decode at `batch` before and after one
    balancer check (`check_balance`: copies of the hot experts, experts moved between ranks): step
    median and worst, the ranks' load imbalance, and the step ceiling (an even load) beside them."""
    redundant = hot if redundant is None else redundant
    engine = build_engine(shape, layers, max_model_len=prompt_len + 2 * steps + 16, max_num_seqs=batch,
                          max_num_batched_tokens=max(8192, batch * prompt_len // ep), ep=ep,
                          num_redundant_experts=redundant, **{"kv_bytes": 6 << 30, **engine_kwargs})
    try:
        executor = engine.executor.inner
        c = executor.model_config
        dtype = _dtype(engine)
        prompts = _prompts(batch, prompt_len, c.vocab_size, seed=batch)
        run(engine, prompts, 4, "eplb-warm")
        layout = executor.balancer.layouts_LP[0]
        rank0 = layout[: len(layout) // ep]
        hot_experts = [e for e in rank0 if layout.count(e) == 1][:hot]  # one copy, on rank 0
        busiest_L = executor.expert_load().topk(len(hot_experts), dim=1).indices.tolist()
        executor.skew_router(hot_experts, busiest_L, factor)
        before = _decode_window(engine, prompts, steps, "eplb-before")
        moved = executor.check_balance()
        run(engine, prompts, 4, "eplb-warm-after")
        after = _decode_window(engine, prompts, steps, "eplb-after")
        ceiling = step_ceiling(c, rates, dtype, batch, batch, prompt_len + steps // 2, ep)
    finally:
        _free(engine)
    row = {"ep": ep, "batch": batch, "layers": layers, "hot_experts": hot, "router_factor": factor,
           "redundant": redundant, "moved": moved, "ceiling_step_ms": ceiling * 1e3, "before": before, "after": after,
           "step_after_over_before": after["engine_median_ms"] / before["engine_median_ms"]}
    print(json.dumps(row), flush=True)
    return row


def markdown_eplb(row: dict) -> list[str]:
    lines = [f"## Load balancer under a skewed load: EP={row['ep']}, batch {row['batch']}, {row['layers']} layers, "
             f"{row['hot_experts']} hot experts (the busiest rows x{row['router_factor']:g}), "
             f"{row['redundant']} redundant slots", "",
             "| | step median ms | worst ms | ceiling ms | busiest rank / mean (mean over layers, worst layer) |",
             "|---|---:|---:|---:|---:|"]
    for name in ("before", "after"):
        r = row[name]
        lines.append(f"| {name} | {r['engine_median_ms']:.2f} | {r['engine_worst_ms']:.2f} | "
                     f"{row['ceiling_step_ms']:.2f} | {r['imbalance_mean']:.2f}, {r['imbalance_max']:.2f} |")
    lines += ["", f"Experts moved: {'yes' if row['moved'] else 'no'}; step after / before: "
              f"{row['step_after_over_before']:.2f}x.", ""]
    return lines


def markdown_sp(rows: list[dict]) -> list[str]:
    lines = ["## Sequence-parallel prefill: one long prompt on one GPU and on N", "",
             "| GPUs | prompt tokens | sharded | prefill s | ceiling s | speed-up over one GPU | worst step ms |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        speedup = row.get("speedup_over_one_gpu")
        lines.append(f"| {row['ep']} | {row['prompt_tokens']:,} | {'yes' if row['sharded'] else 'no'} | "
                     f"{row['prefill_s']:.2f} | {row['ceiling_s']:.2f} | "
                     f"{'-' if speedup is None else f'{speedup:.2f}x'} | {row['worst_ms']:.1f} |")
    lines.append("")
    return lines


def markdown_ep(rows: list[dict], title: str = "Expert parallelism, 235B layer shape, 24 layers: EP=1 and EP=N "
                                                "on one GPU per rank") -> list[str]:
    lines = [f"## {title}", "",
              "| EP | batch | tok/s per GPU | ceiling tok/s per GPU | step median ms | worst ms | ceiling ms "
              "| over EP=1 (throughput, step) | a2a us/layer | a2a share of busy | idle us/step per rank |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        over = (f"{row['throughput_over_ep1']:.2f}x, {row['step_over_ep1']:.2f}x"
                if "throughput_over_ep1" in row else "-")
        idle = " / ".join(f"{x:.0f}" for x in row["idle_us_per_rank"])
        lines.append(f"| {row['ep']} | {row['batch']} | {row['tok_s_per_gpu']:,.0f} | "
                     f"{row['ceiling_tok_s_per_gpu']:,.0f} | {row['engine_median_ms']:.2f} | "
                     f"{row['engine_worst_ms']:.2f} | {row['ceiling_step_ms']:.2f} | {over} | "
                     f"{row['a2a_us_per_layer']:.0f} | {row['a2a_share_of_busy']:.0%} | {idle} |")
    lines.append("")
    return lines
