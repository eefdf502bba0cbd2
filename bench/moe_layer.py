"""One MoE layer on one GPU: the fused Triton path beside torch._grouped_mm and transformers.

Every path runs the same random bf16 weights (Qwen3-235B-A22B's layer: hidden 4096, 128 experts,
top-8, expert FFN 1536; or Qwen3-30B-A3B's: hidden 2048, FFN 768) at several token counts T:

  fused         ours, the whole block: gate GEMM (torch) + top-k kernel + fused_moe (Triton)
  fused_moe     fused_moe alone, routing given
  grouped_mm    today's SparseMoeBlock: gate, local dispatcher, torch._grouped_mm experts, combine
  transformers  Qwen3MoeSparseMoeBlock with _experts_implementation = "grouped_mm"
  fused_moe_fp8 (--fp8) fused_moe on the same experts quantized to FP8 e4m3 in 128x128 blocks, as
                Qwen's FP8 checkpoints store them (the kernels scale each block as they read it),
                beside its own ceiling (one byte a weight)
  ceiling       max(expert weights touched / copy bandwidth, FLOPs / matmul rate), both measured
                in this run (bench/roofline.py)

Times are medians of CUDA-event timed runs. Rows with T <= 256 replay each path from a CUDA graph
(launch gaps removed; a path that syncs with the host or fails to capture is timed eagerly, and
the table says so); larger T run eagerly. `--sweep` first times a small candidate set of kernel
configs per token bucket (bench/moe_sweep.py), writes the best into DIR/configs/ in the format of
experts/configs/ (copy the file there to make it the default) and uses them for the table.

    python -m expertmesh.bench.moe_layer --out $OUT                      # 235B layer, 1..16,384 tokens
    python -m expertmesh.bench.moe_layer --out $OUT --shape 30b --sweep
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from expertmesh.bench.ep import QWEN3_235B_LAYER
from expertmesh.bench.gpu_timing import best_time
from expertmesh.bench.roofline import measure_rates
from expertmesh.experts.moe_config import ConfigTable, config_file_name
from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import fast_linear
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.router import LocalDispatcher

QWEN3_30B_LAYER = {**QWEN3_235B_LAYER, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "moe_intermediate_size": 768, "intermediate_size": 6144}
SHAPES = {
    "235b": (QWEN3_235B_LAYER, [1, 64, 1024, 16384], [1, 64, 1024, 16384, 8, 16, 256, 4096]),
    "30b": (QWEN3_30B_LAYER, [1, 64, 256], [1, 64, 256, 8, 16, 1024]),
}
"""shape -> (layer config, table token counts, sweep token buckets: the table's first, in case the
sweep's time budget runs out; 8 and 16 decide the GEMV/blocked threshold)."""
GRAPH_MAX_TOKENS = 256


def _build(hf_dict: dict, device, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = ModelConfig.from_hf_dict({**hf_dict, "num_hidden_layers": 1})
    with torch.device(device):
        dispatcher = LocalDispatcher.identity(config.num_experts, device)
        ours = SparseMoeBlock(config, config.num_experts, 0, dispatcher=dispatcher, stats=None, device=device,
                              dtype=dtype).to(dtype=dtype)
        hf_config = Qwen3MoeConfig(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "torch_dtype")},
                                   num_hidden_layers=1)
        hf_config._experts_implementation = "grouped_mm"
        hf = Qwen3MoeSparseMoeBlock(hf_config).to(dtype=dtype)
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(0)
        ours.gate.weight.normal_(0, 0.02, generator=gen)
        ours.experts.w13_EFD.normal_(0, 0.02, generator=gen)
        ours.experts.w2_EDF.normal_(0, 0.02, generator=gen)
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w13_EFD)
        hf.experts.down_proj.copy_(ours.experts.w2_EDF)
    return config, ours, hf


