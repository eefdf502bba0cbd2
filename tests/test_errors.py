"""Bad input raises a ValueError that names the problem, before anything runs."""
from __future__ import annotations

import json
import shutil

import pytest

from expertmesh import LLM, SamplingParams
from expertmesh.engine.sampling_params import GuidedDecodingParams, ToolCallConstraint
from expertmesh.model.config import ModelConfig


@pytest.fixture(scope="module")
def llm(qwen3_moe_path):
    return LLM(qwen3_moe_path, device="cpu", max_model_len=64, progress=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"prompt is 80 tokens.*max_model_len is 64"):
        llm.generate([[5] * 80], SamplingParams(max_tokens=4))
    # Nothing was admitted: the engine is idle and a good request still runs.
    assert not llm.engine.has_unfinished()
    assert llm.generate([[5] * 8], SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"


def test_one_bad_prompt_admits_none_of_the_batch(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1, 2, 3], [5] * 100], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.usage == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": -3}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.5}, r"temperature must be in \[0, 2\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"logprobs": 50}, "logprobs must be an integer in"),
    ({"presence_penalty": 3.0}, "presence_penalty must be in"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 2\]"),
    # non-finite and out-of-range numbers (issue 10, item 8): each refused, naming its field
    ({"temperature": float("inf")}, "temperature must be in"),
    ({"temperature": float("nan")}, "temperature must be in"),
    ({"temperature": 2.5}, "temperature must be in"),
    ({"top_p": float("nan")}, "top_p must be in"),
    ({"min_p": float("inf")}, "min_p must be in"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be in"),
    ({"repetition_penalty": 1e308 * 10}, "repetition_penalty must be in"),
    ({"repetition_penalty": 3.0}, "repetition_penalty must be in"),
    ({"presence_penalty": float("-inf")}, "presence_penalty must be in"),
    ({"frequency_penalty": 10**400}, "frequency_penalty must be in"),
    ({"top_k": 2**63}, "top_k must be"),
    ({"top_k": True}, "top_k must be"),
    ({"n": 2**63}, "n must be an integer >= 1"),
    ({"max_tokens": 2**63}, "max_tokens must be an integer >= 1"),
    ({"min_tokens": 2**64, "max_tokens": None}, "min_tokens must be an integer >= 0"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids must be"),
    ({"thinking_budget": 2**63, "reasoning": True}, "thinking_budget must be an integer >= 0"),
    ({"logprobs": True}, "logprobs must be an integer in"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_guided_json_nested_too_deep():
    deep = {"type": "string"}
    for _ in range(900):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match=r"guided_decoding\.json nests deeper than 64 levels"):
        GuidedDecodingParams(json=deep)
    with pytest.raises(ValueError, match=r"guided_decoding\.json nests deeper than 64 levels"):
        GuidedDecodingParams(json='{"a": ' * 5000 + "1" + "}" * 5000)  # deeper than Python's json recurses
    with pytest.raises(ValueError, match=r"tool_calls.tools\['f'\].parameters nests deeper than 64"):
        ToolCallConstraint([{"name": "f", "parameters": deep}])
    shallow = {"type": "string"}
    for _ in range(63):
        shallow = {"type": "array", "items": shallow}
    GuidedDecodingParams(json=shallow)  # 64 levels: the limit itself is fine


def test_model_dependent_bounds(llm):
    vocab, limit = llm.engine.vocab_size, llm.engine.max_model_len
    for params, message in ((SamplingParams(top_k=vocab + 1), "top_k must be at most the vocabulary size"),
                            (SamplingParams(thinking_budget=limit + 1, reasoning=True),
                             "thinking_budget must be at most max_model_len"),
                            (SamplingParams(stop_token_ids=[vocab]), "stop_token_ids must be in")):
        with pytest.raises(ValueError, match=message):
            llm.generate([[5] * 4], params)
    assert not llm.engine.has_unfinished()
    assert llm.generate([[5] * 4], SamplingParams(top_k=vocab, max_tokens=1))[0].outputs[0].token_ids


def test_lone_surrogate_and_reserved_template_kwargs(llm):
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.generate(["bad \ud800 text"], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="chat_template_kwargs must not set 'tools'"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1),
                 chat_template_kwargs={"tools": []})


def test_token_ids_out_of_vocab(llm):
    with pytest.raises(ValueError, match="prompt token ids must be integers in"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=2))


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match=r"model directory .*nowhere.* does not exist"):
        LLM(tmp_path / "nowhere", progress=False)


def test_unsupported_model_type_lists_the_supported_ones(qwen3_moe_path, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(qwen3_moe_path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    expected = "unsupported model_type 'llama'; supported: qwen3_moe, qwen3, qwen2_moe, mixtral"
    with pytest.raises(ValueError, match=expected):
        LLM(bad, progress=False)


def test_unsupported_rope_type(qwen3_moe_path):
    with pytest.raises(ValueError, match="unsupported rope_type 'longrope'"):
        ModelConfig.from_hf_dict({**json.loads((qwen3_moe_path / "config.json").read_text()),
                                  "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def _edited_checkpoint(src, dst, edit):
    """A copy of the checkpoint at `src` whose index and one shard `edit(index, shards)` changes:
    `shards` maps a shard file name to its tensors, loaded on first access and written back."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())

    class Shards(dict):
        def __missing__(self, name):
            self[name] = load_file(dst / name) if (dst / name).exists() else {}
            return self[name]

    shards = Shards()
    edit(index, shards)
    for name, tensors in shards.items():
        save_file(tensors, dst / name)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_checkpoint_missing_a_tensor_names_it(qwen3_moe_path, tmp_path):
    victim = "model.layers.1.mlp.experts.3.up_proj.weight"

    def drop(index, shards):
        del shards[index["weight_map"].pop(victim)][victim]

    bad = _edited_checkpoint(qwen3_moe_path, tmp_path / "missing", drop)
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        LLM(bad, progress=False)


def test_checkpoint_with_a_stray_tensor_names_it(qwen3_moe_path, tmp_path):
    import torch

    def add(index, shards):
        shards["extra.safetensors"]["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
        index["weight_map"]["model.layers.0.mlp.mystery.weight"] = "extra.safetensors"

    bad = _edited_checkpoint(qwen3_moe_path, tmp_path / "stray", add)
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.mlp\.mystery\.weight"):
        LLM(bad, progress=False)


def test_checkpoint_tensor_of_the_wrong_shape_names_it(qwen3_moe_path, tmp_path):
    import torch

    def reshape(index, shards):
        shards[index["weight_map"]["model.norm.weight"]]["model.norm.weight"] = torch.ones(3)

    bad = _edited_checkpoint(qwen3_moe_path, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' has shape \(3,\), expected \(64,\)"):
        LLM(bad, progress=False)


def test_unknown_dtype_and_device(qwen3_moe_path):
    with pytest.raises(ValueError, match="dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'float8'"):
        LLM(qwen3_moe_path, dtype="float8", progress=False)
