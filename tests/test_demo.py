"""The trained demo model (demo/): corpus, tokenizer, training, the shipped checkpoint as the
embedded default, served answers, and the experts report."""
from __future__ import annotations

import json

import pytest
import torch

from expertmesh.demo import corpus
from expertmesh.demo.corpus import FAMILIES, examples, make_example, render
from expertmesh.demo.tokenizer import TOKENIZER_DIR
from expertmesh.model.default import SHIPPED_MODEL_DIR, default_model_path
from expertmesh.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(TOKENIZER_DIR)


def test_corpus_is_deterministic_and_covers_every_family(tokenizer):
    first = [render(tokenizer, ex) for ex in examples(300, seed=3)]
    again = [render(tokenizer, ex) for ex in examples(300, seed=3)]
    assert first == again
    assert first != [render(tokenizer, ex) for ex in examples(300, seed=4)]
    assert {ex.family for ex in examples(300, seed=3)} == set(FAMILIES)
    for prompt, completion in first:
        assert prompt.endswith("<|im_start|>assistant\n") or prompt.endswith("<think>\n\n</think>\n\n")
        assert completion.endswith("<|im_end|>") and completion.count("<|im_end|>") == 1


def test_training_adds_the_copy_drill_and_made_up_names_the_evaluation_never_asks():
    from expertmesh.demo.words import CITIES, NAMES

    rng = __import__("random").Random(11)
    drills = [make_example(rng, "copy") for _ in range(200)]
    assert "copy" not in FAMILIES and "copy" in corpus.TRAINING_FAMILIES
    for ex in drills:  # the answer is always in the question, word for word
        assert ex.target["content"] and ex.target["content"] in ex.messages[-1]["content"]
    assert {ex.family for ex in examples(400, seed=3, families=corpus.TRAINING_FAMILIES)} == \
        set(corpus.TRAINING_FAMILIES)
    made_up = [corpus.synthetic_name(rng) for _ in range(2000)]
    real = set(CITIES) | set(NAMES)
    assert not real & set(made_up)  # a splice never lands on a real (perhaps held-out) name
    assert len(set(made_up)) > 1800 and all(w[0].isupper() for w in made_up)
    assert not any(corpus.held_out(n) for n in made_up if n in real)


def test_held_out_split_shares_no_city_name_or_sum_with_training():
    from expertmesh.demo.words import CITIES, NAMES

    for items in (CITIES, NAMES):
        train, test = set(corpus._split_list(items, "train")), set(corpus._split_list(items, "test"))
        assert train and test and not train & test
    rng = __import__("random").Random(0)
    train_sums = {ex.messages[-1]["content"] for ex in (make_example(rng, "arith_think") for _ in range(300))}
    test = [make_example(rng, "arith_think", "test") for _ in range(100)]
    assert all(corpus.held_out(ex.expect["working"].split("\n")[0].replace(" ", "").replace("×", "*"), 10)
               for ex in test)
    assert not train_sums & {ex.messages[-1]["content"] for ex in test}


def test_the_issues_forms_are_training_phrasings():
    assert corpus.ADD[0] == "What is {a} + {b}?" and corpus.WEATHER[0] == "What's the weather in {city}?"
    assert corpus.EXTRACT[0].startswith("Extract the person's name, age and city as JSON:")
    assert corpus.TRANSLATE[0] == "Translate '{p}' to {L}."
    assert corpus.PY_REQUESTS[0].format(what="returns the factorial of n") == \
        "Write a Python function that returns the factorial of n."
    rng = __import__("random").Random(0)
    # (no prefix, first body) is never held out
    assert all(corpus._phrasing(rng, "test", "weather", corpus.WEATHER) != corpus.WEATHER[0] for _ in range(200))


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tokenizer):
    prompt, completion = render(tokenizer, make_example(__import__("random").Random(5), "tool_answer"))
    text = prompt + completion
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tokenizer.encode(token) == [tokenizer.token_to_id(token)]
    assert [tokenizer.decode([i]) for i in tokenizer.encode("384")] == ["3", "8", "4"]
    assert 2000 <= tokenizer.vocab_size <= 8192
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert hf.encode(text, add_special_tokens=False) == ids
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages)


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    from expertmesh.demo.train import train

    shape = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    result = train(tmp_path / "ck", steps=12, batch_tokens=1536, lr=1e-2, shape=shape, log_every=1, progress=False)
    losses = result["losses"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"


def test_training_continues_from_a_checkpoint_on_a_chosen_family_mix(tmp_path):
    """`--init`: the second run starts from the first run's weights (its first loss is the first
    run's last, not a fresh model's), and `--mix` reaches the stream."""
    from expertmesh.demo.train import train

    shape = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16}
    mix = {f: 0.0 for f in FAMILIES} | {"arith_direct": 1.0}
    first = train(tmp_path / "a", steps=10, batch_tokens=1024, lr=1e-2, shape=shape, log_every=1,
                  progress=False, mix=mix)
    fresh = train(tmp_path / "b", steps=1, batch_tokens=1024, lr=0.0, shape=shape, log_every=1,
                  progress=False, mix=mix)
    again = train(tmp_path / "c", steps=1, batch_tokens=1024, lr=0.0, log_every=1, progress=False,
                  init=tmp_path / "a", mix=mix)
    assert again["losses"][0] < fresh["losses"][0] - 0.5
    assert abs(again["losses"][0] - first["losses"][-1]) < 0.5
    assert all(ex.family == "arith_direct" for ex in examples(50, mix=mix))


