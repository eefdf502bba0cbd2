"""Serving benchmark: output tokens/s, TTFT and inter-token latency through the HTTP gateway.

    python -m expertmesh.bench.serve --shape qwen3-235b --layers 24 --ep 2 --concurrency 64 256 \\
        --prompt-len 1000 --output-len 1000 --out bench_out/serve-ep2

One command does the whole measurement: it writes a config-only checkpoint of the chosen shape
(random weights made on the devices, `--load-format dummy`), starts `expertmesh serve` on it,
waits for /health, then for each concurrency C sends C streaming `/v1/completions` requests at
once (random prompt token ids, `ignore_eos`, exactly `--output-len` tokens each) and measures:

    output tok/s       all output tokens / wall time of the wave (per GPU: over ep GPUs)
    TTFT               request sent -> first token (p50, p99)
    ITL                a request's mean time per token after the first, (e2e - TTFT) / (tokens - 1),
                       vLLM's TPOT (p50, p99 over requests)

Beside them, the ceiling: C sequences decoding at the mean context, one step bounded by the
roofline of `bench/roofline.py` (measured HBM copy bandwidth and bf16 matmul rate), prefill
and communication not counted. `--url` measures a server that is already running instead.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from expertmesh.bench.ep import QWEN3_235B_LAYER, SMOKE_SHAPE, write_model_dir
from expertmesh.bench.roofline import measure_rates, step_ceiling
from expertmesh.cluster.collective import free_port
from expertmesh.model.config import ModelConfig


async def _one(http, prompt: list[int], output_len: int) -> dict:
    # logprobs=0 makes every step's tokens a chunk even when they decode to no text (a random-weight
    # model's ids past a small tokenizer's vocabulary), so the first chunk times the first token.
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "logprobs": 0, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                continue
            if any((c.get("logprobs") or {}).get("tokens") for c in chunk["choices"]):
                first = first or time.perf_counter()
    done = time.perf_counter()
    return {"ttft": first - sent, "e2e": done - sent, "tokens": tokens, "itl": (done - first) / max(tokens - 1, 1)}


async def _wave(url: str, concurrency: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict:
    import httpx

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, min(vocab, 100_000), (concurrency, prompt_len), generator=gen).tolist()
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(http, p, output_len) for p in prompts))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(r["itl"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _p99(ttft),
            "itl_p50_s": statistics.median(itl), "itl_p99_s": _p99(itl)}


def _p99(sorted_values: list[float]) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(0.99 * len(sorted_values)))]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None) -> None:
    """Return once `url`/health answers 200; raise with the server log's tail if `proc` exits first
    or `timeout` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"the server at {url} did not become healthy:\n{tail}")


def run(args) -> dict:
    shape = QWEN3_235B_LAYER if args.shape == "qwen3-235b" else SMOKE_SHAPE
    model_dir = write_model_dir(args.layers, shape)
    config = ModelConfig.from_pretrained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rates = measure_rates(device, dtype)  # before the server takes the devices
    proc, log, url = None, None, args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(args.out or ".") / "serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "expertmesh", "serve", str(model_dir), "--ep-size", str(args.ep),
               "--load-format", "dummy", "--port", str(port), "--grpc-port", "0",
               "--max-model-len", str(args.prompt_len + args.output_len + 16),
               "--max-num-seqs", str(max(args.concurrency)), "--max-num-batched-tokens", str(args.max_batched_tokens)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, args.startup_timeout, log)
        asyncio.run(_wave(url, min(args.concurrency), 16, 8, config.vocab_size, 1))  # warm-up
        rows = []
        for c in args.concurrency:
            row = asyncio.run(_wave(url, c, args.prompt_len, args.output_len, config.vocab_size, c))
            context = args.prompt_len + args.output_len // 2
            row["ceiling_output_tok_s"] = c / step_ceiling(config, rates, dtype, c, c, context, ep_size=args.ep)
            row["output_tok_s_per_gpu"] = row["output_tok_s"] / args.ep
            row["ceiling_output_tok_s_per_gpu"] = row["ceiling_output_tok_s"] / args.ep
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"shape": args.shape, "layers": args.layers, "ep": args.ep, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "rates": rates.__dict__, "rows": rows}


def markdown(result: dict) -> str:
    r = result["rates"]
    lines = [f"Serving {result['prompt_len']}/{result['output_len']} through the HTTP gateway: {result['layers']} "
             f"layers of the {result['shape']} shape, EP={result['ep']}, {result['device']}, {result['dtype']}; "
             f"measured copy {r['copy_gb_s']:.0f} GB/s, matmul {r['matmul_tflop_s']:.0f} TFLOP/s", "",
             "| concurrency | output tok/s | per GPU | ceiling per GPU | TTFT p50 / p99 s | ITL p50 / p99 ms |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['concurrency']} | {row['output_tok_s']:.0f} | {row['output_tok_s_per_gpu']:.0f} | "
                     f"{row['ceiling_output_tok_s_per_gpu']:.0f} | {row['ttft_p50_s']:.2f} / {row['ttft_p99_s']:.2f} | "
                     f"{row['itl_p50_s'] * 1e3:.1f} / {row['itl_p99_s'] * 1e3:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["qwen3-235b", "smoke"], default="qwen3-235b",
                   help="layer shape: Qwen3-235B-A22B's, or a small one to try the benchmark on a CPU")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (94 is the full model)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (GPUs) of the served EP group")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256], help="requests in flight at once")
    p.add_argument("--prompt-len", type=int, default=1000, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=1000, help="output tokens per request (ignore_eos)")
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="the server's token budget per step")
    p.add_argument("--url", default=None, help="measure this running server instead of starting one")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--out", default=None, help="directory for result.json, result.md and the server's log")
    args = p.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
        (Path(args.out) / "result.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
