"""The `expertmesh` command line. The environment is read here and nowhere below.

    expertmesh generate [--model DIR] "prompt" ...     complete prompts (streams one prompt)
    expertmesh chat [--model DIR] --message "hi"        one chat turn through the chat template
    expertmesh make-tiny OUT_DIR [--model-type ...]     write a random-weight HF checkpoint
    expertmesh bench engine [...]                       engine throughput beside transformers

With no --model, the embedded default model is used (generated once into the cache directory,
$EXPERTMESH_CACHE or ~/.cache/expertmesh).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="checkpoint directory (HF format); default: the embedded tiny Qwen3-MoE model")
    g.add_argument("--ep-size", type=int, default=1,
                   help="expert-parallel ranks of the EP group: 1 runs in-process; more run as Ray actors, "
                        "one per GPU (CPUs on a machine without GPUs)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join with --ep-size > 1 ('auto' or 'ray://host:port'); default: start a "
                        "local Ray instance")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype; auto is bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt plus output in tokens; default: the model's max_position_embeddings")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks; default: sized from free memory (CUDA) or 1 GiB (CPU)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prompts are prefilled in chunks of this size")
    g.add_argument("--expert-impl", default="auto", choices=["auto", "grouped", "batched", "reference"],
                   help="experts' GEMM path (auto: grouped_mm where the device runs it)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p times the top probability")
    g.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Serve sparse Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts with a model")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _engine_args(gen)
    _sampling_args(gen)

    chat = sub.add_parser("chat", help="one chat turn through the model's chat template")
    chat.add_argument("--message", required=True, help="the user message")
    chat.add_argument("--system", default=None, help="an optional system message")
    chat.add_argument("--no-thinking", action="store_true", help="render the template with enable_thinking=False")
    _engine_args(chat)
    _sampling_args(chat)

    tiny = sub.add_parser("make-tiny", help="write a random-weight Hugging Face checkpoint for tests and demos")
    tiny.add_argument("out_dir", help="directory to write (created)")
    tiny.add_argument("--model-type", default="qwen3_moe", choices=["qwen3_moe", "qwen3", "qwen2_moe", "mixtral"],
                      help="architecture to write (default qwen3_moe)")
    tiny.add_argument("--num-layers", type=int, default=2, help="decoder layers")
    tiny.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer")
    tiny.add_argument("--top-k", type=int, default=2, help="experts per token")
    tiny.add_argument("--hidden-size", type=int, default=64, help="model width")
    tiny.add_argument("--num-heads", type=int, default=4, help="query heads")
    tiny.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads")
    tiny.add_argument("--head-dim", type=int, default=16, help="width of one head")
    tiny.add_argument("--moe-intermediate-size", type=int, default=32, help="expert FFN width")
    tiny.add_argument("--intermediate-size", type=int, default=128, help="dense FFN width (qwen3)")
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--num-shards", type=int, default=2, help="safetensors files (with an index when > 1)")

    bench = sub.add_parser("bench", help="benchmarks (see bench/)")
    bench.add_argument("what", choices=["engine"], help="engine: prefill and decode tokens/s beside transformers")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _llm(args):
    from expertmesh.gateway.llm import LLM
    from expertmesh.model.default import DEFAULT_MODEL_NAME, default_model_path

    model = args.model or default_model_path(_cache_dir() / "models" / DEFAULT_MODEL_NAME)
    return LLM(model, ep_size=args.ep_size, ray_address=args.ray_address, device=args.device, dtype=args.dtype,
               max_model_len=args.max_model_len,
               block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
               enable_prefix_caching=not args.no_prefix_caching, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, expert_impl=args.expert_impl)


def _params(args):
    from expertmesh.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop)


def _cache_dir() -> Path:
    return Path(os.environ.get("EXPERTMESH_CACHE") or Path.home() / ".cache" / "expertmesh")


def _print_outputs(outputs, as_json: bool) -> None:
    for out in outputs:
        completion = out.outputs[0]
        if as_json:
            print(json.dumps({"prompt": out.prompt, "text": completion.text, "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}, ensure_ascii=False))
        else:
            print(completion.text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make-tiny":
            from expertmesh.model.tiny import make_tiny

            path = make_tiny(args.out_dir, model_type=args.model_type, num_layers=args.num_layers,
                             num_experts=args.num_experts, top_k=args.top_k, hidden_size=args.hidden_size,
                             num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                             moe_intermediate_size=args.moe_intermediate_size,
                             intermediate_size=args.intermediate_size, dtype=args.dtype, seed=args.seed,
                             num_shards=args.num_shards)
            print(path)
        elif args.command in ("generate", "chat"):
            params = _params(args)
            llm = _llm(args)
            try:
                if args.command == "generate":
                    _print_outputs(llm.generate(args.prompts, params), args.json)
                else:
                    messages = ([{"role": "system", "content": args.system}] if args.system else [])
                    messages.append({"role": "user", "content": args.message})
                    kwargs = {"enable_thinking": False} if args.no_thinking else {}
                    _print_outputs(llm.chat(messages, params, chat_template_kwargs=kwargs), False)
            finally:
                llm.shutdown()  # an EP group's actors and GPUs are released before exit
        elif args.command == "bench":
            from expertmesh.bench import engine as bench_engine

            return bench_engine.main(args.bench_args)
    except ValueError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2
    return 0
