"""The engine's streaming path on exact token streams (scripted executor, real tokenizer)."""
from __future__ import annotations

import pytest

from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scripted import ScriptedExecutor
from expertmesh.model.config import ModelConfig
from expertmesh.model.tokenizer import Tokenizer

REPLIES = {
    "chinese": "混合专家模型只激活少数专家，所以推理很快。",
    "arabic": "نموذج خليط الخبراء يوجّه كل كلمة إلى عدد قليل من الخبراء.",
    "hindi": "विशेषज्ञों का मिश्रण हर शब्द को कुछ ही विशेषज्ञों तक भेजता है।",
    "emoji": "Ready 🚀🔥 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 done ✅",
    "mixed": "Qwen3 says 你好, مرحبا, नमस्ते and 👋 in one breath.",
}


def make_engine(path, script, block_size=4, num_blocks=64, **sched):
    tokenizer = Tokenizer.from_pretrained(path)
    config = EngineConfig(load=ModelLoadConfig(str(path), device="cpu"),
                          cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(**sched))
    eos = tokenizer.eos_token_ids[0]
    executor = ScriptedExecutor(ModelConfig.from_pretrained(path), num_blocks, script, fallback_token=eos)
    return EngineCore(config, executor, tokenizer), tokenizer


def stream(engine, request_id):
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                deltas.append(out.outputs[0].text_delta)
                final = out
    return deltas, final


@pytest.mark.parametrize("language", list(REPLIES))
def test_streamed_multilingual_text_never_holds_a_broken_character(qwen3_moe_path, language):
    text = REPLIES[language]
    engine, tok = make_engine(qwen3_moe_path, lambda prompt: tok_ids)
    tok_ids = tok.encode(text) + [tok.eos_token_ids[0]]
    assert len(tok_ids) > len(text) // 2  # many characters span several byte tokens
    engine.add_request("r", tok.encode("Say something:"), SamplingParams(max_tokens=200))
    deltas, final = stream(engine, "r")
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == final.outputs[0].text
    assert final.outputs[0].finish_reason == "stop"
    assert sum(1 for d in deltas if d == "") > 0 or language == "mixed"  # bytes were held back at times


def test_stop_string_across_deltas_is_cut_and_never_streamed(qwen3_moe_path):
    engine, tok = make_engine(qwen3_moe_path, lambda prompt: tok.encode("The answer is 42. END of story"))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=100, stop=["END"]))
    deltas, final = stream(engine, "r")
    assert "".join(deltas) == final.outputs[0].text == "The answer is 42. "
    assert final.outputs[0].stop_reason == "END"


def test_stop_token_ids_and_max_tokens(qwen3_moe_path):
    engine, tok = make_engine(qwen3_moe_path, lambda prompt: [10, 11, 12, 13, 14, 15])
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=100, stop_token_ids=[13]))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=4))
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    a, b = outputs["a"][-1].outputs[0], outputs["b"][-1].outputs[0]
    assert a.token_ids == [10, 11, 12, 13] and a.finish_reason == "stop" and a.stop_reason == 13
    assert a.text == tok.decode([10, 11, 12])  # the stop token's own text is left out
    assert b.token_ids == [10, 11, 12, 13] and b.finish_reason == "length"
    assert engine.block_manager.usage == 0.0


def test_n_completions_share_the_prompt(qwen3_moe_path):
    engine, _tok = make_engine(qwen3_moe_path, lambda prompt: [20, 21, 22])
    engine.add_request("r", list(range(1, 30)), SamplingParams(n=3, max_tokens=3))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                finals[c.index] = c
    assert sorted(finals) == [0, 1, 2]
    assert all(c.token_ids == [20, 21, 22] for c in finals.values())
    assert engine.block_manager.usage == 0.0


