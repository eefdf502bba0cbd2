"""Models by Hugging Face repo id (model/hub.py), from a pre-filled Hugging Face cache, offline.

The cache is the Hub's own layout, `$HF_HOME/hub/models--org--tiny/snapshots/<commit>/` with
`refs/main` naming the commit, filled from make-tiny checkpoints. The LLM and CLI runs are
subprocesses: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from expertmesh.model.hub import CHECKPOINT_FILES, CONFIG_FILES, is_repo_id

ROOT = Path(__file__).resolve().parents[1]
MAIN, OLD = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_models):
    """HF_HOME whose cache holds org/tiny: main is the Qwen3-MoE tiny model, commit OLD the Mixtral one."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--tiny"
    for commit, source in ((MAIN, tiny_models["qwen3_moe"]), (OLD, tiny_models["mixtral"])):
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    return home


def _run(code_or_argv, hf_home: Path, **env) -> subprocess.CompletedProcess:
    argv = ["-c", code_or_argv] if isinstance(code_or_argv, str) else ["-m", "expertmesh", *code_or_argv]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                    "EXPERTMESH_CACHE": str(hf_home / "expertmesh"), **env})
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=environ, timeout=600)


def _greedy(model: str | Path, **kwargs) -> list[int]:
    from expertmesh import LLM, SamplingParams

    llm = LLM(model, device="cpu", progress=False, **kwargs)
    return llm.generate("Hi", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids


def test_repo_ids_are_told_from_paths():
    assert is_repo_id("Qwen/Qwen3-30B-A3B") and is_repo_id("org/tiny.v2_b")
    for name in ("/abs/path", "./rel", "~/m", "a/b/c", "org--x/y", "org/..", "-org/x", "org", "org/x."):
        assert not is_repo_id(name), name


def test_only_the_files_the_engine_reads_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "README.md", "LICENSE",
            ".gitattributes", "pytorch_model.bin", "original/consolidated.00.pth", "model.gguf"]
    fetched = set(filter_repo_objects(repo, allow_patterns=list(CHECKPOINT_FILES)))
    assert fetched == set(repo) - {"README.md", "LICENSE", ".gitattributes", "pytorch_model.bin",
                                   "original/consolidated.00.pth", "model.gguf"}
    dummy = set(filter_repo_objects(repo, allow_patterns=list(CONFIG_FILES)))  # load_format dummy: no weights
    assert not any(".safetensors" in name for name in dummy) and "config.json" in dummy


def test_llm_and_generate_take_a_repo_id_from_the_offline_cache(hf_home, qwen3_moe_path, tiny_models):
    expected = _greedy(qwen3_moe_path)
    script = ("import json; from expertmesh import LLM, SamplingParams\n"
              "p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)\n"
              "llm = LLM('org/tiny', device='cpu', progress=False)\n"
              "old = LLM('org/tiny', revision='" + OLD + "', device='cpu', progress=False)\n"
              "print(json.dumps([llm.generate('Hi', p)[0].outputs[0].token_ids,\n"
              "                  old.engine.executor.runner.model_config.model_type]))\n")
    result = _run(script, hf_home)
    assert result.returncode == 0, result.stderr
    tokens, old_type = json.loads(result.stdout.strip().splitlines()[-1])
    assert tokens == expected
    assert old_type == "mixtral"  # --revision picks that commit's snapshot

    result = _run(["generate", "--model", "org/tiny", "--device", "cpu", "--max-tokens", "4", "--json", "Hi"],
                  hf_home)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["prompt"] == "Hi" and line["token_ids"] == expected[:len(line["token_ids"])]


def test_offline_and_not_cached_says_so(hf_home):
    result = _run(["generate", "--model", "org/missing", "--device", "cpu", "Hi"], hf_home)
    assert result.returncode == 2
    assert "model 'org/missing' is not in the Hugging Face cache" in result.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in result.stderr
    result = _run(["generate", "--model", "org/tiny", "--revision", "c" * 40, "--device", "cpu", "Hi"], hf_home)
    assert result.returncode == 2 and "at revision 'ccc" in result.stderr


def test_a_local_directory_wins_over_a_repo_id(hf_home, qwen3_moe_path, tmp_path, monkeypatch):
    """`org/tiny` that exists as a directory under the working directory is that directory."""
    (tmp_path / "org").mkdir()
    shutil.copytree(qwen3_moe_path, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    from expertmesh.model.hub import checkpoint_dir

    assert checkpoint_dir("org/tiny") == Path("org/tiny")


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """The Hub's answer for a repo that does not exist (or that the caller may not see)."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_an_unknown_repo_says_so(hf_home):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _run(["generate", "--model", "nobody/nothing", "--device", "cpu", "Hi"], hf_home,
                      HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr
    assert "model 'nobody/nothing' is neither a local directory nor a Hugging Face repo" in result.stderr
