"""The command line: make-tiny, generate, chat; and a frozen list of flags."""
from __future__ import annotations

import json
import subprocess
import sys

from expertmesh.gateway.cli import build_parser, main


def _flags(subcommand: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[subcommand]
    return {opt for action in sub._actions for opt in action.option_strings}


ENGINE_FLAGS = {"--model", "--ep-size", "--ray-address", "--device", "--dtype", "--max-model-len", "--block-size",
                "--num-kv-blocks", "--no-prefix-caching", "--max-num-seqs", "--max-num-batched-tokens", "--expert-impl"}
SAMPLING_FLAGS = {"--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--seed", "--stop"}


def test_the_public_flags_are_exactly_these():
    """Adding or removing a flag is a deliberate change to this list."""
    assert _flags("generate") == {"-h", "--help", "--json"} | ENGINE_FLAGS | SAMPLING_FLAGS
    assert _flags("chat") == {"-h", "--help", "--message", "--system", "--no-thinking"} | ENGINE_FLAGS | SAMPLING_FLAGS
    assert _flags("make-tiny") == {"-h", "--help", "--model-type", "--num-layers", "--num-experts", "--top-k",
                                   "--hidden-size", "--num-heads", "--num-kv-heads", "--head-dim",
                                   "--moe-intermediate-size", "--intermediate-size", "--dtype", "--seed",
                                   "--num-shards"}


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
    assert (tmp_path / "models" / "tiny-qwen3-moe-v1" / "config.json").is_file()
