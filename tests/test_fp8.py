"""FP8 checkpoints on the CPU: Qwen's block-scaled layout and llm-compressor's per-channel one,
written by make-tiny --fp8, loaded by our engine with the weights dequantized as they load.

Oracles: transformers' own fine-grained FP8 loader (on a CPU it dequantizes), and a plain float32
checkpoint holding the dequantized weights, computed here block by block in a loop that shares
no code with model/quantization.py. Tolerance: logits within 1e-4 in float32 (the same weights
in both models; only the order of float32 sums differs), greedy tokens identical over 32 steps.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_ep_gloo import assert_ranks_equal_one_process
from test_oracle import our_logits, runner_for

from expertmesh import LLM, SamplingParams
from expertmesh.engine.config import CacheConfig, ModelLoadConfig
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.model.config import ModelConfig
from expertmesh.model.loader import checkpoint_files
from expertmesh.model.quantization import parse_quantization_config, quantize_blocks
from expertmesh.model.tiny import make_tiny

BLOCK = 16  # the tiny model's widths (64, 32, 16) are whole blocks, as Qwen's are of 128
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "混合专家模型把每个词元送到"]


def dequantized_by_loop(q: torch.Tensor, scale: torch.Tensor, block: int | None) -> torch.Tensor:
    """The float32 weights of FP8 `q`: per block (block layout) or per row (channel layout), one
    element range at a time."""
    out = q.to(torch.float32).clone()
    if block is None:
        for n in range(q.shape[0]):
            out[n] *= scale[n, 0]
        return out
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale[i, j]
    return out


def write_dequantized(fp8_dir, out_dir, block: int | None):
    """A plain float32 copy of an FP8 checkpoint: every weight with a scale replaced by its
    dequantized values, the scales and quantization_config dropped."""
    shutil.copytree(fp8_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    suffix = "weight_scale_inv" if config.pop("quantization_config")["quant_method"] == "fp8" else "weight_scale"
    (out_dir / "config.json").write_text(json.dumps(config))
    files = checkpoint_files(fp8_dir)
    for path in out_dir.glob("*.safetensors"):
        tensors = load_file(path)
        plain = {}
        for name, tensor in tensors.items():
            if name.endswith(suffix):
                continue
            scale_name = name[: -len("weight")] + suffix
            scale = tensors.get(scale_name)
            if scale is None and scale_name in files:  # the scale sits in another shard
                with safe_open(files[scale_name], "pt") as g:
                    scale = g.get_tensor(scale_name)
            plain[name] = tensor if scale is None else dequantized_by_loop(tensor, scale, block)
        save_file(plain, str(path), metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith(suffix)}
        index.write_text(json.dumps(data))
    return out_dir


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    block = make_tiny(root / "block", fp8="fp8", fp8_block_size=BLOCK)
    channel = make_tiny(root / "channel", fp8="compressed-tensors")
    return {"block": block, "channel": channel,
            "block_plain": write_dequantized(block, root / "block_plain", BLOCK),
            "channel_plain": write_dequantized(channel, root / "channel_plain", None)}


def test_make_tiny_fp8_writes_qwens_layout(fp8_models):
    path = fp8_models["block"]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [BLOCK, BLOCK]}
    dtypes = {}
    for name, file in checkpoint_files(path).items():
        with safe_open(file, "pt") as f:
            dtypes[name] = (f.get_tensor(name).dtype, tuple(f.get_tensor(name).shape))
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == (torch.float8_e4m3fn, (64, 64))
    assert dtypes["model.layers.0.self_attn.q_proj.weight_scale_inv"] == (torch.float32, (4, 4))
    assert dtypes["model.layers.1.mlp.experts.7.down_proj.weight"] == (torch.float8_e4m3fn, (64, 32))
    assert dtypes["model.layers.1.mlp.experts.7.down_proj.weight_scale_inv"] == (torch.float32, (4, 2))
    for unquantized in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
                        "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert dtypes[unquantized][0] == torch.float32, unquantized
        assert unquantized.replace("weight", "weight_scale_inv") not in dtypes
    channel = json.loads((fp8_models["channel"] / "config.json").read_text())["quantization_config"]
    assert channel["quant_method"] == "compressed-tensors"
    assert channel["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_transformers_loads_our_fp8_checkpoint_and_gives_our_logits(fp8_models):
    from transformers import AutoModelForCausalLM

    path = fp8_models["block"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # dequantizes on a CPU
    runner = runner_for(path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, runner.model_config.vocab_size, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    with torch.no_grad():
        expected = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for ours, ref in zip(our_logits(runner, prompts, chunk=8), expected):
        assert ref.abs().max() > 0.05
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["block", "channel"])
def test_fp8_logits_and_greedy_tokens_equal_the_dequantized_model(fp8_models, layout):
    fp8, plain = fp8_models[layout], fp8_models[f"{layout}_plain"]
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3, 17, 64)]
    for ours, ref in zip(our_logits(runner_for(fp8), prompts, chunk=5), our_logits(runner_for(plain), prompts, 1000)):
        assert ref.abs().max() > 0.05
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    tokens = [[o.outputs[0].token_ids for o in LLM(p, device="cpu", progress=False).generate(PROMPTS, GREEDY)]
              for p in (fp8, plain)]
    assert tokens[0] == tokens[1] and all(len(t) == 32 for t in tokens[0])


def test_fp8_weights_differ_from_the_unquantized_ones(fp8_models, qwen3_moe_path):
    """The same seed gives the same random model; FP8 rounds it (else the oracle above proves little)."""
    fp8 = runner_for(fp8_models["block"]).model.layers[0].attn.qkv_proj.weight
    full = runner_for(qwen3_moe_path).model.layers[0].attn.qkv_proj.weight
    diff = (fp8 - full).abs()
    assert 0 < diff.max() <= full.abs().max() / 16  # e4m3: 3 mantissa bits
    assert (diff > 0).float().mean() > 0.5


@pytest.mark.parametrize("world, assignment", [(2, [[0, 1, 2], [3, 4]]), (3, [[0, 1], [2, 3], [4]])])
def test_expert_parallel_ranks_read_their_fp8_experts_and_equal_ep1(fp8_models, tmp_path, world, assignment):
    assert_ranks_equal_one_process(fp8_models["block"], tmp_path, world, assignment, padded=True)


def test_ragged_blocks_dequantize_per_block():
    """Widths that are not whole blocks (the official layout rounds the grid up)."""
    w = torch.randn(50, 37, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_blocks(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 3)
    config = parse_quantization_config({"quant_method": "fp8", "weight_block_size": [16, 16]})
    got = config.dequantize(q, scale)
    expected = q.to(torch.float32).clone()
    for i in range(4):
        for j in range(3):
            expected[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] *= scale[i, j]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (got - w).abs().max() <= w.abs().max() / 16
    stacked = config.dequantize(torch.stack([q, q]), torch.stack([scale, 2 * scale]))  # stacked experts
    torch.testing.assert_close(stacked[1], 2 * expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"blocks of 16x16 over \(50, 37\) need \(4, 3\)"):
        config.dequantize(q, scale[:, :2], "w")


CT = {"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"],
                                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                    "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}


def _ct(**weights):
    group = {**CT["config_groups"]["group_0"], "weights": {**CT["config_groups"]["group_0"]["weights"], **weights}}
    return {**CT, "config_groups": {"group_0": group}}


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "awq"}, "quantization_config.quant_method"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "quantization_config.fmt"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "quantization_config.activation_scheme"),
    ({"quant_method": "fp8"}, "quantization_config.weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [128, 0]}, "quantization_config.weight_block_size"),
    ({**CT, "format": "pack-quantized"}, "quantization_config.format"),
    ({**CT, "kv_cache_scheme": {"num_bits": 8}}, "quantization_config.kv_cache_scheme"),
    (_ct(num_bits=4, type="int"), "quantization_config.config_groups.group_0.weights"),
    (_ct(strategy="group"), "quantization_config.config_groups.group_0.weights.strategy"),
    (_ct(symmetric=False), "quantization_config.config_groups.group_0.weights.symmetric"),
    ({**CT, "config_groups": {"group_0": {**CT["config_groups"]["group_0"],
                                          "input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}}},
     "quantization_config.config_groups.group_0.input_activations.dynamic"),
    ({**CT, "config_groups": {}}, "quantization_config.config_groups"),
])
def test_an_unsupported_quantization_config_names_its_field(qc, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_quantization_config(qc)


def test_bad_fp8_configs_and_tensors_fail_at_start_up_naming_what(fp8_models, tmp_path):
    path = shutil.copytree(fp8_models["block"], tmp_path / "bad")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = "128"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size"):
        LLM(path, device="cpu", progress=False)
    del config["quantization_config"]  # FP8 tensors, no config
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is torch.float8_e4m3fn but config.json has no quantization_config"):
        runner_for(path)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    (path / "config.json").write_text(json.dumps(config))
    for file in path.glob("*.safetensors"):  # drop one weight's scale
        tensors = load_file(file)
        if "model.layers.0.self_attn.o_proj.weight_scale_inv" in tensors:
            del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
            save_file(tensors, str(file))
            break
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"o_proj\.weight_scale_inv' beside it"):
        runner_for(path)


def test_a_scale_without_its_weight_is_named(fp8_models, tmp_path):
    path = shutil.copytree(fp8_models["block"], tmp_path / "orphan")
    file = sorted(path.glob("*.safetensors"))[0]
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.nothing.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, str(file))
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.self_attn.nothing.weight_scale_inv"] = file.name
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.self_attn\.nothing\.weight_scale_inv"):
        runner_for(path)


def test_model_config_carries_the_fp8_layout(fp8_models):
    block = ModelConfig.from_pretrained(fp8_models["block"]).quantization
    assert (block.method, block.strategy, block.block, block.scale_suffix) == ("fp8", "block", (16, 16),
                                                                              "weight_scale_inv")
    channel = ModelConfig.from_pretrained(fp8_models["channel"]).quantization
    assert (channel.method, channel.strategy, channel.scale_suffix) == ("compressed-tensors", "channel",
                                                                       "weight_scale")


# ---- the kernel path keeps FP8 weights (W8A16 Triton kernels; here in Triton's interpreter) ----------------

@pytest.mark.parametrize("layout", ["block", "channel"])
def test_the_kernel_path_keeps_fp8_weights_and_equals_the_dequantized_model(fp8_models, layout, monkeypatch):
    """kernels='triton' on the CPU runs the GPU's kernels in Triton's interpreter: the linear layers
    and experts stay FP8 with their scales (half the bytes), the GEMVs and fused-MoE kernels scale
    each weight block as they read it, and in float32 the logits are the dequantized model's."""
    pytest.importorskip("triton")
    fp8, plain = fp8_models[layout], fp8_models[f"{layout}_plain"]
    common = dict(device="cpu", dtype="float32", max_num_batched_tokens=40, max_num_seqs=4, progress=False)
    fast = LLM(fp8, kernels="triton", **common)
    runner = fast.engine.executor.runner
    assert runner.fp8_weights
    layer = runner.model.layers[0]
    assert layer.attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.w13_EFD.dtype == torch.float8_e4m3fn and layer.mlp.experts.scales is not None
    assert layer.mlp.gate.weight.dtype == torch.float32 and runner.model.lm_head.weight.dtype == torch.float32
    assert layer.attn.o_proj.weight_scale.shape[0] == (64 // BLOCK if layout == "block" else 64)
    # chunked prefill (a 40-token budget: 80 expert copies take the blocked MoE kernels, the
    # projections linear_fp8), then decode batches of 4 down to 1 (the GEMVs)
    prompts = [[5, 9, 77, 1000, 3, 4, 4, 8, 12, 19, 400, 2, 2, 2, 7, 70, 700, 1], [42, 43], [7] * 9,
               list(range(100, 130))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1) for n in (6, 3, 9, 4)]
    from expertmesh.model import triton_linear
    from expertmesh.router import fused_moe

    calls = []
    for module, name in ((fused_moe, "gemm_gate_up"), (triton_linear, "linear_fp8"), (triton_linear, "linear_small")):
        inner = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=inner, **k: calls.append(_n) or _f(*a, **k))
    got = fast.generate(prompts, params)
    want = LLM(plain, kernels="torch", **common).generate(prompts, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for g_lp, w_lp in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            (token, value), = ((t, g_lp[t]) for t in w_lp if t in g_lp)
            assert value == pytest.approx(w_lp[token], abs=1e-4)
    assert {"gemm_gate_up", "linear_fp8", "linear_small"} <= set(calls)  # every FP8 kernel ran


def test_a_partly_quantized_checkpoint_loads_dequantized_on_the_kernel_path(fp8_models, tmp_path, caplog):
    """One o_proj left in float32 (as some checkpoints leave layers): the FP8 parameters cannot hold
    it, so the whole model loads dequantized and says why."""
    path = shutil.copytree(fp8_models["block"], tmp_path / "partial")
    name = "model.layers.1.self_attn.o_proj.weight"
    plain = load_file(fp8_models["block_plain"] / _shard_of(fp8_models["block_plain"], name))
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        if "model.layers.1.self_attn.o_proj.weight" in tensors:
            tensors["model.layers.1.self_attn.o_proj.weight"] = plain["model.layers.1.self_attn.o_proj.weight"]
            scale = tensors.pop("model.layers.1.self_attn.o_proj.weight_scale_inv", None)
            save_file(tensors, str(file))
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    if data["weight_map"].pop("model.layers.1.self_attn.o_proj.weight_scale_inv", None) and scale is None:
        for file in path.glob("*.safetensors"):  # the scale sat in the other shard
            tensors = load_file(file)
            if tensors.pop("model.layers.1.self_attn.o_proj.weight_scale_inv", None) is not None:
                save_file(tensors, str(file))
    index.write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="expertmesh.engine.model_runner"):
        runner = ModelRunner(ModelLoadConfig(str(path), dtype="float32", device="cpu", kernels="triton"),
                             CacheConfig(block_size=4, num_blocks=64), progress=False)
    assert not runner.fp8_weights and "leaves some of the linear layers unquantized" in caplog.text
    assert runner.model.layers[0].attn.qkv_proj.weight.dtype == torch.float32



