"""The GPU engine beside its ceilings and transformers, in one run on one GPU.

    expertmesh bench gpu --out DIR                   # every part
    expertmesh bench gpu --out DIR --parts engine prefill
    expertmesh bench gpu --out DIR --parts engine moe --fp8   # and FP8 weights beside bf16

Parts (random bf16 weights made on the GPU, `load_format="dummy"`; the ceilings come from the
copy bandwidth and the bf16 matmul rate measured at the start of the same run, `bench/roofline.py`):

  engine     Qwen3-30B-A3B's shape (48 layers) through the whole engine (`EngineCore`, CUDA graphs):
             decode tok/s at batch 1, 64 and 256 (prompt 128, 128 new tokens), the median and the
             worst decode step; transformers `generate` on the same weights (its model built on the
             meta device, its parameters views of ours) at batch 1 and 64.
  prefill    the same engine: prompts of 32,768, 131,072 and 262,144 tokens with the default
             chunking, time to the first token and the paged-attention kernel's TFLOP/s (CUDA
             events around every call; FLOPs 4·d·H per attended (query, key) pair).
  longdecode the same engine: one 262,144-token sequence among 63 short ones, decode steps
             (the long prompt comes from the prefix cache of the prefill part), median and worst.
  step235b   Qwen3-235B-A22B's layer shape, 24 layers: decode step at batch 1, 64 and 256.
  ep         (with --ep N, N GPUs) the same 24 layers on EP=1 and on EP=N (Ray RankWorkers, NCCL,
             CUDA graphs): decode at batch 1, 64 and 256, tokens/s per GPU beside the per-GPU
             ceiling and EP=1's, and every rank's device view of 8 profiled decode steps
             (torch.profiler's kernel records: all-to-all per MoE layer, idle time per step).
             With --fp8, also the whole 235B model (94 layers) in FP8 on EP=N alone (one GPU
             cannot hold it), beside its FP8 ceiling.
  sp         (with --ep N) one 262,144-token prompt of the 30B shape on one GPU and sequence-
             parallel on N: time to the first token beside its compute ceiling, and the speed-up.
  eplb       (with --ep N) the load balancer under a skewed routing load (8 experts only rank 0
             holds given twice the router rows of each layer's 8 busiest, 8 redundant slots): decode at
             batch 256 before and after one balancer check, the ranks' load imbalance and the
             step beside its ceiling.
  moe        one 235B-shape MoE layer at 1, 64, 1,024 and 16,384 tokens (`bench/moe_layer.py`).
  attention  the paged-attention kernel alone (`bench/attention.py`).

With --fp8, the engine part runs again (batch 1 and 64) on the same shape stored as Qwen's FP8
checkpoints are (e4m3 weights, 128x128 block scales: the linear layers and experts stay FP8 and
the kernels scale each block as they read it), beside its FP8 ceiling (one byte a weight) and
the bf16 figure of the same run; the moe part adds fused_moe on FP8 experts.

Every step series reports its median and its worst step (spikes are what users feel). Writes
gpu.json, gpu.md and gpu_steps.png (step time against batch size: ours, the ceiling,
transformers) under --out, and prints the table last.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from expertmesh.bench.ep import QWEN3_235B_LAYER, write_model_dir
from expertmesh.bench.roofline import DeviceRates, measure_rates, step_ceiling
from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, ParallelConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.executor import InProcessExecutor
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.tokenizer import Tokenizer

QWEN3_30B = {**QWEN3_235B_LAYER, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
             "moe_intermediate_size": 768, "intermediate_size": 6144, "rope_theta": 10000000.0,
             "max_position_embeddings": 262144 + 1024}
"""Qwen3-30B-A3B-2507's shape (262,144 tokens native; 1,024 more here, so a 262,144-token prompt
can still decode the few tokens the long-context step is measured on)."""
PARTS = ("engine", "prefill", "longdecode", "step235b", "moe", "attention", "profile", "ep", "sp", "eplb")
MULTI_GPU_PARTS = ("ep", "sp", "eplb")
LONG = 262144


class StepRecorder:
    """Wraps an executor: the shape of every step and the time spent in the executor's calls for
    it (`execute`; under async scheduling `submit` plus `collect`, whose wait for the GPU absorbs
    whatever of the step the host's work did not hide)."""

    def __init__(self, executor) -> None:
        self.inner, self.steps = executor, []
        self.done: dict | None = None
        """The record of the step whose tokens came back last."""
        self._submitted: collections.deque[dict] = collections.deque()
        self.__dict__.update({k: getattr(executor, k)
                              for k in ("model_config", "num_blocks", "num_ranks", "overlaps_steps")
                              if hasattr(executor, k)})  # an EP group's executor never overlaps steps

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, plan):
        start = time.perf_counter()
        result = self.inner.execute(plan)
        self.steps.append(_step_record(plan, time.perf_counter() - start))
        self.done = self.steps[-1]
        return result

    def submit(self, plan):
        start = time.perf_counter()
        self.inner.submit(plan)
        self.steps.append(_step_record(plan, time.perf_counter() - start))
        self._submitted.append(self.steps[-1])

    def collect(self):
        start = time.perf_counter()
        result = self.inner.collect()
        self.done = self._submitted.popleft()
        self.done["seconds"] += time.perf_counter() - start
        return result


