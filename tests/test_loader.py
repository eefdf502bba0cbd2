"""Loading by table: per-rank expert slices, sharded and single-file checkpoints."""
from __future__ import annotations

import torch
from safetensors import safe_open

from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import CausalLM
from expertmesh.model.loader import checkpoint_files, load_weights


def _tensor(path, name):
    with safe_open(checkpoint_files(path)[name], "pt") as f:
        return f.get_tensor(name)


def test_a_rank_loads_only_its_experts_in_placement_order(qwen3_moe_path):
    config = ModelConfig.from_pretrained(qwen3_moe_path)
    owned = [5, 1, 6]
    model = CausalLM(config, expert_ids=owned)
    load_weights(model, qwen3_moe_path, config, expert_ids=owned, progress=False)
    F = config.moe_intermediate_size
    for layer in range(config.num_layers):
        experts = model.layers[layer].mlp.experts
        assert experts.w13_EFD.shape == (3, 2 * F, config.hidden_size)
        for slot, expert in enumerate(owned):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            torch.testing.assert_close(experts.w13_EFD[slot, :F], _tensor(qwen3_moe_path, f"{prefix}.gate_proj.weight"))
            torch.testing.assert_close(experts.w13_EFD[slot, F:], _tensor(qwen3_moe_path, f"{prefix}.up_proj.weight"))
            torch.testing.assert_close(experts.w2_EDF[slot], _tensor(qwen3_moe_path, f"{prefix}.down_proj.weight"))


def test_expert_parameter_count_is_the_ranks_share(qwen3_moe_path):
    config = ModelConfig.from_pretrained(qwen3_moe_path)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size

    def expert_params(model):
        return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)

    full = CausalLM(config)
    half = CausalLM(config, expert_ids=[0, 2, 4, 6])
    assert expert_params(full) == config.num_layers * config.num_experts * per_expert
    assert expert_params(half) == config.num_layers * 4 * per_expert


def test_fused_qkv_and_gate_up_come_from_the_separate_tensors(tiny_models):
    path = tiny_models["qwen2_moe"]
    config = ModelConfig.from_pretrained(path)
    model = CausalLM(config)
    load_weights(model, path, config, progress=False)
    attn = model.layers[0].attn
    _q, k, v = attn.qkv_proj.bias.split([config.q_size, config.kv_size, config.kv_size])
    torch.testing.assert_close(k, _tensor(path, "model.layers.0.self_attn.k_proj.bias"))
    torch.testing.assert_close(v, _tensor(path, "model.layers.0.self_attn.v_proj.bias"))
    shared = model.layers[0].mlp.shared_expert
    _gate, up = shared.gate_up_proj.weight.split(config.shared_expert_intermediate_size)
    torch.testing.assert_close(up, _tensor(path, "model.layers.0.mlp.shared_expert.up_proj.weight"))


def test_single_file_checkpoint_loads(tmp_path):
    from expertmesh.model.tiny import make_tiny

    path = make_tiny(tmp_path / "one", num_shards=1)
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    config = ModelConfig.from_pretrained(path)
    model = CausalLM(config)
    load_weights(model, path, config, progress=False)
    torch.testing.assert_close(model.norm.weight, _tensor(path, "model.norm.weight"))


def test_stacked_expert_layout_of_transformers_5_loads(qwen3_moe_path, tmp_path):
    """transformers 5 keeps experts stacked in memory (gate_up_proj [E, 2F, D]); a checkpoint
    saved from that state dict loads too, each rank slicing out its own experts."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_path, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    out = tmp_path / "stacked"
    out.mkdir()
    shutil.copy(qwen3_moe_path / "config.json", out / "config.json")
    save_file(state, out / "model.safetensors")
    config = ModelConfig.from_pretrained(out)
    owned = [7, 2]
    model = CausalLM(config, expert_ids=owned)
    load_weights(model, out, config, expert_ids=owned, progress=False)
    experts = model.layers[1].mlp.experts
    torch.testing.assert_close(experts.w13_EFD, state["model.layers.1.mlp.experts.gate_up_proj"][owned])
    torch.testing.assert_close(experts.w2_EDF, state["model.layers.1.mlp.experts.down_proj"][owned])
