"""The LLM API end to end: logprobs against transformers, seeds, n, chat, dtypes."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertmesh import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen3_moe_path):
    return LLM(qwen3_moe_path, device="cpu", progress=False)


def test_logprobs_match_transformers_scores(llm, qwen3_moe_path):
    ids = llm.get_tokenizer().encode("Experts are chosen per token")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1: -1]
    ref = torch.log_softmax(logits, dim=-1)
    assert len(out.logprobs) == 6
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = ref[step].topk(3)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for t, lp in entry.items():
            assert lp == pytest.approx(ref[step, t].item(), abs=1e-4)
        total += entry[token]
    assert out.cumulative_logprob == pytest.approx(total)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["A seeded prompt"], seeded)[0].outputs[0].token_ids
    batched = llm.generate(["noise one", "A seeded prompt", "noise two"], [other, seeded, other])
    assert batched[1].outputs[0].token_ids == alone
    different = llm.generate(["A seeded prompt"], SamplingParams(temperature=1.0, top_p=0.9, top_k=50,
                                                                  max_tokens=12, seed=99, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_n_completions(llm):
    out = llm.generate("Several answers:", SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5,
                                                          ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_chat_renders_the_template_with_tools(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4), tools=tools,
                   chat_template_kwargs={"enable_thinking": False})[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, tools=tools, enable_thinking=False)
    assert out.prompt == expected
    assert "<tools>" in expected and expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert out.prompt_token_ids == llm.get_tokenizer().encode(expected)


def test_per_prompt_params_must_match_the_prompts(llm):
    with pytest.raises(ValueError, match="got 2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
