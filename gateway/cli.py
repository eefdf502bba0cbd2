"""The `expertmesh` command line. The environment is read here and nowhere below.

    expertmesh serve [MODEL] [--port 8000] [--grpc-port 50051] [--api-key KEY] ...
                                                        OpenAI HTTP + gRPC API on Ray Serve
    expertmesh generate [--model DIR] "prompt" ...     complete prompts (streams one prompt)
    expertmesh chat [--model DIR] --message "hi"        one chat turn through the chat template
    expertmesh make-tiny OUT_DIR [--model-type ...]     write a random-weight HF checkpoint
    expertmesh bench gpu|engine|moe_layer|attention     benchmarks beside their ceilings (bench/)
    expertmesh experts-report [--out DIR]               which experts each task family uses (demo/)

With no --model, the embedded default model is used (generated once into the cache directory,
$EXPERTMESH_CACHE or ~/.cache/expertmesh).

The engine and serving flags are not written here: they are derived from the settings' fields
(engine/config.py, gateway/app_config.py) by `add_setting_flags`; tests/test_cli.py freezes the list.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

BENCHMARKS = {
    "gpu": "the GPU engine (30B and 235B shapes, prefill to 262k, MoE layer) beside its ceilings and transformers",
    "engine": "prefill and decode tokens/s beside transformers (any device)",
    "moe_layer": "one Qwen3-235B-A22B MoE layer beside transformers and the ceiling (GPU)",
    "attention": "the paged-attention kernel beside SDPA and the ceilings (GPU)",
}
"""`expertmesh bench NAME ...` runs `expertmesh.bench.NAME.main` (imported only then)."""


def add_setting_flags(group, settings, unset: tuple[str, ...] = ()) -> None:
    """One flag per setting (engine/config_fields.py): `--max-model-len` for max_model_len, its type,
    default and choices from the field, its --help from the field's docstring. The flags named in
    `unset` default to None, for the command to fill in from another flag."""
    for s in settings:
        if s.name in unset:
            s = dataclasses.replace(s, default=None)
        kwargs: dict = {"dest": s.name, "help": s.help.replace("%", "%%")}
        if s.type is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=s.default)
        elif isinstance(s.default, list):
            kwargs.update(action="append", default=None, metavar=s.name.upper().rstrip("S"))
            kwargs["help"] += " (repeatable)"
        else:
            kwargs.update(type=s.type, default=s.default, metavar=s.name.upper())
            if s.default is not None:
                kwargs["help"] += " (default: %(default)s)"
        if s.choices:
            kwargs.update(choices=s.choices, metavar="{" + ",".join(map(str, s.choices)) + "}")
        group.add_argument(s.flag, **kwargs)


def setting_values(args, settings) -> dict:
    """{public name: value} of the flags `add_setting_flags` added."""
    values = {}
    for s in settings:
        value = getattr(args, s.name)
        values[s.name] = [] if value is None and isinstance(s.default, list) else value
    return values


def _engine_flags(command: str) -> tuple:
    """Engine settings that are flags of `command`: all of them, but for generate and chat the dummy
    weights' `seed` (their --seed is the sampling seed)."""
    from expertmesh.engine.config import engine_settings

    return tuple(s for s in engine_settings() if command == "serve" or s.name != "seed")


def _serving_flags(command: str) -> tuple:
    from expertmesh.engine.config_fields import settings_of
    from expertmesh.gateway.app_config import ServingConfig

    return tuple(s for s in settings_of(ServingConfig) if command == "serve" or s.name == "log_level")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p times the top probability")
    g.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("expertmesh")
    except PackageNotFoundError:
        from expertmesh import __version__

        return __version__