def _fused_block(block: SparseMoeBlock, table: ConfigTable | None):
    """Our whole block on the fused path, as the engine runs it (`SparseMoeBlock._fused`): the gate
    through `fast_linear` (the small-batch GEMV at decode, cuBLAS above it), the top-k kernel,
    fused_moe."""
    from expertmesh.router.fused_moe import fused_moe, moe_config
    from expertmesh.router.triton_gating import topk_softmax_triton

    gc, w13, w2 = block.gate_config, block.experts.w13_EFD, block.experts.w2_EDF

    def config_for(num_copies: int):
        return moe_config(num_copies, w13, table)

    def route(x_TD):
        return topk_softmax_triton(fast_linear(block.gate, x_TD), gc.top_k, gc.renormalize, gc.scoring)

    def run(x_TD, out=None):
        weights, ids = route(x_TD)
        return fused_moe(x_TD, weights, ids, w13, w2, out=out, config=config_for(x_TD.shape[0] * gc.top_k))

    return run, route, config_for


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _measure(name: str, fn, graphs: bool, row: dict, timer=best_time) -> None:
    try:
        seconds, mode = timer(fn, graphs)
        row[f"{name}_us"], row[f"{name}_mode"] = seconds * 1e6, mode
    except Exception as e:  # one failing path must not cost the others' figures
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row[f"{name}_us"], row[f"{name}_mode"] = None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(f"    {name}: {row[f'{name}_us'] and round(row[f'{name}_us'], 1)} us ({row[f'{name}_mode']})", flush=True)


def fp8_experts(block: SparseMoeBlock, size: int = 128):
    """(w13, w2, ExpertScales) of `block`'s experts quantized in size x size blocks, as an FP8
    checkpoint stores them."""
    from expertmesh.experts.triton_fp8 import ExpertScales
    from expertmesh.model.quantization import quantize_blocks

    def quantize(w_END):
        pairs = [quantize_blocks(w, (size, size)) for w in w_END]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])

    (q13, s13), (q2, s2) = quantize(block.experts.w13_EFD), quantize(block.experts.w2_EDF)
    return q13, q2, ExpertScales(s13, s2, (size, size), (size, size))


