"""make_tiny and the default model: transformers loads every model type as is; output is deterministic."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from expertmesh.model import tiny
from expertmesh.model.default import TINY_MODEL_ARGS, tiny_model_path
from expertmesh.model.tiny import make_tiny
from expertmesh.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "qwen3_moe": dict(model_type="qwen3_moe"),
    "qwen3": dict(model_type="qwen3", num_shards=1),
    "qwen2_moe": dict(model_type="qwen2_moe", num_shards=3),
    "mixtral": dict(model_type="mixtral"),
    "qwen3_tied": dict(model_type="qwen3", tie_word_embeddings=True),
    "qwen3_moe_yarn": dict(model_type="qwen3_moe", max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}
EXPECTED_CLASS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# Hub names of one expert's (gate, up, down) projections, per model type.
EXPERT_NAMES = {
    "qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
    "qwen2_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
    "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                "block_sparse_moe.experts.{e}.w2"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, **kwargs) for name, kwargs in VARIANTS.items()}


def saved_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_files_and_config(checkpoints):
    path = checkpoints["qwen3_moe"]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 1088  # 1033 tokens rounded up to a multiple of 64
    assert config["num_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert config["norm_topk_prob"] is True and config["torch_dtype"] == "float32"
    assert config["rope_theta"] == 1e6 and config["rope_scaling"] is None
    tok = Tokenizer.from_pretrained(path)
    assert config["eos_token_id"] == tok.token_to_id("<|im_end|>")

    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = saved_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert set(index["weight_map"].values()) == shards
    assert not (checkpoints["qwen3"] / "model.safetensors.index.json").exists()
    assert (checkpoints["qwen3"] / "model.safetensors").is_file()
    assert len(list(checkpoints["qwen2_moe"].glob("model-*-of-00003.safetensors"))) == 3

    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.min() < 1.0 < norm.max() < 1.5  # around 1, but not all ones
    assert 0.015 < tensors["model.embed_tokens.weight"].std() < 0.025


def test_tensor_names_per_model_type(checkpoints):
    qwen2 = saved_tensors(checkpoints["qwen2_moe"])
    assert "model.layers.1.self_attn.q_proj.bias" in qwen2
    assert "model.layers.0.self_attn.q_norm.weight" not in qwen2
    assert qwen2["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape == (48, 64)
    assert qwen2["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    mixtral = saved_tensors(checkpoints["mixtral"])
    assert mixtral["model.layers.1.block_sparse_moe.gate.weight"].shape == (8, 64)
    assert mixtral["model.layers.1.block_sparse_moe.experts.7.w2.weight"].shape == (64, 32)
    dense = saved_tensors(checkpoints["qwen3"])
    assert dense["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    assert dense["model.layers.0.self_attn.k_norm.weight"].shape == (16,)
    assert "lm_head.weight" in dense and "lm_head.weight" not in saved_tensors(checkpoints["qwen3_tied"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_checkpoint(checkpoints, variant):
    path = checkpoints[variant]
    model_type = VARIANTS[variant]["model_type"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == EXPECTED_CLASS[model_type]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"]

    saved = saved_tensors(path)
    loaded = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"):
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0)
    lm_head = saved["model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"]
    torch.testing.assert_close(loaded["lm_head.weight"], lm_head, rtol=0, atol=0)
    if model_type in EXPERT_NAMES:  # transformers 5 stacks experts: gate_up [E, 2F, D], down [E, D, F]
        gate, up, down = (f"model.layers.1.{n.format(e=5)}.weight" for n in EXPERT_NAMES[model_type])
        torch.testing.assert_close(loaded["model.layers.1.mlp.experts.gate_up_proj"][5],
                                   torch.cat([saved[gate], saved[up]]), rtol=0, atol=0)
        torch.testing.assert_close(loaded["model.layers.1.mlp.experts.down_proj"][5], saved[down],
                                   rtol=0, atol=0)

    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 1026]])).logits
    assert logits.shape == (1, 4, 1088) and torch.isfinite(logits).all()


def test_yarn_config(checkpoints):
    config = transformers.AutoConfig.from_pretrained(checkpoints["qwen3_moe_yarn"])
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["rope_theta"] == 1e6


def test_autotokenizer_matches_ours(checkpoints):
    path = checkpoints["qwen3_moe"]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    text = ("<|im_start|>user\nHello, 世界! مرحبا नमस्ते 👋🏽 x=1.5e-3 {\"k\": [1]}<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nok\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>")
    ids = ours.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert hf.convert_tokens_to_ids("<|im_end|>") == ours.eos_token_ids[0]
    assert hf.pad_token == "<|endoftext|>" and hf.eos_token == "<|im_end|>"


def test_dtype_bfloat16(tmp_path):
    path = make_tiny(tmp_path, model_type="mixtral", num_layers=1, dtype="bfloat16", num_shards=1)
    tensors = saved_tensors(path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        make_tiny(tmp_path, model_type="llama")
    with pytest.raises(ValueError, match="top_k"):
        make_tiny(tmp_path, top_k=9)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny(tmp_path, vocab_size=512)


def test_byte_identical_across_runs(tmp_path):
    kwargs = dict(model_type="qwen2_moe", num_layers=1, num_shards=2, seed=7)
    first, second = make_tiny(tmp_path / "a", **kwargs), make_tiny(tmp_path / "b", **kwargs)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = make_tiny(tmp_path / "c", **{**kwargs, "seed": 8})
    shard = "model-00001-of-00002.safetensors"
    assert (other / shard).read_bytes() != (first / shard).read_bytes()


def test_tokenizer_training_is_deterministic():
    text = tiny._train_tokenizer_json()
    assert tiny._train_tokenizer_json() == text == tiny.tiny_tokenizer_json()
    # A fresh process (new hash seeds in Rust and Python) trains the same vocabulary, without transformers.
    code = ("import sys; from expertmesh.model import tiny; sys.stdout.write(tiny._train_tokenizer_json()); "
            "assert 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == text
    vocab = json.loads(text)
    assert len(vocab["model"]["vocab"]) == tiny.BPE_VOCAB_SIZE
    assert [t["content"] for t in vocab["added_tokens"]] == list(tiny.SPECIAL_TOKENS + tiny.CONTROL_TOKENS)


def test_tiny_model_created_once_and_reused(tmp_path):
    target = tmp_path / "models" / "tiny"
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_path(target))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no staging folders left behind
    stamp = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert tiny_model_path(target) == target
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamp

    config = json.loads((target / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY_MODEL_ARGS["num_layers"] == 4
    assert config["hidden_size"] == 128 and config["model_type"] == "qwen3_moe"
    assert sum(p.stat().st_size for p in target.iterdir()) < 8 * 2**20
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tiny_model_path(empty) == empty and (empty / "config.json").is_file()
    with pytest.raises(ValueError, match="does not hold the tiny model"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("x")
        tiny_model_path(tmp_path / "junk")
