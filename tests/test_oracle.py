"""Our model against transformers on the same checkpoint: logits in float32, greedy tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertmesh import LLM, SamplingParams
from expertmesh.engine.config import CacheConfig, ModelLoadConfig
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.model.attention import AttentionMetadata

HF_CLASSES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe_yarn": "Qwen3MoeForCausalLM",
}
BLOCK = 4


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def runner_for(path, num_blocks=256):
    return ModelRunner(ModelLoadConfig(str(path), dtype="float32", device="cpu"),
                       CacheConfig(block_size=BLOCK, num_blocks=num_blocks), progress=False)


@torch.inference_mode()
def our_logits(runner, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """All positions' logits of each prompt, computed together in steps of `chunk` tokens per
    prompt through the paged KV cache (so later chunks read earlier chunks' keys)."""
    tables, next_block = [], 1
    for p in prompts:
        n = -(-len(p) // BLOCK)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    results = [[] for _ in prompts]
    start = 0
    while start < max(len(p) for p in prompts):
        live = [i for i, p in enumerate(prompts) if start < len(p)]
        pieces = [prompts[i][start:start + chunk] for i in live]
        meta = AttentionMetadata.build(query_lens=[len(x) for x in pieces], starts=[start] * len(live),
                                       block_tables=[tables[i] for i in live], block_size=BLOCK,
                                       device=torch.device("cpu"))
        ids = torch.tensor([t for piece in pieces for t in piece])
        logits = runner.model.compute_logits(runner.model(ids, meta, runner.kv_caches))
        offsets = meta.query_start_B1.tolist()
        for j, i in enumerate(live):
            results[i].append(logits[offsets[j]:offsets[j + 1]])
        start += chunk
    return [torch.cat(r) for r in results]


@pytest.mark.parametrize("name", list(HF_CLASSES))
def test_logits_match_transformers(tiny_models, name):
    path = tiny_models[name]
    hf = hf_model(path)
    assert type(hf).__name__ == HF_CLASSES[name]
    runner = runner_for(path)
    gen = torch.Generator().manual_seed(1)
    vocab = runner.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 7, 33, 150)]
    with torch.no_grad():
        expected = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for chunk in (1000, 16, 5):  # whole prompts at once, and through the KV cache in chunks
        for p, ours, ref in zip(prompts, our_logits(runner, prompts, chunk), expected):
            assert ours.shape == ref.shape
            assert ref.abs().max() > 0.05, "logits too small for the comparison to mean anything"
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=f"{name}, len {len(p)}, chunk {chunk}")


def test_yarn_logits_match_transformers_four_windows_out(tiny_models):
    """YaRN (factor 4 on an original window of 128, as Qwen3's model card scales 32,768) at
    positions up to four times the original window: the interpolated low frequencies and the
    attention factor matter there, not near position 0. Whole prompt and chunked through the
    cache; the last window's logits are compared on their own too, so a mismatch far out cannot
    hide among the first positions."""
    path = tiny_models["qwen3_moe_yarn"]
    hf = hf_model(path)
    original = hf.config.rope_parameters["original_max_position_embeddings"]
    length = 4 * original
    assert hf.config.max_position_embeddings >= length
    runner = runner_for(path, num_blocks=2 * length // BLOCK + 8)
    prompt = torch.randint(0, runner.model_config.vocab_size, (length,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = hf(prompt[None]).logits[0]
    for chunk in (length, 96):
        (ours,) = our_logits(runner, [prompt.tolist()], chunk)
        far = slice(3 * original, length)
        assert expected[far].abs().max() > 0.05
        torch.testing.assert_close(ours[far], expected[far], atol=1e-4, rtol=0, msg=f"chunk {chunk}, past 3 windows")
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0, msg=f"chunk {chunk}")


GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "混合专家模型把每个词元送到少数几个专家那里。它们",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books "
    "about the sea, the stars and the long roads between the mountains, and every night she",
]


@pytest.fixture(scope="module")
def greedy_reference(qwen3_moe_path):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False)
    tok = llm.get_tokenizer()
    hf = hf_model(qwen3_moe_path)
    # Generate exactly 32 tokens, EOS included as an ordinary token (our ignore_eos): no EOS
    # id for transformers to stop at, and no min_new_tokens, which would mask EOS instead.
    hf.generation_config.eos_token_id = None
    refs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, pad_token_id=0)
        refs.append(out[0, len(ids):].tolist())
    return refs


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_batched_and_one_by_one(qwen3_moe_path, greedy_reference):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False)
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == greedy_reference
    assert [_tokens(llm.generate([p], GREEDY))[0] for p in PROMPTS] == greedy_reference


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_greedy_chunked_prefill(qwen3_moe_path, greedy_reference, chunk):
    llm = LLM(qwen3_moe_path, device="cpu", max_num_batched_tokens=chunk, progress=False)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert _tokens(outputs) == greedy_reference
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_with_and_without_prefix_caching(qwen3_moe_path, greedy_reference, prefix_caching):
    llm = LLM(qwen3_moe_path, device="cpu", block_size=4, enable_prefix_caching=prefix_caching, progress=False)
    first = llm.generate(PROMPTS, GREEDY)
    hits_before = llm.engine.block_manager.prefix_cache_hits
    again = llm.generate(PROMPTS, GREEDY)  # same prompts: every full prompt block is cached now
    assert _tokens(first) == greedy_reference
    assert _tokens(again) == greedy_reference
    hits = llm.engine.block_manager.prefix_cache_hits - hits_before
    if prefix_caching:
        assert hits > 0 and all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 4)
    else:
        assert hits == 0 and all(o.num_cached_tokens == 0 for o in again)


