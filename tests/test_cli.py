"""The command line: make-tiny, generate, chat; and a frozen list of flags."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import expertmesh
from expertmesh import LLM
from expertmesh.gateway.cli import build_parser, main


def _flags(subcommand: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[subcommand]
    return {opt for action in sub._actions for opt in action.option_strings}


ENGINE_FLAGS = {"--model", "--revision", "--download-dir", "--tokenizer", "--chat-template", "--dtype", "--device",
                "--max-model-len", "--expert-impl", "--kernels", "--enforce-eager", "--no-enforce-eager",
                "--load-format", "--block-size", "--num-kv-blocks", "--kv-cache-memory-bytes",
                "--gpu-memory-utilization", "--enable-prefix-caching", "--no-enable-prefix-caching",
                "--max-num-seqs", "--max-num-batched-tokens", "--async-scheduling",
                "--no-async-scheduling", "--ep-size", "--sequence-parallel-min-tokens", "--ray-address",
                "--cpus-per-rank", "--max-resumptions", "--step-channel", "--num-redundant-experts",
                "--eplb-interval", "--eplb-min-imbalance", "--max-stop-strings",
                "--max-stop-string-chars", "--grammar-compile-timeout-s", "--grammar-compile-workers",
                "--grammar-max-bytes", "--grammar-max-enum-values", "--grammar-max-regex-chars"}
SAMPLING_FLAGS = {"--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--seed", "--stop"}
SERVING_FLAGS = {"--served-model-name", "--max-n", "--max-prompts", "--api-key", "--redis-url", "--api-keys-env",
                 "--redis-password-env", "--grpc-port", "--grpc-host", "--engine-replicas", "--min-replicas",
                 "--max-replicas", "--autoscale-target-seqs", "--upscale-delay-s", "--downscale-delay-s",
                 "--autoscale-look-back-s", "--drain-timeout-s", "--gateway-replicas",
                 "--max-ongoing-requests", "--request-routing", "--max-request-body-bytes", "--health-stall-timeout-s",
                 "--http-keep-alive-timeout-s", "--http-header-timeout-s", "--http-request-timeout-s",
                 "--grpc-max-connection-idle-s", "--grpc-keepalive-time-s", "--grpc-max-concurrent-streams",
                 "--tool-registry", "--allow-request-mcp-urls", "--no-allow-request-mcp-urls", "--tool-timeout-s",
                 "--tool-response-max-bytes", "--tool-output-max-tokens", "--tool-max-concurrency",
                 "--max-tool-rounds", "--response-store-ttl-s"}
LLM_KWARGS = ["model", "progress", "revision", "download_dir", "tokenizer", "chat_template", "dtype", "device",
              "max_model_len", "expert_impl", "load_format", "seed", "kernels", "enforce_eager", "block_size",
              "num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization", "enable_prefix_caching",
              "max_num_seqs", "max_num_batched_tokens", "async_scheduling", "ep_size", "sequence_parallel_min_tokens",
              "ray_address", "cpus_per_rank", "max_resumptions", "step_channel", "num_redundant_experts",
              "eplb_interval", "eplb_min_imbalance",
              "max_stop_strings", "max_stop_string_chars", "grammar_compile_timeout_s", "grammar_compile_workers",
              "grammar_max_bytes", "grammar_max_enum_values", "grammar_max_regex_chars"]


def test_the_public_flags_are_exactly_these():
    """Adding or removing a flag is a deliberate change to this list."""
    common = {"-h", "--help", "--log-level"} | ENGINE_FLAGS
    assert _flags("serve") == common | SERVING_FLAGS | {"--host", "--port", "--dashboard-port", "--print-config",
                                                          "--seed"}
    assert _flags("generate") == common | {"--json"} | SAMPLING_FLAGS
    assert _flags("chat") == common | {"--message", "--system", "--no-thinking"} | SAMPLING_FLAGS
    assert _flags("make-tiny") == {"-h", "--help", "--model-type", "--num-layers", "--num-experts", "--top-k",
                                   "--hidden-size", "--num-heads", "--num-kv-heads", "--head-dim",
                                   "--moe-intermediate-size", "--intermediate-size", "--dtype", "--seed",
                                   "--num-shards", "--fp8", "--fp8-block-size"}
    top = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert top == {"-h", "--help", "--version"}


def test_the_llm_keyword_arguments_are_exactly_these():
    """LLM's keywords are the engine's settings; adding one is a deliberate change to this list."""
    assert list(inspect.signature(LLM).parameters) == LLM_KWARGS


def test_an_unknown_llm_keyword_is_a_type_error_naming_the_closest(qwen3_moe_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_model_length'; did you mean 'max_model_len'"):
        LLM(qwen3_moe_path, max_model_length=64)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'$"):
        LLM(qwen3_moe_path, zzz=1)


def test_flags_llm_kwargs_and_serve_args_share_one_definition():
    """Every engine setting is an LLM keyword, a flag of generate, chat and serve (with its docstring as
    --help) and an AppConfig field with the same default; bounds and choices hold everywhere."""
    from expertmesh.engine.config import engine_settings
    from expertmesh.gateway.app_config import AppConfig

    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    by_flag = {opt: action for action in serve._actions for opt in action.option_strings}
    for s in engine_settings():
        action = by_flag[s.flag]
        assert action.dest == s.name and action.default == s.default
        assert s.help and " ".join(action.help.split()).startswith(s.help.replace("%", "%%")[:40])
        if s.name != "ray_address":  # a served app already runs inside Ray
            assert AppConfig.model_fields[s.name].default == s.default
            assert AppConfig.model_fields[s.name].description == s.help
    assert main(["generate", "--max-num-seqs", "0", "hi"]) == 2  # the field's bound, through the CLI
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        LLM(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        AppConfig(max_num_seqs=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--dtype", "float8", "hi"])


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"expertmesh {expertmesh.__version__}"


def test_chat_template_and_tokenizer_flags(qwen3_moe_path, tmp_path, capsys):
    """--chat-template (a file or inline Jinja) replaces the checkpoint's; --tokenizer loads another
    tokenizer directory."""
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        llm = LLM(qwen3_moe_path, device="cpu", chat_template=value, progress=False)
        assert llm.chat([{"role": "user", "content": "hi"}], None)[0].prompt == "<<hi>>"
    assert main(["chat", "--model", str(qwen3_moe_path), "--chat-template", str(tmp_path / "missing.jinja"),
                 "--message", "hi"]) == 2
    assert "neither a file nor a Jinja template" in capsys.readouterr().err
    other = tmp_path / "tok"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((qwen3_moe_path / name).read_bytes())
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    llm = LLM(qwen3_moe_path, device="cpu", tokenizer=str(other), progress=False)
    assert llm.chat([{"role": "user", "content": "hi"}], None)[0].prompt == "hi!"


def test_every_flag_has_help_text():
    parser = build_parser()
    for sub in next(a for a in parser._actions if a.dest == "command").choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help"


def test_make_tiny_then_generate(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["make-tiny", str(out), "--model-type", "mixtral", "--num-layers", "1", "--num-experts", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--max-tokens", "5", "--json", "Hello", "Bonjour"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["Hello", "Bonjour"]
    assert all(len(line["token_ids"]) <= 5 and line["finish_reason"] in ("stop", "length") for line in lines)


def test_make_tiny_fp8_then_generate(tmp_path, capsys):
    """`make-tiny --fp8` (Qwen's block layout; 32 divides the tiny widths) and
    `--fp8 compressed-tensors`: both serve tokens."""
    for layout, flags in (("fp8", ["--fp8", "--fp8-block-size", "32"]), ("compressed-tensors",
                                                                         ["--fp8", "compressed-tensors"])):
        out = tmp_path / layout
        assert main(["make-tiny", str(out), "--num-layers", "1", *flags]) == 0
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == layout
        capsys.readouterr()
        assert main(["generate", "--model", str(out), "--max-tokens", "4", "--json", "Hello"]) == 0
        assert 1 <= len(json.loads(capsys.readouterr().out)["token_ids"]) <= 4


def test_chat_renders_the_template(qwen3_moe_path, capsys):
    assert main(["chat", "--model", str(qwen3_moe_path), "--message", "hi", "--no-thinking", "--max-tokens", "3"]) == 0


def test_bad_flag_values_exit_with_a_clear_error(qwen3_moe_path, capsys):
    assert main(["generate", "--model", str(qwen3_moe_path), "--top-p", "2", "hi"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(qwen3_moe_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_model_needs_no_network(tmp_path):
    env = {"EXPERTMESH_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "expertmesh", "generate", "--max-tokens", "4", "--json", "Hi"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt"] == "Hi"
    assert (tmp_path / "models" / "demo-qwen3-moe-v3" / "config.json").is_file()


def test_banner_names_the_bound_addresses():
    from expertmesh.gateway.cli import banner

    text = banner("m", "0.0.0.0:8000", "10.1.2.3:50051")
    assert "HTTP  http://127.0.0.1:8000/v1  (bound to 0.0.0.0:8000, every interface;" in text
    assert "gRPC  10.1.2.3:50051  (bound to 10.1.2.3:50051;" in text
    assert banner("m", "127.0.0.1:8000", None).endswith("gRPC  off (--grpc-port 0)")
    ray_line = banner("m", "127.0.0.1:8000", None, "http://127.0.0.1:8266", Path("/h/.ray/auth_token")).splitlines()[-1]
    assert ray_line == ("Ray   http://127.0.0.1:8266  (dashboard; API token in /h/.ray/auth_token: "
                        "RAY_AUTH_MODE=token serve status)")
    assert banner("m", "127.0.0.1:8000", None, "127.0.0.1:8265").endswith("(dashboard; serve status)")


def test_serve_refuses_a_grpc_port_another_server_holds():
    """The gateway replicas share the gRPC port (SO_REUSEPORT): `serve` checks first that no other
    server (a second `expertmesh serve`) holds it, so that the two are never silently mixed."""
    import socket

    from expertmesh.gateway.cli import check_port_free

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--grpc-port: 127.0.0.1:{port} is in use"):
            check_port_free("127.0.0.1", port, "--grpc-port")
    check_port_free("127.0.0.1", port, "--grpc-port")  # released: free again