def _step_record(plan, seconds: float) -> dict:
    """The step's shape over every rank's chunks (one rank in-process; an EP group's ranks split the batch)."""
    ranks = [c for c in plan.chunks_by_rank if len(c)]
    return {"seconds": seconds, "seqs": sum(len(c) for c in ranks),
            "tokens": sum(int(c.num_tokens.sum()) for c in ranks),
            "decode": bool(ranks) and all(bool((c.num_tokens == 1).all()) for c in ranks),
            "max_context": max((int((c.starts + c.num_tokens).max()) for c in ranks), default=0)}


def build_engine(shape: dict, layers: int, *, max_model_len: int, max_num_seqs: int, kv_bytes: int,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens, device: str = "cuda",
                 dtype: str = "bfloat16", kernels: str = "auto", ep: int = 1, **parallel) -> EngineCore:
    """`ep` > 1: an EP group of `ep` RankWorkers on Ray (one GPU each), the step plan over Ray's
    compiled-graph channel; else the in-process executor. `parallel`: more `ParallelConfig` fields
    (the load balancer's, the sequence-parallel threshold)."""
    model_dir = write_model_dir(layers, shape)
    config = EngineConfig(
        load=ModelLoadConfig(str(model_dir), dtype=dtype, device=device, load_format="dummy",
                             max_model_len=max_model_len, kernels=kernels),
        cache=CacheConfig(block_size=16, kv_cache_memory_bytes=kv_bytes),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        parallel=ParallelConfig(ep_size=ep, startup_timeout_s=900, **parallel))
    if ep > 1:
        from expertmesh.cluster.executor import RayExecutor

        executor = StepRecorder(RayExecutor(config))
    else:
        executor = StepRecorder(InProcessExecutor(config, progress=True))
    return EngineCore(config, executor, Tokenizer.from_pretrained(model_dir))


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 150_000), (n, length), generator=gen).tolist()


def run(engine: EngineCore, prompts: list[list[int]], max_tokens: list[int] | int, tag: str) -> dict:
    """Run requests to completion; per-step records and each request's time to first token."""
    recorder: StepRecorder = engine.executor
    recorder.steps = []
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, counts)):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                           stream=True)
    first: dict[str, float] = {}
    with GcPauses() as pauses:
        while engine.has_unfinished():
            before = recorder.done
            step_start = time.perf_counter()
            pauses.seconds = 0.0
            outputs = engine.step()
            # The whole engine's step (scheduling, forward, detokenising), given to the step whose
            # tokens it waited for: under async scheduling the one submitted the call before.
            if recorder.done is not before:
                recorder.done["engine_seconds"] = time.perf_counter() - step_start
                recorder.done["gc_seconds"] = pauses.seconds
            for out in outputs:
                first.setdefault(out.request_id, time.perf_counter() - start)
                if out.finished and out.outputs[0].finish_reason not in ("length", "stop"):
                    raise RuntimeError(f"{out.request_id} ended with {out.outputs[0].finish_reason}: {out}")
    return {"wall_s": time.perf_counter() - start, "steps": recorder.steps, "ttft_s": first}


