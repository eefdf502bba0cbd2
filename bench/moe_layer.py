"""One MoE layer of Qwen3-235B-A22B's shape: ours beside transformers' on the same weights.

Both run the same random bf16 weights (hidden 4096, 128 experts, top-8, expert FFN 1536) on
one GPU at several token counts; times are medians of CUDA-event timed forwards. Ours is the
model's `SparseMoeBlock` (gate, local dispatcher, grouped experts, combine); transformers'
is `Qwen3MoeSparseMoeBlock` with `config._experts_implementation = "grouped_mm"`. The
ceiling is the roofline: expert weights touched over the measured copy bandwidth, FLOPs over
the measured matmul rate.

    python -m expertmesh.bench.moe_layer --tokens 1 64 256 1024 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from expertmesh.bench.ep import QWEN3_235B_LAYER
from expertmesh.bench.roofline import measure_rates
from expertmesh.model.config import ModelConfig
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.router import LocalDispatcher


def _time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.moe_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 1024], help="tokens per forward")
    p.add_argument("--out", default=None, help="directory for moe_layer.json and moe_layer.md")
    args = p.parse_args(argv)
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    device, dtype = torch.device("cuda"), torch.bfloat16
    rates = measure_rates(device, dtype)
    hf_dict = {**QWEN3_235B_LAYER, "num_hidden_layers": 1}
    config = ModelConfig.from_hf_dict(hf_dict)
    dispatcher = LocalDispatcher.identity(config.num_experts, device)
    ours = SparseMoeBlock(config, config.num_experts, 0, dispatcher=dispatcher, stats=None,
                          device=device, dtype=dtype).to(device=device, dtype=dtype)
    hf_config = Qwen3MoeConfig(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "torch_dtype")})
    hf_config._experts_implementation = "grouped_mm"
    hf = Qwen3MoeSparseMoeBlock(hf_config).to(device=device, dtype=dtype)
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(0)
        ours.gate.weight.normal_(0, 0.02, generator=gen)
        ours.experts.w13_EFD.normal_(0, 0.02, generator=gen)
        ours.experts.w2_EDF.normal_(0, 0.02, generator=gen)
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w13_EFD)
        hf.experts.down_proj.copy_(ours.experts.w2_EDF)
    rows = []
    expert_bytes = 3 * config.hidden_size * config.moe_intermediate_size * 2
    for T in args.tokens:
        x = torch.randn(T, config.hidden_size, device=device, dtype=dtype)
        with torch.inference_mode():
            diff = (ours(x) - hf(x[None])[0]).abs().max().item()
            t_ours = _time(lambda x=x: ours(x))
            t_hf = _time(lambda x=x: hf(x[None]))
        touched = config.num_experts * (1 - (1 - config.top_k / config.num_experts) ** T)
        flops = 2 * T * config.top_k * 3 * config.hidden_size * config.moe_intermediate_size
        ceiling = max(touched * expert_bytes / (rates.copy_gb_s * 1e9), flops / (rates.matmul_tflop_s * 1e12))
        rows.append({"tokens": T, "ours_us": t_ours * 1e6, "transformers_us": t_hf * 1e6, "ceiling_us": ceiling * 1e6,
                     "max_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"One Qwen3-235B-A22B MoE layer, bf16, {torch.cuda.get_device_name()}; copy {rates.copy_gb_s:.0f} GB/s, "
             f"matmul {rates.matmul_tflop_s:.0f} TFLOP/s", "",
             "| tokens | ours us | transformers (grouped_mm) us | ceiling us | ours / transformers |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['ours_us']:.0f} | {r['transformers_us']:.0f} | {r['ceiling_us']:.0f} "
                     f"| {r['transformers_us'] / r['ours_us']:.2f}x faster |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "moe_layer.json").write_text(json.dumps({"rates": rates.__dict__, "rows": rows}, indent=2))
        (out / "moe_layer.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