def _add_settings(p: argparse.ArgumentParser, command: str) -> None:
    add_setting_flags(p.add_argument_group("engine"), _engine_flags(command))
    add_setting_flags(p.add_argument_group("serving" if command == "serve" else "logging"), _serving_flags(command),
                      unset=("grpc_host",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Serve sparse Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=f"expertmesh {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API on Ray Serve",
                         description="Start (or join) Ray, deploy the expertmesh Serve application (a gateway and "
                                     "one model replica per EP group) and print the HTTP and gRPC addresses. "
                                     "With no MODEL, the embedded default model is served.")
    srv.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                     help="checkpoint directory or Hugging Face repo id; same as --model")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (Ray Serve's proxy)")
    srv.add_argument("--dashboard-port", type=int, default=8265,
                     help="port of the Ray dashboard of the Ray instance serve starts (replicas, autoscaling, "
                          "logs); ignored when joining a cluster with --ray-address")
    srv.add_argument("--print-config", action="store_true",
                     help="print the Ray Serve config file (YAML) for these flags and exit; run it on a cluster "
                          "with `serve deploy FILE` or `serve run FILE`")
    _add_settings(srv, "serve")

    gen = sub.add_parser("generate", help="complete prompts with a model")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_settings(gen, "generate")
    _sampling_args(gen)

    chat = sub.add_parser("chat", help="one chat turn through the model's chat template")
    chat.add_argument("--message", required=True, help="the user message")
    chat.add_argument("--system", default=None, help="an optional system message")
    chat.add_argument("--no-thinking", action="store_true", help="render the template with enable_thinking=False")
    _add_settings(chat, "chat")
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
    tiny.add_argument("--fp8", nargs="?", const="fp8", default=None, choices=["fp8", "compressed-tensors"],
                      help="store the linear layers in FP8 e4m3: Qwen's block-scaled layout (`--fp8`), or "
                           "llm-compressor's per-channel one (`--fp8 compressed-tensors`)")
    tiny.add_argument("--fp8-block-size", type=int, default=128,
                      help="rows and columns of one scaled block of the fp8 layout (default 128, as Qwen's)")

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
    bench.add_argument("what", choices=list(BENCHMARKS),
                       help="; ".join(f"{name}: {text}" for name, text in BENCHMARKS.items()))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    report = sub.add_parser("experts-report", help="run each task family's prompts through the engine and draw "
                                                   "which experts they use (PNG heatmaps and a table; demo/)")
    report.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    report.add_argument("--out", default="experts_report", help="folder for the PNGs, experts.md and experts.json")
    report.add_argument("--per-family", type=int, default=16, help="held-out prompts run per task family")
    report.add_argument("--device", default="cpu", help="torch device of the engine")
    report.add_argument("--seed", type=int, default=11, help="seed of the prompts")
    return parser


def _serve_config(args) -> dict:
    """The AppConfig args of `serve`'s flags, as a Serve config file holds them: defaults left out,
    paths under the home folder written `~/...` (a config file is for other machines too)."""
    from expertmesh.gateway.app_config import AppConfig, app_settings
    from expertmesh.model.default import DEFAULT_MODEL_NAME, default_model_path

    values = setting_values(args, app_settings())
    values["grpc_host"] = values["grpc_host"] or args.host
    values["model"] = args.model_path or args.model
    if values["model"] is None:  # generated once here, so the replicas never race to write it
        values["model"] = str(default_model_path(_cache_dir() / "models" / DEFAULT_MODEL_NAME))
    app_args = AppConfig(**values).model_dump(exclude_defaults=True)
    for s in app_settings():
        if s.path and isinstance(app_args.get(s.name), str):
            app_args[s.name] = home_relative(app_args[s.name])
    return app_args


def home_relative(path: str) -> str:
    """`path` as `~/...` when it lies under the home folder, else unchanged."""
    home = str(Path.home())
    if path == home or path.startswith(home.rstrip(os.sep) + os.sep):
        return "~" + path[len(home.rstrip(os.sep)):]
    return path


def http_options(app_args: dict, host: str, port: int) -> dict:
    """Serve's `http_options` for the app's settings: the proxy's keep-alive and request timeouts.
    (Its header timeout travels in the environment: `gateway/proxy_timeouts.py`.)"""
    from expertmesh.gateway.app_config import AppConfig

    cfg = AppConfig.model_validate(app_args)
    options = {"host": host, "port": port, "keep_alive_timeout_s": cfg.http_keep_alive_timeout_s}
    if cfg.http_request_timeout_s is not None:
        options["request_timeout_s"] = cfg.http_request_timeout_s
    return options


def serve_config_file(app_args: dict, host: str, port: int) -> dict:
    """A Ray Serve config file (the schema of `serve deploy`) running the expertmesh application."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(app_args, host, port),
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

    from expertmesh.cluster.bootstrap import check_placeable
    from expertmesh.engine.model_files import load_tokenizer, model_dir
    from expertmesh.gateway.app_config import AppConfig
    from expertmesh.gateway.serve_app import app_bundles, build_app

    cfg = AppConfig.model_validate(app_args)
    if cfg.tool_registry:  # every registered tool server reached and listed, before Ray starts
        from expertmesh.gateway.tools.runner import check_tool_registry

        names = check_tool_registry(cfg)
        print(f"expertmesh: tool registry {cfg.tool_registry}: {len(names)} tool(s): {', '.join(names)}",
              file=sys.stderr)
    if cfg.grpc_port and not args.ray_address:  # the gateway replicas share the port (SO_REUSEPORT), so
        check_port_free(cfg.grpc_host, cfg.grpc_port, "--grpc-port")  # another app on it would be too
    model_dir(cfg.engine_config().load)  # a repo id is fetched here, once, before the replicas start
    load_tokenizer(cfg.engine_config().load)
    _proxy_environment(cfg.http_header_timeout_s)
    context = ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=False,
                       **({} if args.ray_address else {"dashboard_port": args.dashboard_port,
                                                      "include_dashboard": True}))
    check_placeable(f"the expertmesh app ({cfg.engine_replicas} engine replica(s) of ep_size {cfg.ep_size}, "
                    f"{cfg.gateway_replicas} gateway replica(s))", app_bundles(cfg))
    logging_config = {"log_level": cfg.log_level}
    serve.start(http_options=http_options(app_args, args.host, args.port), logging_config=logging_config)
    serve.run(build_app(app_args), name="expertmesh", route_prefix="/", logging_config=logging_config)
    grpc_bound = serve.get_app_handle("expertmesh").grpc_address.remote().result(timeout_s=120)
    print(banner(cfg.model_name(), f"{args.host}:{args.port}", grpc_bound, context.dashboard_url, ray_token_path(),
                 gateway_replicas=cfg.gateway_replicas), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def check_port_free(host: str, port: int, flag: str) -> None:
    """ValueError (the CLI's clear error) when `host:port` cannot be bound by a socket that does not
    share it: another process listens there, e.g. a second `expertmesh serve`."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart's TIME_WAIT is no listener
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            raise ValueError(f"{flag}: {host}:{port} is in use (another server listens there); "
                             "choose another port") from None


def banner(model_name: str, http_bound: str, grpc_bound: str | None, dashboard: str | None = None,
           token_path: Path | None = None, gateway_replicas: int = 1) -> str:
    """What `serve` prints once the app runs: the addresses the HTTP proxy and the gRPC server are bound
    to, the URL to reach each from this machine, and the Ray dashboard's (with where its API token is).
    With several gateway replicas, the gRPC line says that each serves the port and where a call
    finds which one answered it.

        >>> print(banner("tiny", "0.0.0.0:8000", "127.0.0.1:50051", "127.0.0.1:8265", Path("/home/u/.ray/auth_token")))
        expertmesh: serving tiny
        HTTP  http://127.0.0.1:8000/v1  (bound to 0.0.0.0:8000, every interface; health: /health, metrics: /metrics)
        gRPC  127.0.0.1:50051  (bound to 127.0.0.1:50051, this machine only; service expertmesh.v1.ExpertMesh)
        Ray   http://127.0.0.1:8265  (dashboard; API token in /home/u/.ray/auth_token: RAY_AUTH_MODE=token serve status)
    """
    def reach(bound: str) -> tuple[str, str]:
        host, _, port = bound.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]", ""):
            return f"127.0.0.1:{port}", f"bound to {bound}, every interface"
        if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
            return bound, f"bound to {bound}, this machine only"
        return bound, f"bound to {bound}"

    url, note = reach(http_bound)
    lines = [f"expertmesh: serving {model_name}",
             f"HTTP  http://{url}/v1  ({note}; health: /health, metrics: /metrics)"]
    if grpc_bound:
        address, note = reach(grpc_bound)
        lines.append(f"gRPC  {address}  ({note}; service expertmesh.v1.ExpertMesh)")
        if gateway_replicas > 1:
            lines.append(f"      served by each of the {gateway_replicas} gateway replicas; a call's "
                         "'expertmesh-replica' metadata (and /health's \"replica\") names the one that answered")
    else:
        lines.append("gRPC  off (--grpc-port 0)")
    if dashboard:
        auth = f"API token in {token_path}: RAY_AUTH_MODE=token serve status" if token_path else "serve status"
        lines.append(f"Ray   http://{dashboard.removeprefix('http://')}  (dashboard; {auth})")
    return "\n".join(lines)


def ray_token_path() -> Path | None:
    """Where the Ray this process started keeps its auth token (None: token auth is off)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path if path.is_file() else None


def _proxy_environment(header_timeout_s: float) -> None:
    """The proxy's callback (its header timeout, which Ray Serve does not expose, and OpenAI's error
    object for the answers it gives by itself) rides in the environment that the Ray this process
    starts hands to its proxy. A proxy callback of the user's own is kept."""
    from expertmesh.gateway.proxy_callback import PROXY_CALLBACK, PROXY_CALLBACK_ENV, proxy_env

    if os.environ.get(PROXY_CALLBACK_ENV, PROXY_CALLBACK) != PROXY_CALLBACK:
        print(f"expertmesh: warning: {PROXY_CALLBACK_ENV} is set to {os.environ[PROXY_CALLBACK_ENV]}; the HTTP "
              "header timeout and the proxy's OpenAI errors are not applied", file=sys.stderr)
        return
    os.environ.update(proxy_env(header_timeout_s))


def _llm(args):
    from expertmesh.gateway.llm import LLM
    from expertmesh.model.default import DEFAULT_MODEL_NAME, default_model_path

    values = setting_values(args, _engine_flags(args.command))
    values["model"] = values["model"] or default_model_path(_cache_dir() / "models" / DEFAULT_MODEL_NAME)
    return LLM(values.pop("model"), **values)


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
    if getattr(args, "log_level", None):
        import logging

        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("expertmesh").setLevel(args.log_level)
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
                             num_shards=args.num_shards, fp8=args.fp8, fp8_block_size=args.fp8_block_size)
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
            import importlib

            return importlib.import_module(f"expertmesh.bench.{args.what}").main(args.bench_args)
        elif args.command == "experts-report":
            from expertmesh.demo.experts_report import main as experts_report

            return experts_report(args)
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