class GcPauses:
    """The garbage collector's pauses (`gc.callbacks`) summed into `seconds`, which the caller
    resets per step: whether a step's spike was a collection shows in its record."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def _series(steps: list[dict], pick) -> dict:
    """Median and worst of the executor's step times (forward, sampling, read-back) and of the
    whole engine's (plus scheduling, detokenising, outputs), and the longest garbage-collector
    pause inside one step."""
    times = [s["seconds"] for s in steps if pick(s)]
    if not times:
        return {"n": 0}
    median = statistics.median(times)
    engine = [s.get("engine_seconds", s["seconds"]) for s in steps if pick(s)]
    return {"n": len(times), "median_ms": median * 1e3, "worst_ms": max(times) * 1e3,
            "worst_over_median": max(times) / median, "engine_median_ms": statistics.median(engine) * 1e3,
            "engine_worst_ms": max(engine) * 1e3,
            "gc_worst_ms": max(s.get("gc_seconds", 0.0) for s in steps if pick(s)) * 1e3}


def part_engine(engine: EngineCore, rates: DeviceRates, batches=(1, 64, 256), hf_batches=(1, 64),
                new_tokens: int = 128, fp8_weights: bool = False, prompt_len: int = 128) -> list[dict]:
    config = engine.executor.model_config
    dtype = engine.executor.runner.dtype
    rows = []
    for batch in batches:
        prompts = _prompts(batch, prompt_len, config.vocab_size, seed=batch)
        run(engine, prompts, 8, f"warm{batch}")  # graphs and kernels warm at this batch size
        # Each batch starts with no garbage and nothing to walk but its own, as the engine freezes
        # its start-up heap: a part before (the profiler's events) and what the transformers twin
        # of the batch before brought (the library's modules, the twin's cycles) made a full
        # collection mid-run walk them, a 90 ms step at batch 256.
        gc.collect()
        gc.freeze()
        result = run(engine, prompts, new_tokens, f"b{batch}")
        decode = [s for s in result["steps"] if s["decode"] and s["seqs"] == batch]
        decode_s = sum(s.get("engine_seconds", s["seconds"]) for s in decode)
        ceiling = step_ceiling(config, rates, dtype, batch, batch, prompt_len + new_tokens // 2,
                               fp8_weights=fp8_weights)
        row = {"batch": batch, "decode_tok_s": batch * len(decode) / decode_s,
               "ceiling_tok_s": batch / ceiling, "ceiling_step_ms": ceiling * 1e3,
               "overall_tok_s": batch * new_tokens / result["wall_s"], **_series(decode, lambda s: True)}
        if batch in hf_batches:
            row["transformers_tok_s"] = transformers_decode_rate(engine, prompts, new_tokens=32)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


FP8_BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
"""Qwen3-*-FP8's quantization_config: the --fp8 engine's random weights are stored that way."""


def part_engine_fp8(rates: DeviceRates, bf16_rows: list[dict] | None, batches=(1, 64), *, shape: dict = QWEN3_30B,
                    layers: int = 48, block: int = 128, new_tokens: int = 128, prompt_len: int = 128,
                    **engine_kwargs) -> list[dict]:
    """The 30B shape as Qwen's FP8 checkpoint (e4m3, 128x128 block scales; dummy weights): the
    linear layers and experts stay FP8 and the kernels read half the bytes. Each row beside its
    FP8 ceiling and the bf16 figure of the same run (`bf16_rows`, from part_engine). The shape,
    block and build_engine's keywords are parameters so the CPU tests can walk it."""
    quant = {**FP8_BLOCK_CONFIG, "weight_block_size": [block, block]}
    engine = build_engine({**shape, "quantization_config": quant}, layers, max_model_len=4096,
                          max_num_seqs=max(batches), kv_bytes=engine_kwargs.pop("kv_bytes", 8 << 30), **engine_kwargs)
    if not engine.executor.runner.fp8_weights:
        raise RuntimeError("the FP8 engine fell back to dequantized weights (see the log for why)")
    rows = part_engine(engine, rates, batches=batches, hf_batches=(), new_tokens=new_tokens, fp8_weights=True,
                       prompt_len=prompt_len)
    bf16 = {row["batch"]: row["decode_tok_s"] for row in bf16_rows or []}
    for row in rows:
        if row["batch"] in bf16:
            row["bf16_tok_s"] = bf16[row["batch"]]
            row["fp8_over_bf16"] = row["decode_tok_s"] / bf16[row["batch"]]
    _free(engine)
    return rows


