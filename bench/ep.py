"""Expert-parallel decode on the GPU: step time at several batch sizes, EP=1 beside EP=R.

The model has Qwen3-235B-A22B's layer shape (hidden 4096, 64/4 heads of 128, 128 experts,
top-8, expert FFN 1536, vocab 151,936) with random bf16 weights made on the GPUs
(load_format "dummy"), and as many layers as --layers says. For each batch size, B requests
of --prompt-len random tokens are prefilled, then --decode-steps decode steps are timed one by one:

  step_ms       median wall time of a decode step, as the engine core sees it
  moe_us        one MoE layer (gate, dispatch, experts, combine), CUDA events, per layer
  a2a_us        all-to-alls inside one MoE layer (decode: rows out and partial sums back; prefill: counts too)
  control_ms    the Ray call per step: executor wall time minus the slowest rank's compute
  ceiling_ms    the roofline of the same step (bench/roofline.py; communication excluded)

    python -m expertmesh.bench.ep --ep 1 --layers 24 --out $OUT      # one GPU, in-process
    python -m expertmesh.bench.ep --ep 2 --layers 24 --out $OUT      # two RankWorkers over NCCL
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from expertmesh.bench.roofline import measure_rates, step_ceiling
from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, ParallelConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.executor import InProcessExecutor
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.config import ModelConfig
from expertmesh.model.tokenizer import Tokenizer

QWEN3_235B_LAYER = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "moe_intermediate_size": 1536, "intermediate_size": 12288,
    "vocab_size": 151936, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "hidden_act": "silu", "torch_dtype": "bfloat16",
}
SMOKE_SHAPE = {**QWEN3_235B_LAYER, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
               "head_dim": 32, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
               "vocab_size": 2048}
"""A small shape of the same family, to try the benchmark on a CPU."""


def write_model_dir(layers: int, shape: dict) -> Path:
    """config.json with `shape` and `layers` layers, beside the tiny tokenizer."""
    from expertmesh.model.tiny import make_tiny

    out = Path(tempfile.mkdtemp(prefix="em-235b-"))
    tiny = make_tiny(out / "tiny", num_layers=1, num_shards=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, out / name)
    (out / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": layers}))
    return out


def build_engine(model_dir: Path, ep: int, args) -> EngineCore:
    config = EngineConfig(
        load=ModelLoadConfig(str(model_dir), dtype=args.dtype, device=args.device, load_format="dummy",
                             max_model_len=args.prompt_len + args.decode_steps + 8),
        cache=CacheConfig(block_size=16, num_blocks=args.kv_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batch),
                                  max_num_batched_tokens=max(args.batch) * args.prompt_len),
        parallel=ParallelConfig(ep_size=ep, time_collectives=True, cpus_per_rank=args.cpus_per_rank,
                                startup_timeout_s=300, step_channel=args.step_channel),
    )
    if ep == 1:
        executor = InProcessExecutor(config, progress=False)
    else:
        from expertmesh.cluster.executor import RayExecutor

        executor = RayExecutor(config)
    return EngineCore(config, executor, Tokenizer.from_pretrained(model_dir))


def measure(engine: EngineCore, ep: int, batch: int, args, timer) -> dict:
    gen = torch.Generator().manual_seed(batch)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 2, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params, stream=False)
    engine.step()  # the prefill of every prompt (the step budget holds them all)
    stages = timer()  # reset
    executor = engine.executor
    control_before = getattr(executor, "control_seconds", 0.0)
    steps_before = engine.num_steps
    times = []
    for _ in range(args.decode_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    stages = timer()
    steps = engine.num_steps - steps_before
    while engine.has_unfinished():
        engine.step()
    layers = len(engine.executor.model_config.moe_layers)
    moe = max(s.get("moe", 0.0) for s in stages) / (steps * layers)
    # The slowest rank's all-to-all time includes waiting for the others to arrive; the fastest
    # rank's is closest to the transfer itself.
    a2a = max(s.get("all_to_all", 0.0) for s in stages) / (steps * layers)
    a2a_min = min(s.get("all_to_all", 0.0) for s in stages) / (steps * layers)
    control = (getattr(executor, "control_seconds", 0.0) - control_before) / steps
    return {"batch": batch, "step_ms": statistics.median(times) * 1e3, "min_step_ms": min(times) * 1e3,
            "tokens_per_s": batch / statistics.median(times), "moe_us": moe * 1e6, "a2a_us": a2a * 1e6,
            "a2a_min_us": a2a_min * 1e6, "a2a_share": a2a / moe if moe else 0.0, "control_ms": control * 1e3,
            "control_share": control / statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.ep", description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (1: in-process on one GPU)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the 235B shape")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256], help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--decode-steps", type=int, default=24, help="decode steps timed per batch size")
    p.add_argument("--kv-blocks", type=int, default=2048, help="KV blocks per rank")
    p.add_argument("--shape", choices=["qwen3-235b", "smoke"], default="qwen3-235b",
                   help="layer shape: Qwen3-235B-A22B's, or a small one to try the benchmark on a CPU")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    p.add_argument("--cpus-per-rank", type=int, default=1, help="CPUs each rank reserves")
    p.add_argument("--step-channel", choices=["compiled", "ray_call"], default="compiled",
                   help="how the step plan reaches the ranks (EP > 1)")
    p.add_argument("--out", default=None, help="directory for ep{N}.json and ep{N}.md")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    rates = measure_rates(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model_dir = write_model_dir(args.layers, QWEN3_235B_LAYER if args.shape == "qwen3-235b" else SMOKE_SHAPE)
    config = ModelConfig.from_pretrained(model_dir)
    t0 = time.perf_counter()
    engine = build_engine(model_dir, args.ep, args)
    startup_s = time.perf_counter() - t0
    if args.ep == 1:
        from expertmesh.cluster.worker import attach_moe_timer
        from expertmesh.router.timing import StageTimer

        stage_timer = StageTimer()
        attach_moe_timer(engine.executor.runner.model, stage_timer)

        def timer():
            return [stage_timer.take()]
        ping = 0.0
    else:
        timer = engine.executor.stage_seconds
        ping = engine.executor.ping_seconds()
    rows = []
    for batch in args.batch:
        row = measure(engine, args.ep, batch, args, timer)
        ctx = args.prompt_len + args.decode_steps // 2
        row["ceiling_ms"] = step_ceiling(config, rates, dtype, batch, batch, ctx, args.ep) * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    result = {"ep": args.ep, "layers": args.layers, "gpu": name, "shape": args.shape, "rates": rates.__dict__,
              "step_channel": args.step_channel if args.ep > 1 else "in-process",
              "startup_s": startup_s, "ray_ping_ms": ping * 1e3, "prompt_len": args.prompt_len, "rows": rows}
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"ep{args.ep}" + (f"-{args.step_channel}" if args.ep > 1 else "")
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{name}.md").write_text(table)
    engine.executor.shutdown()
    return 0


def markdown(result: dict) -> str:
    lines = [f"EP={result['ep']}, {result['layers']} layers of the {result['shape']} shape, {result['gpu']}; "
             f"copy {result['rates']['copy_gb_s']:.0f} GB/s, matmul {result['rates']['matmul_tflop_s']:.0f} TFLOP/s; "
             f"Ray ping {result['ray_ping_ms']:.2f} ms; step channel {result['step_channel']}",
             "",
             "| batch | step ms | ceiling ms | tokens/s | MoE layer us | a2a us/layer (max / min rank) "
             "| a2a share | control ms (share) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['step_ms']:.2f} | {r['ceiling_ms']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {r['moe_us']:.0f} | {r['a2a_us']:.0f} / {r['a2a_min_us']:.0f} | {r['a2a_share']:.0%} "
                     f"| {r['control_ms']:.2f} ({r['control_share']:.1%}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
