"""Expert parallelism on real Ray (CPU, gloo): RankWorker actors, one step message per step."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertmesh import LLM, SamplingParams
from expertmesh.engine.sampling_params import SamplingParams as SP

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "混合专家模型把每个词元送到少数几个专家那里。", "a"]
MAX_TOKENS = [24, 9, 17, 3]  # requests end at different steps, so ranks go idle at different times


@pytest.fixture(scope="module")
def expected(qwen3_moe_path):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False)
    tok = llm.get_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    refs = []
    for prompt, n in zip(PROMPTS, MAX_TOKENS):
        ids = tok.encode(prompt)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=0)
        refs.append(out[0, len(ids):].tolist())
    ours = llm.generate(PROMPTS, _params())
    assert [o.outputs[0].token_ids for o in ours] == refs  # EP=1 agrees with transformers
    return refs, [o.outputs[0].logprobs for o in ours]


def _params():
    return [SP(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in MAX_TOKENS]


@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_greedy_tokens_and_logprobs_equal_ep1_and_transformers(ray_session, qwen3_moe_path, expected, ep_size):
    refs, ref_logprobs = expected
    llm = LLM(qwen3_moe_path, device="cpu", ep_size=ep_size, progress=False)
    try:
        executor = llm.engine.executor
        config = executor.model_config
        share = config.num_layers * 3 * config.hidden_size * config.moe_intermediate_size
        assert executor.expert_params == [share * len(e) for e in executor.placement.rank_experts]
        assert sum(executor.expert_params) == share * config.num_experts

        outputs = llm.generate(PROMPTS, _params())
        assert [o.outputs[0].token_ids for o in outputs] == refs
        for out, ref in zip(outputs, ref_logprobs):
            for got, want in zip(out.outputs[0].logprobs, ref):
                assert got.keys() == want.keys()
                for token, value in got.items():
                    assert value == pytest.approx(want[token], abs=1e-4)
        # With 4 prompts over 4 ranks each rank has one sequence; a batch of 3 leaves one rank idle.
        three = llm.generate(PROMPTS[:3], _params()[:3])
        assert [o.outputs[0].token_ids for o in three] == refs[:3]
        assert llm.engine.stats()["kv_usage"] == 0.0
        load = llm.engine.expert_load()
        assert load.shape == (len(config.moe_layers), config.num_experts) and load.sum() > 0
        assert executor.num_steps > 0 and executor.control_seconds >= 0
    finally:
        llm.shutdown()


def _kill_a_rank_mid_request(ray_session, llm, prompt_ids, max_tokens):
    """Start a greedy request, kill rank 1 of the group after 3 steps; the request's last output."""
    engine = llm.engine
    engine.add_request("doomed", prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    for _ in range(3):
        engine.step()
    old_workers = list(engine.executor.workers)
    ray_session.kill(old_workers[1], no_restart=True)
    killed_at = time.monotonic()
    final = None
    while final is None and time.monotonic() - killed_at < 60:
        final = next((o for o in engine.step() if o.finished), None)
    elapsed = time.monotonic() - killed_at
    assert final is not None and elapsed < 30, f"the request did not end within 30 s ({elapsed:.1f} s)"
    assert engine.executor.workers and engine.executor.workers[0] is not old_workers[0]  # a fresh group
    return final


def test_a_killed_ranks_requests_resume_on_a_new_group_with_the_same_tokens(ray_session, qwen3_moe_path, expected):
    refs, _ = expected
    llm = LLM(qwen3_moe_path, device="cpu", ep_size=2, progress=False)
    try:
        final = _kill_a_rank_mid_request(ray_session, llm, llm.get_tokenizer().encode(PROMPTS[0]), MAX_TOKENS[0])
        assert final.outputs[0].finish_reason == "length", final.outputs[0].error
        assert final.outputs[0].token_ids == refs[0]  # greedy: exactly the undisturbed tokens
        assert llm.engine.stats()["num_resumptions"] == 1
        again = llm.generate(PROMPTS, _params())  # and the fresh group serves the next requests
        assert [o.outputs[0].token_ids for o in again] == refs
    finally:
        llm.shutdown()


def test_with_no_resumptions_a_killed_ranks_requests_fail_fast(ray_session, qwen3_moe_path, expected):
    refs, _ = expected
    llm = LLM(qwen3_moe_path, device="cpu", ep_size=2, progress=False, max_resumptions=0)
    try:
        final = _kill_a_rank_mid_request(ray_session, llm, llm.get_tokenizer().encode(PROMPTS[0]), 200)
        assert final.outputs[0].finish_reason == "error"
        assert "rank failed" in final.outputs[0].error and "max_resumptions" in final.outputs[0].error
        again = llm.generate(PROMPTS, _params())
        assert [o.outputs[0].token_ids for o in again] == refs
    finally:
        llm.shutdown()