def transformers_decode_rate(engine: EngineCore, prompts: list[list[int]], new_tokens: int) -> float:
    """transformers' generate on the engine's own weights: decode tok/s = batch·(n-1) / (t(n) - t(1))."""
    runner = engine.executor.runner
    model = hf_model_on(runner)
    ids = torch.tensor(prompts, device=runner.device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        _sync(runner.device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0)
        _sync(runner.device)
        return time.perf_counter() - start

    timed(2)
    prefill, full = timed(1), timed(new_tokens)
    return len(prompts) * (new_tokens - 1) / (full - prefill)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_model_on(runner):
    """transformers' Qwen3-MoE built on the meta device, its parameters views of the runner's."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    c = runner.model_config
    hf_config = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        num_experts=c.num_experts, num_experts_per_tok=c.top_k, moe_intermediate_size=c.moe_intermediate_size,
        intermediate_size=c.intermediate_size, norm_topk_prob=c.norm_topk_prob, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope.theta, max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    hf_config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(hf_config).to(runner.dtype)
    ours = runner.model
    q, kv = c.q_size, c.kv_size
    views = {"model.embed_tokens.weight": ours.embed_tokens.weight, "model.norm.weight": ours.norm.weight,
             "lm_head.weight": ours.lm_head.weight}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        qkv = layer.attn.qkv_proj.weight
        views.update({
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q: q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": layer.attn.o_proj.weight,
            p + "self_attn.q_norm.weight": layer.attn.q_norm.weight,
            p + "self_attn.k_norm.weight": layer.attn.k_norm.weight,
            p + "mlp.gate.weight": layer.mlp.gate.weight, p + "mlp.experts.gate_up_proj": layer.mlp.experts.w13_EFD,
            p + "mlp.experts.down_proj": layer.mlp.experts.w2_EDF})
    for name, tensor in views.items():
        module_name, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(runner.device)  # its buffers, off the meta device
    missing = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"transformers tensors left on the meta device: {missing[:5]}")
    return hf.eval()


class AttentionTimer:
    """CUDA events around every paged-attention kernel call (the model looks the function up at
    call time, so wrapping the module attribute reaches every layer)."""

    def __init__(self) -> None:
        from expertmesh.model import attention

        self.module, self.inner, self.events = attention, attention.paged_attention_kernel, []

    def __enter__(self):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        self.module.paged_attention_kernel = timed
        return self

    def __exit__(self, *exc) -> None:
        self.module.paged_attention_kernel = self.inner

    def seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1e3


def part_prefill(engine: EngineCore, rates: DeviceRates, lengths=(32768, 131072, LONG)) -> list[dict]:
    c = engine.executor.model_config
    rows = []
    for length in lengths:
        prompt = _prompts(1, length, c.vocab_size, seed=length)[0]  # seeds apart: no prompt prefixes another
        with AttentionTimer() as timer:
            result = run(engine, [prompt], 1, f"prefill{length}")
        attn_s = timer.seconds()
        pairs = length * (length + 1) / 2
        flops = 4 * c.head_dim * c.num_heads * pairs * c.num_layers
        steps = result["steps"]
        row = {"prompt_tokens": length, "prefill_s": result["wall_s"], "steps": len(steps),
               "attention_s": attn_s, "attention_tflop_s": flops / attn_s / 1e12,
               "matmul_tflop_s": rates.matmul_tflop_s, **_series(steps, lambda s: True)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_longdecode(engine: EngineCore, rates: DeviceRates, new_tokens: int = 48) -> dict:
    """One 262,144-token sequence (its blocks still in the prefix cache from `part_prefill`) among
    63 short ones; the decode steps where all 64 decode."""
    c = engine.executor.model_config
    long_prompt = _prompts(1, LONG, c.vocab_size, seed=LONG)[0]
    short = _prompts(63, 128, c.vocab_size, seed=11)
    result = run(engine, [long_prompt, *short], new_tokens, "long")
    steps = [s for s in result["steps"] if s["decode"] and s["seqs"] == 64 and s["max_context"] >= LONG]
    context = (LONG + 63 * (128 + new_tokens // 2)) / 64
    ceiling = step_ceiling(c, rates, torch.bfloat16, 64, 64, context)
    row = {"seqs": 64, "long_context": LONG, "ceiling_step_ms": ceiling * 1e3, **_series(steps, lambda s: True)}
    row["over_ceiling"] = row.get("engine_median_ms", 0) / (ceiling * 1e3)
    print(json.dumps(row), flush=True)
    return row


def part_step235b(rates: DeviceRates, layers: int = 24) -> list[dict]:
    engine = build_engine(QWEN3_235B_LAYER, layers, max_model_len=1024, max_num_seqs=256, kv_bytes=6 << 30,
                          max_num_batched_tokens=8192)
    c = engine.executor.model_config
    rows = []
    for batch in (1, 64, 256):
        prompts = _prompts(batch, 128, c.vocab_size, seed=batch)
        run(engine, prompts, 4, f"warm{batch}")
        result = run(engine, prompts, 40, f"b{batch}")
        decode = [s for s in result["steps"] if s["decode"] and s["seqs"] == batch]
        ceiling = step_ceiling(c, rates, torch.bfloat16, batch, batch, 128 + 20)
        row = {"batch": batch, "layers": layers, "ceiling_step_ms": ceiling * 1e3, **_series(decode, lambda s: True)}
        # the engine's step (under async scheduling the period at which steps come back; the
        # executor's calls then cover only part of it), as users see it
        row["over_ceiling"] = row["engine_median_ms"] / row["ceiling_step_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    _free(engine)
    return rows


def part_profile(engine: EngineCore, batches=(1, 64), steps: int = 6, top: int = 18) -> list[dict]:
    """Where a decode step's time goes: the forward graph replayed alone (CUDA events), and each
    kernel's time per step from torch.profiler over eager steps (the same kernels, each visible)."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.executor.runner
    c = engine.executor.model_config
    rows = []
    for batch in batches:
        for i, prompt in enumerate(_prompts(batch, 128, c.vocab_size, seed=batch)):
            engine.add_request(f"prof{batch}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=3 * steps + 8,
                                                                            ignore_eos=True), stream=False)
        recorder: StepRecorder = engine.executor
        recorder.steps = []
        while not (recorder.steps and recorder.steps[-1]["decode"] and recorder.steps[-1]["seqs"] == batch):
            engine.step()  # the prefills
        engine_times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            engine_times.append(time.perf_counter() - start)
        executor_ms = statistics.median(s["seconds"] for s in recorder.steps[-steps - 1:-1]) * 1e3
        engine_ms = statistics.median(engine_times) * 1e3
        graphs, size = runner.graphs, runner.graphs.size_for(batch)
        times = []
        for _ in range(20):  # the last step's inputs are still in the static buffers
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs.run(size)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        runner.graphs = None
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    engine.step()
                torch.cuda.synchronize()
        finally:
            runner.graphs = graphs
        while engine.has_unfinished():
            engine.step()
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        kernels.sort(key=lambda e: -e.device_time_total)
        total_us = sum(e.device_time_total for e in kernels) / steps
        row = {"batch": batch, "engine_step_ms": engine_ms, "executor_step_ms": executor_ms,
               "async_scheduling": engine.can_overlap(), "graph_replay_ms": statistics.median(times),
               "kernel_us_per_step": total_us,
               "kernels_per_step": sum(e.count for e in kernels) / steps,
               "top": [{"name": e.key[:90], "us_per_step": e.device_time_total / steps,
                        "calls_per_step": e.count / steps} for e in kernels[:top]]}
        rows.append(row)
        print(f"[profile] batch {batch}: engine step {engine_ms:.3f} ms (async scheduling "
              f"{row['async_scheduling']}), executor step {executor_ms:.3f} ms, graph replay "
              f"{row['graph_replay_ms']:.3f} ms; kernels {total_us / 1e3:.3f} ms in {row['kernels_per_step']:.0f} "
              "launches per step", flush=True)
        for k in row["top"]:
            print(f"    {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}", flush=True)
    return rows