def test_preemption_gives_the_same_tokens_and_frees_every_block(qwen3_moe_path, greedy_reference):
    # 4 prompts of up to ~45 tokens plus 32 outputs need ~20 blocks of 4 each at the end;
    # 30 blocks cannot hold all four at once, so the scheduler must preempt and recompute.
    llm = LLM(qwen3_moe_path, device="cpu", block_size=4, num_kv_blocks=30, progress=False)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert _tokens(outputs) == greedy_reference
    engine = llm.engine
    assert engine.stats()["num_preemptions"] > 0
    assert engine.block_manager.num_free_blocks == 30
    assert engine.block_manager.usage == 0.0
    engine.block_manager.check_invariants()


def test_bfloat16_on_cpu_runs_close_to_float32(qwen3_moe_path):
    fp32 = runner_for(qwen3_moe_path)
    bf16 = ModelRunner(ModelLoadConfig(str(qwen3_moe_path), dtype="bfloat16", device="cpu"),
                       CacheConfig(block_size=BLOCK, num_blocks=64), progress=False)
    prompt = [[5, 17, 300, 42, 8, 99, 123, 7, 64]]
    ref = our_logits(fp32, prompt, 100)[0]
    ours = our_logits(bf16, prompt, 100)[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.05)


def test_uniform_prefill_fast_path_equals_the_padded_path():
    """Chunks of one length with no cached keys attend through SDPA's causal mask, no padding:
    the same result as the general padded, explicitly masked path."""
    import dataclasses

    from expertmesh.model.attention import AttentionMetadata, paged_attention

    torch.manual_seed(0)
    B, Q, H, G, d, S = 3, 5, 4, 2, 8, 4
    kv = torch.zeros(2, 16, S, G, d)
    meta = AttentionMetadata.build(query_lens=[Q] * B, starts=[0] * B, block_size=S, device=torch.device("cpu"),
                                   block_tables=[[1, 2], [3, 4], [5, 6]])
    (group,) = meta.groups
    assert group.uniform_causal
    q, k, v = torch.randn(B * Q, H, d), torch.randn(B * Q, G, d), torch.randn(B * Q, G, d)
    fast = paged_attention(q, k, v, kv, meta, d ** -0.5)
    general = dataclasses.replace(meta, groups=(dataclasses.replace(group, uniform_causal=False),))
    torch.testing.assert_close(fast, paged_attention(q, k, v, kv, general, d ** -0.5), atol=1e-6, rtol=1e-5)
    mixed = AttentionMetadata.build(query_lens=[Q, Q - 1], starts=[0, 0], block_size=S, device=torch.device("cpu"),
                                    block_tables=[[1, 2], [3, 4]])
    assert not mixed.groups[0].uniform_causal