def test_abort_frees_blocks_at_once(qwen3_moe_path):
    engine, _tok = make_engine(qwen3_moe_path, lambda prompt: list(range(30, 90)))
    engine.add_request("keep", [1, 2, 3], SamplingParams(max_tokens=20))
    engine.add_request("drop", list(range(1, 40)), SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.usage > 0
    engine.abort("drop")
    used_by_keep = len(engine.scheduler.get("keep").block_ids)
    assert engine.block_manager.usage == pytest.approx(used_by_keep / 64)
    _, final = stream(engine, "keep")
    assert len(final.outputs[0].token_ids) == 20
    assert engine.block_manager.usage == 0.0


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(qwen3_moe_path):
    calls = {"n": 0}

    def script(prompt):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return [40, 41]

    engine, _tok = make_engine(qwen3_moe_path, script)
    engine.add_request("bad", [1, 2], SamplingParams(max_tokens=5))
    _, final = stream(engine, "bad")
    assert final.outputs[0].finish_reason == "error" and "boom" in final.outputs[0].error
    engine.add_request("good", [1, 2], SamplingParams(max_tokens=2))
    _, final = stream(engine, "good")
    assert final.outputs[0].token_ids == [40, 41]
    assert engine.block_manager.usage == 0.0


def test_request_ids_that_collide_with_children_are_rejected_without_a_trace(qwen3_moe_path):
    engine, _ = make_engine(qwen3_moe_path, lambda prompt: [50, 51, 52])
    engine.add_request("x#1", [1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="request id 'x#1' is already in use"):
        engine.add_request("x", [1, 2], SamplingParams(n=2, max_tokens=3))
    with pytest.raises(ValueError, match="request id 'x#1' is already in use"):
        engine.add_request("x#1", [1, 2], SamplingParams(max_tokens=3))
    _, final = stream(engine, "x#1")
    assert final.outputs[0].token_ids == [50, 51, 52] and final.outputs[0].finish_reason == "length"
    assert not engine.has_unfinished() and engine.block_manager.usage == 0.0


def test_seed_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="seed must be an integer in"):
        SamplingParams(seed=2**70)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        SamplingParams(seed=-1)


def test_stop_strings_wait_for_min_tokens(qwen3_moe_path):
    engine, tok = make_engine(qwen3_moe_path, lambda prompt: tok.encode("a. b. c. d. e. f."))
    n_first = len(tok.encode("a. b."))
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=100, stop=["."], min_tokens=n_first + 1))
    deltas, final = stream(engine, "r")
    # Periods among the first min_tokens tokens do not stop ("a. b." is 4 tokens); the next one does.
    assert final.outputs[0].stop_reason == "."
    assert final.outputs[0].text == "a. b. c"
    assert "".join(deltas) == final.outputs[0].text


def test_requests_announced_with_a_failed_step_are_announced_again(qwen3_moe_path):
    def script(prompt):
        if prompt == [9, 9]:
            raise RuntimeError("bad request")
        return [60, 61]

    engine, _ = make_engine(qwen3_moe_path, script, max_num_seqs=1)
    engine.add_request("bad", [9, 9], SamplingParams(max_tokens=5))
    engine.add_request("good", [1, 2], SamplingParams(max_tokens=2))  # waits: one sequence at a time
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0]
    assert outputs["bad"].finish_reason == "error" and "bad request" in outputs["bad"].error
    assert outputs["good"].token_ids == [60, 61] and outputs["good"].finish_reason == "length"


def test_streamed_outputs_are_deltas_and_the_last_carries_the_totals(qwen3_moe_path):
    """Shipping totals every step would cost O(length) per request per step: only the last has them."""
    engine, tok = make_engine(qwen3_moe_path, lambda prompt: tok.encode("one two three four five six"))
    prompt = tok.encode("Count:")
    engine.add_request("r", prompt, SamplingParams(max_tokens=100), stream=True)
    outs = []
    while engine.has_unfinished():
        outs.extend(o for o in engine.step() if o.request_id == "r")
    *early, last = outs
    assert early and all(o.prompt_token_ids == [] and o.outputs[0].token_ids == [] and o.outputs[0].text == ""
                         and o.outputs[0].logprobs is None for o in early)
    final = last.outputs[0]
    assert last.finished and last.prompt_token_ids == prompt
    assert final.token_ids == [t for o in outs for t in o.outputs[0].token_ids_delta]
    assert final.text == "".join(o.outputs[0].text_delta for o in outs) == "one two three four five six"
