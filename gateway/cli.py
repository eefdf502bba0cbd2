"""The `expertmesh` command line. The environment is read here and nowhere below.

    expertmesh serve [MODEL] [--port 8000] [--grpc-port 50051] [--api-key KEY] ...
                                                        OpenAI HTTP + gRPC API on Ray Serve
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
                   help="Ray cluster to join ('auto' or host:port): `serve` always runs on Ray, generate and chat "
                        "only with --ep-size > 1; default: start a local Ray instance")
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

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API on Ray Serve",
                         description="Start (or join) Ray, deploy the expertmesh Serve application (a gateway and "
                                     "one model replica per EP group) and print the HTTP and gRPC addresses. "
                                     "With no MODEL, the embedded default model is served.")
    srv.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                     help="checkpoint directory (HF format); same as --model")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (Ray Serve's proxy)")
    srv.add_argument("--grpc-port", type=int, default=50051, help="gRPC port of the gateway; 0 turns gRPC off")
    srv.add_argument("--api-key", action="append", default=[], dest="api_keys",
                     help="accepted API key (repeatable); without one the API is open")
    srv.add_argument("--redis-url", default=None,
                     help="redis://host:port/db for shared state (API keys, rate limits); default: in-process")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients send; default: the checkpoint directory's name")
    srv.add_argument("--max-n", type=int, default=16, help="largest n (completions per request) accepted")
    srv.add_argument("--engine-replicas", type=int, default=1, help="EP groups (model replicas) to run")
    srv.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                     help="dummy: random weights of the checkpoint's shapes (benchmarks); no weight files read")
    srv.add_argument("--print-config", action="store_true",
                     help="print the Ray Serve config file (YAML) for these flags and exit; run it on a cluster "
                          "with `serve deploy FILE` or `serve run FILE`")
    _engine_args(srv)

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

    keys = sub.add_parser(
        "keys", help="create, list and revoke API keys in the shared state store (Redis)",
        description="API keys with optional per-key rate limits, kept (as SHA-256 digests) in the Redis that "
                    "`expertmesh serve --redis-url URL` uses; every gateway replica sees a change within seconds. "
                    "Without --redis-url a server keeps its state inside its own process, where this command "
                    "cannot reach it: use --api-key there, or run the server with Redis.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}",
                                   help="create: a new key (printed once); list: every key; revoke: disable a key")
    redis_flag = argparse.ArgumentParser(add_help=False)
    redis_flag.add_argument("--redis-url", default=None,
                            help="the server's state store, redis://[:password@]host:port/db (required)")
    key_new = keys_sub.add_parser("create", parents=[redis_flag], help="create a key; the raw key is printed once",
                                  description="Create a key named NAME and print the raw key on stdout, once: "
                                              "only its SHA-256 digest is stored.")
    key_new.add_argument("name", help="a name for the key, unique among active keys (who or what uses it)")
    key_new.add_argument("--rpm", type=int, default=None,
                         help="requests per minute allowed (sliding 60 s window); default: no limit")
    key_new.add_argument("--tpm", type=int, default=None,
                         help="tokens per minute allowed (prompt + completion tokens, sliding 60 s window); "
                              "default: no limit")
    key_new.add_argument("--json", action="store_true", help="print the key and its record as one JSON object")
    key_list = keys_sub.add_parser("list", parents=[redis_flag], help="list every key, revoked ones included")
    key_list.add_argument("--json", action="store_true", help="print one JSON object per key")
    key_revoke = keys_sub.add_parser("revoke", parents=[redis_flag], help="revoke a key (refused from then on)")
    key_revoke.add_argument("name_or_id", metavar="NAME_OR_ID", help="the key's id (key_...) or its name")

    bench = sub.add_parser("bench", help="benchmarks (see bench/)")
    bench.add_argument("what", choices=["engine"], help="engine: prefill and decode tokens/s beside transformers")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _serve_config(args) -> dict:
    from expertmesh.gateway.app_config import AppConfig
    from expertmesh.model.default import DEFAULT_MODEL_NAME, default_model_path

    model = args.model_path or args.model
    if model is None:  # generated once here, so the replicas never race to write it
        model = str(default_model_path(_cache_dir() / "models" / DEFAULT_MODEL_NAME))
    cfg = AppConfig(
        model=model, served_model_name=args.served_model_name, ep_size=args.ep_size, device=args.device,
        dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=not args.no_prefix_caching,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        expert_impl=args.expert_impl, load_format=args.load_format, max_n=args.max_n, api_keys=args.api_keys,
        redis_url=args.redis_url, grpc_port=args.grpc_port or None, engine_replicas=args.engine_replicas)
    return cfg.model_dump(exclude_defaults=True)


def serve_config_file(app_args: dict, host: str, port: int) -> dict:
    """A Ray Serve config file (the schema of `serve deploy`) running the expertmesh application."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": "expertmesh", "route_prefix": "/",
                          "import_path": "expertmesh.gateway.serve_app:build_app", "args": app_args}],
    }