def _free(engine: EngineCore) -> None:
    engine.executor.inner.shutdown()  # unfreezes the collector's heap (engine/model_runner.py)
    del engine
    gc.unfreeze()
    gc.collect()
    torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    r = result["rates"]
    lines = [f"# expertmesh on {result['device']} (torch {result.get('torch', torch.__version__)})", "",
             f"Measured in this run: copy {r['copy_gb_s']:.0f} GB/s, bf16 matmul {r['matmul_tflop_s']:.0f} "
             "TFLOP/s" + (f", FP8 matmul {r['fp8_matmul_tflop_s']:.0f} TFLOP/s." if r.get("fp8_matmul_tflop_s")
                          else "."), ""]
    if "engine" in result:
        lines += ["## Qwen3-30B-A3B shape, whole engine (prompt 128, 128 new tokens)", "",
                  "| batch | decode tok/s | ceiling tok/s | transformers tok/s | engine step median ms | worst ms "
                  "| executor step median ms | worst ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["engine"]:
            hf = row.get("transformers_tok_s")
            lines.append(f"| {row['batch']} | {row['decode_tok_s']:,.0f} | {row['ceiling_tok_s']:,.0f} | "
                         f"{'-' if hf is None else f'{hf:,.1f}'} | {row['engine_median_ms']:.2f} | "
                         f"{row['engine_worst_ms']:.2f} | {row['median_ms']:.2f} | {row['worst_ms']:.2f} |")
        lines.append("")
    if "engine_fp8" in result:
        lines += ["## The same shape with FP8 weights (e4m3, 128x128 blocks)", "",
                  "| batch | decode tok/s | FP8 ceiling tok/s | bf16 tok/s (this run) | FP8 / bf16 | step median ms "
                  "| worst ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["engine_fp8"]:
            bf16, ratio = row.get("bf16_tok_s"), row.get("fp8_over_bf16")
            lines.append(f"| {row['batch']} | {row['decode_tok_s']:,.0f} | {row['ceiling_tok_s']:,.0f} | "
                         f"{'-' if bf16 is None else f'{bf16:,.0f}'} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{row['median_ms']:.2f} | {row['worst_ms']:.2f} |")
        lines.append("")
    if "prefill" in result:
        lines += ["## Prefill, 30B shape (default chunking)", "",
                  "| prompt | prefill s | attention s | attention TFLOP/s | worst step / median |",
                  "|---:|---:|---:|---:|---:|"]
        for row in result["prefill"]:
            lines.append(f"| {row['prompt_tokens']:,} | {row['prefill_s']:.1f} | {row['attention_s']:.1f} | "
                         f"{row['attention_tflop_s']:.0f} | {row['worst_over_median']:.2f} |")
        lines.append("")
    if "longdecode" in result:
        row = result["longdecode"]
        lines += ["## Decode: one 262,144-token sequence among 63 short ones (30B shape)", "",
                  f"engine step median {row.get('engine_median_ms', 0):.2f} ms, "
                  f"worst {row.get('engine_worst_ms', 0):.2f} ms over {row['n']} steps; "
                  f"ceiling {row['ceiling_step_ms']:.2f} ms ({row['over_ceiling']:.2f}x)", ""]
    if "step235b" in result:
        lines += ["## Qwen3-235B-A22B layer shape, 24 layers: decode step", "",
                  "| batch | engine step median ms | worst ms | ceiling ms | over ceiling |",
                  "|---:|---:|---:|---:|---:|"]
        for row in result["step235b"]:
            lines.append(f"| {row['batch']} | {row['engine_median_ms']:.2f} | {row['engine_worst_ms']:.2f} | "
                         f"{row['ceiling_step_ms']:.2f} | {row['over_ceiling']:.2f}x |")
        lines.append("")
    if "ep" in result:
        from expertmesh.bench.gpu_ep import markdown_ep

        lines += markdown_ep(result["ep"])
    if "ep_fp8" in result:
        from expertmesh.bench.gpu_ep import markdown_ep

        lines += markdown_ep(result["ep_fp8"], "Qwen3-235B-A22B, all 94 layers, FP8 weights (128x128 blocks): EP=N")
    if "sp" in result:
        from expertmesh.bench.gpu_ep import markdown_sp

        lines += markdown_sp(result["sp"])
    if "eplb" in result:
        from expertmesh.bench.gpu_ep import markdown_eplb

        lines += markdown_eplb(result["eplb"])
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in (("engine", "Qwen3-30B-A3B shape, whole engine"),
                                  ("step235b", "Qwen3-235B-A22B shape, 24 layers")) if k in result]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        rows = result[key]
        batches = [r["batch"] for r in rows]
        # the engine's step (under async scheduling the period at which steps come back: what
        # decode tok/s counts), not the executor's part of it
        ax.plot(batches, [r["engine_median_ms"] for r in rows], "o-", label="expertmesh (median)")
        ax.plot(batches, [r["engine_worst_ms"] for r in rows], "v:", label="expertmesh (worst step)")
        ax.plot(batches, [r["ceiling_step_ms"] for r in rows], "s--", label="ceiling")
        hf = [(r["batch"], 1e3 * r["batch"] / r["transformers_tok_s"]) for r in rows if r.get("transformers_tok_s")]
        if hf:
            ax.plot(*zip(*hf), "^-", label="transformers")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences decoding)")
        ax.set_ylabel("decode step (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['device']}: copy {result['rates']['copy_gb_s']:.0f} GB/s, "
                 f"matmul {result['rates']['matmul_tflop_s']:.0f} TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expertmesh bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="directory for gpu.json, gpu.md and gpu_steps.png")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                   help="which parts to run (default: all; ep, sp and eplb only with --ep 2 or more)")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="GPUs of the ep and sp parts, one rank each (N > 1 runs them: 1 and N side by side)")
    p.add_argument("--fp8", action="store_true",
                   help="also run the engine part (batch 1 and 64) and the MoE layer with FP8 weights (e4m3, "
                        "128x128 block scales, as Qwen3-*-FP8), beside bf16 and the FP8 ceiling")
    args = p.parse_args(argv)
    if args.parts is None:
        args.parts = [part for part in PARTS if part not in MULTI_GPU_PARTS or args.ep > 1]
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if set(MULTI_GPU_PARTS) & set(args.parts) and not 2 <= args.ep <= torch.cuda.device_count():
        p.error(f"the ep, sp and eplb parts need --ep N with 2 <= N <= the GPUs here ({torch.cuda.device_count()}), "
                f"got {args.ep}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = measure_rates(torch.device("cuda"), torch.bfloat16)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rates": rates.__dict__}
    print(json.dumps(result), flush=True)

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(result, indent=2))
        (out / "gpu.md").write_text(markdown(result))

    if {"engine", "prefill", "longdecode", "profile"} & set(args.parts):
        engine = build_engine(QWEN3_30B, 48, max_model_len=LONG + 1024, max_num_seqs=256, kv_bytes=34 << 30)
        if "profile" in args.parts:
            result["profile"] = part_profile(engine)
            save()
        if "engine" in args.parts:
            result["engine"] = part_engine(engine, rates)
            save()
        if "prefill" in args.parts:
            result["prefill"] = part_prefill(engine, rates)
            save()
        if "longdecode" in args.parts:
            result["longdecode"] = part_longdecode(engine, rates)
            save()
        _free(engine)
    if args.fp8 and "engine" in args.parts:
        result["engine_fp8"] = part_engine_fp8(rates, result.get("engine"))
        save()
    if "step235b" in args.parts:
        result["step235b"] = part_step235b(rates)
        save()
    if "ep" in args.parts:
        from expertmesh.bench.gpu_ep import part_ep

        result["ep"] = part_ep(rates, args.ep)
        save()
        if args.fp8:  # the whole 235B model (94 layers) in FP8: more than one GPU holds, so EP=N only
            fp8_shape = {**QWEN3_235B_LAYER, "quantization_config": FP8_BLOCK_CONFIG}
            result["ep_fp8"] = part_ep(rates, args.ep, shape=fp8_shape, layers=94, with_ep1=False, kv_bytes=8 << 30)
            save()
    if "sp" in args.parts:
        from expertmesh.bench.gpu_ep import part_sp_prefill

        result["sp"] = part_sp_prefill(rates, args.ep)
        save()
    if "eplb" in args.parts:
        from expertmesh.bench.gpu_ep import part_eplb

        result["eplb"] = part_eplb(rates, args.ep)
        save()
    if "moe" in args.parts:
        from expertmesh.bench import moe_layer

        moe_layer.main(["--out", str(out), "--tokens", "1", "64", "1024", "16384"] + (["--fp8"] if args.fp8 else []))
    if "attention" in args.parts:
        from expertmesh.bench import attention

        attention.main(["--out", str(out)])
    save()
    plot(result, out / "gpu_steps.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