@pytest.mark.parametrize("text", ["tool_call", "nope=3", "tool_call=-1", "tool_call=nan", "tool_call=inf",
                                  "tool_call=x", ",".join(f"{f}=0" for f in corpus.TRAINING_FAMILIES)])
def test_a_bad_family_mix_is_refused(text):
    with pytest.raises(ValueError):
        corpus.parse_mix(text)


def test_train_command_refuses_a_bad_mix_or_a_missing_init(tmp_path, capsys):
    from expertmesh.demo.train import main

    for argv in (["--mix", "json=-2"], ["--init", str(tmp_path / "none")]):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(tmp_path / "out"), *argv])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mix" in err and "--init" in err


def test_training_forward_matches_transformers_on_the_shipped_checkpoint():
    from transformers import AutoModelForCausalLM

    from expertmesh.model.config import ModelConfig
    from expertmesh.model.decoder import CausalLM
    from expertmesh.model.loader import load_weights
    from expertmesh.model.training import load_balancing_loss, training_forward

    config = ModelConfig.from_pretrained(SHIPPED_MODEL_DIR)
    ours = CausalLM(config, kernels="torch")
    load_weights(ours, SHIPPED_MODEL_DIR, config)
    hf = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, router = training_forward(ours, ids)
        want = hf(ids, output_router_logits=True)
    torch.testing.assert_close(ours.compute_logits(hidden), want.logits, atol=2e-4, rtol=1e-4)
    assert len(router) == config.num_layers
    torch.testing.assert_close(router[0], want.router_logits[0], atol=1e-4, rtol=1e-4)
    aux = load_balancing_loss(router, config.top_k)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.testing.assert_close(aux, load_balancing_loss_func(want.router_logits, config.num_experts, config.top_k))


def test_shipped_checkpoint_is_the_default_and_its_greedy_tokens_equal_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from expertmesh import LLM, SamplingParams

    size = sum(p.stat().st_size for p in SHIPPED_MODEL_DIR.iterdir())
    assert size <= 25_000_000
    config = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    path = default_model_path(tmp_path / "default")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in SHIPPED_MODEL_DIR.iterdir())

    llm = LLM(path, dtype="float32", device="cpu", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["What is 384 + 219?", "Translate 'thank you' to Spanish."]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        want = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        assert list(out.outputs[0].token_ids) == want.tolist()
    llm.shutdown()


@pytest.fixture(scope="module")
def served():
    from expertmesh.demo.evaluate import served

    with served() as s:  # no model: the embedded default
        yield s


def _chat(served, **kwargs):
    return served.run(served.client.chat.completions.create(model="demo", temperature=0, max_tokens=200, **kwargs))


def test_served_default_model_adds_a_held_out_sum_and_shows_its_working(served):
    # 396 + 471 is in the held-out split: the training stream never holds it
    assert corpus.held_out("396+471", 10)
    message = _chat(served, messages=[{"role": "user", "content": "What is 396 + 471?"}]).choices[0].message
    assert message.content == "867"
    assert "ones: 6 + 1 = 7" in message.reasoning_content and "867" in message.reasoning_content


def test_served_default_model_calls_get_weather_with_the_city_of_the_question(served):
    assert corpus.held_out("Hamburg")  # a city the training split never names
    tools = [corpus.TOOLS["convert_currency"], corpus.TOOLS["get_weather"]]
    response = _chat(served, messages=[{"role": "user", "content": "What's the weather in Hamburg?"}], tools=tools,
                     tool_choice="auto")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Hamburg"}


def test_experts_report_writes_heatmaps_and_a_table(tmp_path):
    from expertmesh.gateway.cli import main

    assert main(["experts-report", "--out", str(tmp_path), "--per-family", "1"]) == 0
    layers = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    pngs = sorted(p.name for p in tmp_path.glob("experts_layer*.png"))
    assert pngs == [f"experts_layer{i}.png" for i in range(layers)]
    assert (tmp_path / "experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "experts.md").read_text()
    assert "| tool call |" in table and "## Layer 0" in table
    counts = json.loads((tmp_path / "experts.json").read_text())["tokens_per_layer_expert"]
    assert set(counts) == set(FAMILIES) and all(sum(map(sum, c)) > 0 for c in counts.values())