def _shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.gpu
def test_gpu_fp8_engine_replays_graphs_and_follows_the_dequantized_model(fp8_models):
    """On the GPU (bf16): the FP8 checkpoint keeps FP8 weights, CUDA graphs give the eager FP8
    path's tokens, and the first tokens match the dequantized checkpoint's bf16 run."""
    common = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, num_kv_blocks=512, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    graphs = LLM(fp8_models["block"], **common)
    assert graphs.engine.executor.runner.fp8_weights and graphs.engine.executor.runner.graphs.graphs
    eager = LLM(fp8_models["block"], enforce_eager=True, **common)
    plain = LLM(fp8_models["block_plain"], **common)
    tokens = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] for llm in (graphs, eager, plain)]
    assert tokens[0] == tokens[1]
    assert all(a[:4] == b[:4] for a, b in zip(tokens[0], tokens[2]))  # bf16 near-ties may flip later


@pytest.mark.slow
def test_expert_parallel_ranks_keep_fp8_experts_on_the_kernel_path(fp8_models):
    """Two Ray ranks over gloo on the kernel path (Triton's interpreter): each keeps its own
    experts in FP8 with their scales, the all-to-all carries bf16-shaped rows to the FP8 expert
    kernels (grouped_experts with scales), and the tokens are the dequantized model's on one rank."""
    ray = pytest.importorskip("ray")
    from expertmesh.cluster.bootstrap import NCCL_ENV

    prompts = ["The capital of France is", "a", "混合专家模型"]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(fp8_models["block_plain"], device="cpu", progress=False)
            .generate(prompts, params)]
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": dict(NCCL_ENV)}, configure_logging=False,
             log_to_driver=False)
    try:
        llm = LLM(fp8_models["block"], device="cpu", kernels="triton", ep_size=2, progress=False)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            kept = llm.engine.executor.fp8_weights
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()
    assert kept == [True, True]
    assert got == want
