"""Engine throughput: prefill and decode tokens/s of expertmesh beside transformers' `generate`.

Both run the same checkpoint on the same device in one process, greedy, with random prompts of
equal length (so transformers needs no padding), at each batch size:

  prefill tok/s = batch * prompt_len / time to produce the first token of every prompt
  decode  tok/s = batch * (new_tokens - 1) / (time for new_tokens - prefill time)

transformers runs each of its experts paths that works on the device ("eager" loop,
"grouped_mm", "batched_mm") and the fastest is reported as the peer. The ceiling is the
roofline of the same work: weight bytes read per step over the measured copy bandwidth, and
FLOPs over the measured matmul rate (see `bench/roofline.py`).

    python -m expertmesh.bench.engine --model DIR --batch 1 16 --out bench_out/
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from expertmesh.bench.roofline import measure_rates, step_ceiling
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.gateway.llm import LLM
from expertmesh.model.config import ModelConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_runners(llm: LLM, prompts: list[list[int]], new_tokens: int):
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return lambda: llm.generate(prompts, first), lambda: llm.generate(prompts, full)


def hf_runners(model, prompts: list[list[int]], new_tokens: int, device):
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0)
        _sync(device)

    return lambda: run(1), lambda: run(new_tokens)


def measure_interleaved(systems: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (prefill, full) time of each system; the systems take turns in every repeat, so a
    slow spell of the machine falls on all of them alike."""
    for _prefill, full in systems.values():  # warm-up
        full()
    best = {name: [float("inf"), float("inf")] for name in systems}
    for _ in range(repeats):
        for name, (prefill, full) in systems.items():
            best[name][0] = min(best[name][0], _timed(prefill))
            best[name][1] = min(best[name][1], _timed(full))
    return {name: (p, f) for name, (p, f) in best.items()}


def load_hf(path: str, device, dtype, impl: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if impl != "eager":
        model.config._experts_implementation = impl
        model.set_experts_implementation(impl) if hasattr(model, "set_experts_implementation") else None
    model.generation_config.eos_token_id = None
    return model


def run(args) -> dict:
    llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
              max_num_batched_tokens=max(args.batch) * args.prompt_len, progress=False)
    runner = llm.engine.executor.runner
    device, dtype = runner.device, runner.dtype
    config = ModelConfig.from_pretrained(args.model)
    rates = measure_rates(device, dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    hf_models = {}
    for impl in args.hf_experts:
        try:
            hf_models[impl] = load_hf(args.model, device, dtype, impl)
        except Exception as exc:
            print(f"transformers experts path {impl!r} unavailable: {exc}")
    for batch in args.batch:
        prompts = torch.randint(0, config.vocab_size - 64, (batch, args.prompt_len), generator=gen).tolist()
        systems = {"ours": ours_runners(llm, prompts, args.new_tokens)}
        systems.update({impl: hf_runners(model, prompts, args.new_tokens, device) for impl, model in hf_models.items()})
        times = measure_interleaved(systems, args.repeats)
        ours = _rates(batch, args.prompt_len, args.new_tokens, *times.pop("ours"))
        peers = {impl: _rates(batch, args.prompt_len, args.new_tokens, *t) for impl, t in times.items()}
        best = max(peers, key=lambda k: peers[k]["decode_tok_s"]) if peers else None
        prefill_ceiling = step_ceiling(config, rates, dtype, batch * args.prompt_len, batch, args.prompt_len)
        decode_ceiling = step_ceiling(config, rates, dtype, batch, batch, args.prompt_len + args.new_tokens // 2)
        rows.append({
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "ours": ours, "transformers": peers.get(best), "transformers_impl": best, "transformers_all": peers,
            "ceiling": {"prefill_tok_s": batch * args.prompt_len / prefill_ceiling,
                        "decode_tok_s": batch / decode_ceiling},
        })
    return {"device": str(device), "device_name": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "model": str(args.model), "torch": torch.__version__, "rates": rates.__dict__, "rows": rows}


def _rates(batch, prompt_len, new_tokens, t_prefill, t_full) -> dict:
    decode_time = max(t_full - t_prefill, 1e-9)
    return {"prefill_s": t_prefill, "total_s": t_full,
            "prefill_tok_s": batch * prompt_len / t_prefill,
            "decode_tok_s": batch * (new_tokens - 1) / decode_time}


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    lines = [
        f"Engine benchmark on {result['device_name']}, {result['dtype']}, torch {result['torch']}; "
        f"measured copy {result['rates']['copy_gb_s']:.1f} GB/s, "
        f"matmul {result['rates']['matmul_tflop_s']:.3f} TFLOP/s",
        "",
        "| batch | prompt | new | ours prefill tok/s | transformers prefill tok/s | ceiling prefill tok/s "
        "| ours decode tok/s | transformers decode tok/s | ceiling decode tok/s | ours / transformers (decode) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peer = r["transformers"] or {"prefill_tok_s": float("nan"), "decode_tok_s": float("nan")}
        lines.append(
            f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['ours']['prefill_tok_s']:.0f} "
            f"| {peer['prefill_tok_s']:.0f} ({r['transformers_impl']}) | {r['ceiling']['prefill_tok_s']:.0f} "
            f"| {r['ours']['decode_tok_s']:.0f} | {peer['decode_tok_s']:.0f} | {r['ceiling']['decode_tok_s']:.0f} "
            f"| {r['ours']['decode_tok_s'] / peer['decode_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expertmesh bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory; default: the embedded default model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    p.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm", "batched_mm"],
                   help="transformers experts paths to try; the fastest is the peer")
    p.add_argument("--out", default=None, help="directory for engine.json and engine.md")
    args = p.parse_args(argv)
    if args.model is None:
        from expertmesh.model.default import default_model_path

        args.model = str(default_model_path())
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "engine.json").write_text(json.dumps(result, indent=2))
        (out / "engine.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