def _serve(args) -> int:
    import signal
    import threading

    from pydantic import ValidationError

    try:
        app_args = _serve_config(args)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(serve_config_file(app_args, args.host, args.port), sort_keys=False), end="")
        return 0
    import ray
    from ray import serve

    from expertmesh.gateway.proxy_errors import PROXY_CALLBACK, PROXY_CALLBACK_ENV
    from expertmesh.gateway.serve_app import build_app

    # Serve's proxy answers some requests itself (503 before a replica is up, a bare 500 when one
    # dies): in OpenAI's error object when the Ray started here hands this to the proxy it starts.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name="expertmesh", route_prefix="/")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"expertmesh: serving {app_args.get('served_model_name') or os.path.basename(app_args['model'])}", flush=True)
    print(f"HTTP  http://{host}:{args.port}/v1  (health: /health, metrics: /metrics)", flush=True)
    if app_args.get("grpc_port"):
        print(f"gRPC  {host}:{app_args['grpc_port']}  (service expertmesh.v1.ExpertMesh)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


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
        if args.command == "serve":
            return _serve(args)
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
        elif args.command == "keys":
            return _keys(args)
        elif args.command == "bench":
            from expertmesh.bench import engine as bench_engine

            return bench_engine.main(args.bench_args)
    except ValueError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _keys(args) -> int:
    """`expertmesh keys create|list|revoke` against the Redis state store."""
    import datetime

    from expertmesh.cluster.state import RedisStateStore, StateStoreUnavailable

    if not args.redis_url:
        raise ValueError("`expertmesh keys` needs --redis-url URL, the Redis the server runs with "
                         "(`expertmesh serve --redis-url URL`). Without Redis, a server keeps its keys in its own "
                         "process, which no other command can reach; use `serve --api-key KEY` there instead.")
    for flag, value in (("--rpm", getattr(args, "rpm", None)), ("--tpm", getattr(args, "tpm", None))):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer (got {value}); leave it out for no limit")
    store = RedisStateStore(args.redis_url)
    try:
        if args.keys_command == "create":
            raw, record = store.create_key(args.name, requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
            if args.json:
                print(json.dumps({"key": raw, **record.to_dict()}))
            else:
                print(raw)
                print(f"Created key {record.name!r} ({record.id}). It is shown only this once: store it now.",
                      file=sys.stderr)
        elif args.keys_command == "list":
            records = store.list_keys()
            if args.json:
                for record in records:
                    print(json.dumps(record.to_dict()))
                return 0

            def when(t: float) -> str:
                return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

            rows = [("ID", "NAME", "RPM", "TPM", "CREATED", "STATUS")]
            rows += [(r.id, r.name, str(r.requests_per_minute or "-"), str(r.tokens_per_minute or "-"),
                      when(r.created_at), f"revoked {when(r.revoked_at)}" if r.revoked else "active")
                     for r in records]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        else:
            record = store.revoke_key(args.name_or_id)
            print(f"Revoked key {record.name!r} ({record.id}).")
    except (StateStoreUnavailable, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        print(f"expertmesh: error: {message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