def _row(T: int, ours: SparseMoeBlock, hf, fused, route, config_for, device, dtype, timer, fp8=None) -> dict:
    """One token count: the fused block checked against today's path, then every path timed."""
    from expertmesh.router.fused_moe import fused_moe

    D, K = ours.experts.w13_EFD.shape[2], ours.gate_config.top_k
    w13, w2 = ours.experts.w13_EFD, ours.experts.w2_EDF
    gen = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, D, device=device, generator=gen).to(dtype)
    out = torch.empty_like(x)
    config = config_for(T * K)
    row: dict = {"tokens": T, "config": config.to_json()}
    with torch.inference_mode():
        weights, ids = route(x)
        try:
            reference = ours(x)
            row["rel_err_vs_grouped_mm"] = _relative_error(fused(x), reference)
            row["rel_err_transformers_vs_grouped_mm"] = _relative_error(hf(x[None])[0], reference)
        except Exception as e:
            row["check_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        graphs = T <= GRAPH_MAX_TOKENS
        _measure("fused", lambda: fused(x, out=out), graphs, row, timer)
        _measure("fused_moe", lambda: fused_moe(x, weights, ids, w13, w2, out=out, config=config), graphs, row, timer)
        _measure("grouped_mm", lambda: ours(x), graphs, row, timer)
        _measure("transformers", lambda: hf(x[None]), graphs, row, timer)
        if fp8 is not None:
            from expertmesh.router.fused_moe import moe_config

            q13, q2, scales, *fp8_table = fp8
            fp8_config = moe_config(T * K, q13, *fp8_table)
            row["rel_err_fp8_vs_bf16"] = _relative_error(
                fused_moe(x, weights, ids, q13, q2, config=fp8_config, scales=scales),
                fused_moe(x, weights, ids, w13, w2, config=config))
            _measure("fused_moe_fp8", lambda: fused_moe(x, weights, ids, q13, q2, out=out, config=fp8_config,
                                                        scales=scales), graphs, row, timer)
    return row


def _sweep_to_file(result: dict, key: str, shape: str, w13, w2, K: int, tokens: list[int], deadline: float,
                   sweep_timer, scales, dtype_name: str, device: torch.device, out_dir: Path | None) -> ConfigTable:
    """Sweep these experts' configs (FP8 ones with their scales), record the table under
    result[key] and write its data file to OUT/configs/; returns the table."""
    from expertmesh.bench.moe_sweep import sweep as run_sweep
    from expertmesh.router.fused_moe import device_name

    E, F2, D = w13.shape
    print(f"[{shape}] sweeping {dtype_name} kernel configs at T = {tokens}", flush=True)
    table, records = run_sweep(w13, w2, K, tokens, deadline, scales=scales,
                               **({"timer": sweep_timer} if sweep_timer else {}))
    name = config_file_name(E, F2 // 2, D, dtype_name, device_name(device))
    result[key] = {"file": name, "table": table.to_json(), "buckets": records}
    if out_dir is not None:
        (out_dir / "configs").mkdir(parents=True, exist_ok=True)
        (out_dir / "configs" / name).write_text(json.dumps(table.to_json(), indent=1) + "\n")
        print(f"[{shape}] wrote {out_dir / 'configs' / name}; copy it to experts/configs/ to make it the default")
    return table


def run_shape(shape: str, tokens: list[int], sweep: bool, deadline: float, rates, out_dir: Path | None, *,
              device: str | torch.device = "cuda", dtype=torch.bfloat16, timer=best_time, sweep_timer=None,
              fp8: bool = False, fp8_block: int = 128) -> dict:
    """Rows of one shape (and its sweep). The device, dtype and timers are parameters so that the
    CPU tests can walk the whole function in Triton's interpreter with a stand-in timer."""
    device = torch.device(device)
    hf_dict, _, sweep_tokens = SHAPES[shape]
    config, ours, hf = _build(hf_dict, device, dtype)
    E, D, F, K = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.top_k
    result: dict = {"shape": shape, "experts": E, "hidden": D, "ffn": F, "top_k": K, "rows": []}
    table = None
    if sweep:
        table = _sweep_to_file(result, "sweep", shape, ours.experts.w13_EFD, ours.experts.w2_EDF, K, sweep_tokens,
                               deadline, sweep_timer, None, str(dtype).removeprefix("torch."), device, out_dir)
    fp8_weights = fp8_experts(ours, fp8_block) if fp8 else None
    if sweep and fp8:
        q13, q2, scales = fp8_weights
        fp8_table = _sweep_to_file(result, "sweep_fp8", shape, q13, q2, K, sweep_tokens, deadline, sweep_timer,
                                   scales, "float8_e4m3fn", device, out_dir)
        fp8_weights = (q13, q2, scales, fp8_table)
    fused, route, config_for = _fused_block(ours, table)
    expert_bytes = 3 * D * F * torch.empty((), dtype=dtype).element_size()
    for T in tokens:
        print(f"[{shape}] T={T}", flush=True)
        row = _row(T, ours, hf, fused, route, config_for, device, dtype, timer, fp8_weights)
        touched = E * (1 - (1 - K / E) ** T)
        flops = 2 * T * K * 3 * D * F
        compute_us = 1e6 * flops / (rates.matmul_tflop_s * 1e12)
        row["ceiling_us"] = max(1e6 * touched * expert_bytes / (rates.copy_gb_s * 1e9), compute_us)
        if fp8:  # one byte a weight, and the FP8 tensor cores' rate measured in this run
            row["ceiling_fp8_us"] = max(1e6 * touched * 3 * D * F / (rates.copy_gb_s * 1e9),
                                        1e6 * flops / (rates.fp8_or_bf16_tflop_s * 1e12))
        result["rows"].append(row)
    return result


def _cell(row: dict, name: str) -> str:
    us = row.get(f"{name}_us")
    if us is None:
        return "error" if f"{name}_mode" in row else "-"
    mark = "" if row[f"{name}_mode"] in ("graph", "eager") else "*"
    return f"{us:,.1f}{mark}"


_HEADER = ("| tokens | fused block | fused_moe | grouped_mm block | transformers | ceiling | fused / ceiling | faster "
           "| path | rel. err |")


def markdown(results: list[dict], rates, device_name: str) -> str:
    fp8_rate = f", FP8 matmul {rates.fp8_matmul_tflop_s:,.0f} TFLOP/s" if rates.fp8_matmul_tflop_s else ""
    lines = [f"MoE layer, bf16, {device_name}; copy {rates.copy_gb_s:,.0f} GB/s, matmul {rates.matmul_tflop_s:,.0f} "
             f"TFLOP/s{fp8_rate}; µs, medians; T <= {GRAPH_MAX_TOKENS} replayed from CUDA graphs, larger T eager, "
             f"calls launched back to back as in a forward (* eager fallback: see the JSON)", ""]
    for r in results:
        lines += [f"**{r['shape']}** (hidden {r['hidden']}, {r['experts']} experts, top-{r['top_k']}, FFN {r['ffn']})",
                  "", _HEADER, "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for row in r["rows"]:
            fused, grouped = row.get("fused_us"), row.get("grouped_mm_us")
            ratio = f"{fused / row['ceiling_us']:.2f}" if fused else "-"
            faster = "-" if not (fused and grouped) else ("fused" if fused <= grouped else "grouped_mm") + \
                f" {max(fused, grouped) / min(fused, grouped):.2f}x"
            cfg = row["config"]
            path = "GEMV" if "BLOCK_M" not in cfg else f"BM {cfg['BLOCK_M']}"
            err = row.get("rel_err_vs_grouped_mm")
            lines.append(f"| {row['tokens']:,} | {_cell(row, 'fused')} | {_cell(row, 'fused_moe')} | "
                         f"{_cell(row, 'grouped_mm')} | {_cell(row, 'transformers')} | {row['ceiling_us']:,.1f} | "
                         f"{ratio} | {faster} | {path} | {'-' if err is None else f'{err:.1e}'} |")
        lines.append("")
        fp8_rows = [row for row in r["rows"] if "ceiling_fp8_us" in row]
        if fp8_rows:
            lines += ["FP8 experts (e4m3, 128x128 block scales) against bf16, fused_moe alone:", "",
                      "| tokens | bf16 µs | FP8 µs | FP8 / bf16 | FP8 ceiling µs | FP8 / ceiling | rel. err vs bf16 |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for row in fp8_rows:
                bf16, fp8, ceiling = row.get("fused_moe_us"), row.get("fused_moe_fp8_us"), row["ceiling_fp8_us"]
                vs_bf16 = f"{fp8 / bf16:.2f}" if fp8 and bf16 else "-"
                vs_ceiling = f"{fp8 / ceiling:.2f}" if fp8 else "-"
                err = row.get("rel_err_fp8_vs_bf16")
                lines.append(f"| {row['tokens']:,} | {_cell(row, 'fused_moe')} | {_cell(row, 'fused_moe_fp8')} | "
                             f"{vs_bf16} | {ceiling:,.1f} | {vs_ceiling} | {'-' if err is None else f'{err:.1e}'} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.moe_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["235b"], help="layer shapes to run")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 1 64 1024 16384 for 235b, 1 64 256 for 30b; with --sweep, "
                        "every swept bucket: 1 8 16 64 256 1024 4096 16384 and 1 8 16 64 256 1024)")
    p.add_argument("--sweep", action="store_true", help="sweep kernel configs first; write the best to OUT/configs/")
    p.add_argument("--sweep-budget-s", type=float, default=180.0,
                   help="wall-clock seconds the sweeps may take in all (later buckets keep the heuristic)")
    p.add_argument("--out", default=None, help="directory for moe_layer.json, moe_layer.md and configs/")
    p.add_argument("--fp8", action="store_true",
                   help="also time fused_moe on the experts quantized to FP8 (128x128 blocks) beside bf16")
    args = p.parse_args(argv)
    start = time.monotonic()
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    rates = measure_rates(torch.device("cuda"), torch.bfloat16)
    deadline = start + args.sweep_budget_s
    results = []
    for shape in args.shape:
        _, table_tokens, sweep_tokens = SHAPES[shape]
        tokens = args.tokens or (sorted(sweep_tokens) if args.sweep else table_tokens)
        results.append(run_shape(shape, tokens, args.sweep, deadline, rates, out_dir, fp8=args.fp8))
    device_name = torch.cuda.get_device_name()
    table = markdown(results, rates, device_name)
    if out_dir is not None:
        payload = {"device": device_name, "rates": rates.__dict__, "seconds": time.monotonic() - start,
                   "results": results}
        (out_dir / "moe_layer.json").write_text(json.dumps(payload, indent=1))
        (out_dir / "moe_layer.md").write_text(table)
    print(f"\n(whole run {time.monotonic() - start:.0f} s)\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
