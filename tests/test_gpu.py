"""CUDA: the same engine on the GPU agrees with transformers and with itself across expert paths."""
from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["The capital of France is", "def add(a, b):", "混合专家模型", "Once upon a time there was"]


def _hf(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


def _hf_greedy(model, tok, prompt, n=32):
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=n, pad_token_id=0,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
    return out[0, len(ids):].tolist()


def test_float32_greedy_on_cuda_equals_transformers(qwen3_moe_path):
    llm = LLM(qwen3_moe_path, device="cuda", dtype="float32", num_kv_blocks=512, progress=False)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32,
                                                                                  ignore_eos=True))]
    hf = _hf(qwen3_moe_path, torch.float32)
    assert ours == [_hf_greedy(hf, llm.get_tokenizer(), p) for p in PROMPTS]


@pytest.mark.parametrize("impl", ["grouped", "batched"])
def test_bfloat16_fused_moe_path_matches_the_torch_expert_paths(qwen3_moe_path, impl):
    """The default on CUDA is the fused Triton MoE; grouped_mm and the batched bmm path compute the
    same function: logprobs of the same tokens agree to bf16 rounding."""
    fused = LLM(qwen3_moe_path, device="cuda", dtype="bfloat16", num_kv_blocks=512, progress=False)
    other = LLM(qwen3_moe_path, device="cuda", dtype="bfloat16", expert_impl=impl, num_kv_blocks=512, progress=False)
    assert fused.engine.executor.runner.model.layers[0].mlp.fused
    assert not other.engine.executor.runner.model.layers[0].mlp.fused
    assert other.engine.executor.runner.model.layers[0].mlp.experts.impl == impl
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    a = fused.generate(PROMPTS, params)
    b = other.generate(PROMPTS, params)
    for x, y in zip(a, b):
        # Same math in a different kernel: logprobs of the same tokens agree to bf16 rounding.
        n = next((i for i, (s, t) in enumerate(zip(x.outputs[0].token_ids, y.outputs[0].token_ids)) if s != t), 16)
        assert n >= 4
        for i in range(n):
            tok = x.outputs[0].token_ids[i]
            assert x.outputs[0].logprobs[i][tok] == pytest.approx(y.outputs[0].logprobs[i][tok], abs=0.05)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_bfloat16_logits_close_to_transformers_bf16(qwen3_moe_path, kernels):
    """Every position's logits of an 80-token prompt, on the plain-torch path and on the kernel
    path (fused ops, paged-attention kernel over a non-contiguous block table, fused MoE)."""
    import numpy as np

    from expertmesh.engine.config import CacheConfig, ModelLoadConfig
    from expertmesh.engine.model_runner import ModelRunner
    from expertmesh.engine.step_inputs import host_step
    from expertmesh.model.attention import AttentionMetadata

    runner = ModelRunner(ModelLoadConfig(str(qwen3_moe_path), device="cuda", dtype="bfloat16", kernels=kernels),
                         CacheConfig(block_size=16, num_blocks=64), progress=False)
    ids = list(range(10, 90))
    table = [9, 2, 31, 4, 17]
    with torch.inference_mode():
        if kernels == "torch":
            meta = AttentionMetadata.build(query_lens=[len(ids)], starts=[0], block_tables=[table],
                                           block_size=16, device=torch.device("cuda"))
            hidden = runner.model(torch.tensor(ids, device="cuda"), meta, runner.kv_caches)
        else:
            step = host_step(np.array([0]), np.array([len(ids)]), [ids], [np.array(table)], np.array([True]), 16)
            runner.inputs.upload(step)
            runner.planner.plan(step.query_start_B1, step.seq_lens_B)
            hidden = runner.model(runner.inputs.field("input_ids", len(ids)), runner._kernel_meta(len(ids), 1),
                                  runner.kv_caches)
        ours = runner.model.compute_logits(hidden)
        ref = _hf(qwen3_moe_path, torch.bfloat16)(torch.tensor([ids], device="cuda")).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=0.03, rtol=0.05)


def _same_tokens_and_logprobs(got, expected):
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    for a, b in zip(got, expected):
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token in x:
                assert x[token] == pytest.approx(y[token], abs=1e-3)


@pytest.fixture(scope="module")
def one_gpu_outputs(qwen3_moe_path):
    """EP=1 on one GPU: the short prompts, and two ~600-token prompts for sequence parallelism."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    pytest.importorskip("ray")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    gen = torch.Generator().manual_seed(5)
    long = [torch.randint(10, 1000, (600 + 37 * i,), generator=gen).tolist() for i in range(2)]
    one = LLM(qwen3_moe_path, device="cuda", dtype="float32", num_kv_blocks=512, progress=False)
    try:
        yield {"params": params, "long": long, "short": one.generate(PROMPTS, params),
               "long_out": one.generate(long, params)}
    finally:
        one.shutdown()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_two_rank_workers_over_nccl_give_the_tokens_of_one_gpu(qwen3_moe_path, one_gpu_outputs, eager):
    """EP=2: two RankWorker actors on two GPUs, all-to-all over NCCL (decode through the
    fixed-capacity exchange, replayed from CUDA graphs or eager), data-parallel attention; and
    prompts over 512 tokens prefilled and decoded sequence-parallel over NCCL. Both equal one GPU."""
    expected = one_gpu_outputs
    two = LLM(qwen3_moe_path, device="cuda", dtype="float32", ep_size=2, num_kv_blocks=512, progress=False,
              enforce_eager=eager, sequence_parallel_min_tokens=512)
    try:
        _same_tokens_and_logprobs(two.generate(PROMPTS, expected["params"]), expected["short"])
        _same_tokens_and_logprobs(two.generate(expected["long"], expected["params"]), expected["long_out"])
    finally:
        two.shutdown()
