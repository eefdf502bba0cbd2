"""Constrained decoding (xgrammar) and thinking-aware generation, on the tiny random-weight model.

Random weights never write valid JSON, a matching regex or a Qwen3 tool call by themselves, so
every output that parses and validates here was made so by the token masks.
"""
from __future__ import annotations

import json
import pickle
import re

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr

from expertmesh import LLM, SamplingParams
from expertmesh.engine.grammar import Phase
from expertmesh.engine.model_runner import unpack_token_bitmask
from expertmesh.engine.parsers import split_reasoning_and_tools
from expertmesh.engine.sampling_params import GuidedDecodingParams, ToolCallConstraint
from expertmesh.model.default import tiny_model_path

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
            "required": ["id", "tags"]}},
        "required": ["user"]},
    "array_min_max_items": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                            "minItems": 2, "maxItems": 4},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "XL"]}},
              "required": ["color", "size"]},
    "numeric_ranges": {"type": "object", "properties": {"k": {"type": "integer", "minimum": 10, "maximum": 99},
                                                        "t": {"type": "integer", "minimum": -3, "maximum": 3}},
                       "required": ["k", "t"]},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                         {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}]},
    "refs_and_defs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"]},
    "string_lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 3}},
                       "required": ["code"]},
    "booleans_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
                          "required": ["ok", "nothing"]},
    "required_and_optional": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 5}, "b": {"type": "string", "maxLength": 3},
        "c": {"type": "boolean"}}, "required": ["a"]},
    "no_additional_properties": {"type": "object",
                                 "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 50}},
                                 "required": ["k"], "additionalProperties": False},
    "const_and_pattern": {"type": "object", "properties": {"v": {"const": "1.0"},
                                                           "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
                          "required": ["v", "id"]},
    "array_of_objects": {"type": "array", "items": {"type": "object", "properties": {
        "q": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["q"]}, "minItems": 1, "maxItems": 2},
}

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}
ADD = {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"]}}
NOW = {"type": "function", "function": {"name": "now"}}  # OpenAI's wrapped shape, no parameters: {}
TYPELESS = {"name": "echo", "parameters": {"properties": {"on": {"type": "boolean"}}, "required": ["on"]}}


@pytest.fixture(scope="module")
def llm():
    # the random tiny model: these tests sample grammars over arbitrary tokens, which a trained model avoids
    return LLM(tiny_model_path(), device="cpu", progress=False)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def _json(**kwargs) -> GuidedDecodingParams:
    return GuidedDecodingParams(**kwargs)


def _allowed(backend, guide) -> set[int]:
    bitmask = backend.allocate(1)
    guide.fill_mask(bitmask, 0)
    return set(np.flatnonzero(unpack_token_bitmask(bitmask, backend.vocab_size)[0].numpy()).tolist())


def _free_blocks_are_full(llm) -> bool:
    bm = llm.engine.block_manager
    return not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


# ---- JSON schemas ----------------------------------------------------------------------------------


def test_json_schemas_greedy_and_sampled(llm):
    names = list(SCHEMAS)
    params = [SamplingParams(temperature=0.0, max_tokens=300, guided_decoding=_json(json=SCHEMAS[n])) for n in names]
    params += [SamplingParams(temperature=1.0, seed=i, max_tokens=300, guided_decoding=_json(json=SCHEMAS[n]))
               for i, n in enumerate(names)]
    outs = llm.generate(["Describe the data:"] * len(params), params)
    for name, out in zip(names + names, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        value = json.loads(completion.text)
        jsonschema.validate(value, SCHEMAS[name])
    assert _free_blocks_are_full(llm)


def test_json_schema_as_text_and_json_object(llm):
    schema = SCHEMAS["enums"]
    out = llm.generate("x", SamplingParams(temperature=1.0, seed=7, max_tokens=200,
                                           guided_decoding=_json(json=json.dumps(schema))))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), schema)
    # Free-form strings of a random model run long: an output cut by max_tokens must be a JSON prefix.
    outs = [o.outputs[0] for o in llm.generate(["{"] * 6, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=100, guided_decoding=_json(json_object=True))
        for s in range(6)])]
    assert sum(c.finish_reason == "stop" for c in outs) >= 2
    for c in outs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            matcher = xgr.GrammarMatcher(llm.engine.grammar_backend.compile(_json(json_object=True)))
            assert c.text.startswith("{") and matcher.accept_string(c.text) and not matcher.is_completed()


# ---- regex, choice, EBNF -------------------------------------------------------------------------


def test_regex_choice_and_grammar(llm, tok):
    regex = r"(yes|no)-[a-f]{2,4}\d"
    choices = ["red", "green", "blue sky", "ünïcode ✓"]
    ebnf = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x" item'
    params = []
    for seed in range(3):
        params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=60, guided_decoding=_json(regex=regex)),
                   SamplingParams(temperature=1.0, seed=seed, max_tokens=60, guided_decoding=_json(choice=choices)),
                   SamplingParams(temperature=1.0, seed=seed, max_tokens=60, guided_decoding=_json(grammar=ebnf))]
    outs = [o.outputs[0] for o in llm.generate(["Answer:"] * len(params), params)]
    for i in range(0, len(outs), 3):
        assert all(o.finish_reason == "stop" for o in outs[i:i + 3])
        assert re.fullmatch(regex, outs[i].text), outs[i].text
        assert outs[i + 1].text in choices
        grammar = llm.engine.grammar_backend.compile(_json(grammar=ebnf))
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(outs[i + 2].text) and matcher.is_completed(), outs[i + 2].text
        assert re.fullmatch(r"\((x*\d)(,x*\d)*\)", outs[i + 2].text)


def test_greedy_choice_and_raw_logprobs(llm):
    """Logprobs stay those of the raw distribution: the unconstrained favourites are still listed."""
    free = llm.generate("Answer:", SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))[0].outputs[0]
    guided = llm.generate("Answer:", SamplingParams(temperature=0.0, max_tokens=20, logprobs=3,
                                                    guided_decoding=_json(choice=["A", "B"])))[0].outputs[0]
    assert guided.text in ("A", "B") and guided.finish_reason == "stop"
    top_free = dict(free.logprobs[0])
    for token, logprob in top_free.items():
        assert guided.logprobs[0][token] == pytest.approx(logprob, abs=1e-5)


# ---- tool calls ------------------------------------------------------------------------------------


def _check_calls(text: str, tools: dict[str, dict], only: str | None = None) -> list:
    _, content, calls = split_reasoning_and_tools(text, tool_names=set(tools))
    assert calls and content == "", text
    for call in calls:
        assert call.name in tools and (only is None or call.name == only)
        arguments = json.loads(call.arguments)
        assert isinstance(arguments, dict)
        jsonschema.validate(arguments, tools[call.name].get("parameters", {"type": "object"}))
    return calls


def test_tool_calls_required_and_named(llm, tok):
    schemas = {"get_weather": WEATHER, "add": ADD, "now": NOW["function"], "echo": TYPELESS}
    required = ToolCallConstraint(tools=[WEATHER, ADD, NOW])
    named = ToolCallConstraint(tools=[WEATHER, ADD, NOW], mode="named", name="add")
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, guided_decoding=_json(tool_calls=c))
              for c in (required, named) for s in range(4)]
    params.append(SamplingParams(temperature=0.0, max_tokens=200, guided_decoding=_json(tool_calls=named)))
    for name in ("now", "echo"):  # no parameters: `{}`; a schema without "type": still an object
        params.append(SamplingParams(temperature=1.0, seed=1, max_tokens=100, guided_decoding=_json(
            tool_calls=ToolCallConstraint(tools=[NOW, TYPELESS], mode="named", name=name))))
    outs = [o.outputs[0] for o in llm.generate(["Call a tool"] * len(params), params)]
    seen = set()
    for i, out in enumerate(outs):
        assert out.finish_reason == "stop", out.text
        assert out.token_ids[0] == tok.token_to_id("<tool_call>")  # the single added token, not "<" "tool"
        assert tok.token_to_id("</tool_call>") in out.token_ids
        calls = _check_calls(out.text, schemas, only=([None] * 4 + ["add"] * 5 + ["now", "echo"])[i])
        if i < 4:
            seen.update(c.name for c in calls)
    assert len(seen) >= 2  # required mode reaches more than one tool
    assert all(json.loads(c.arguments) == {} for c in _check_calls(outs[-2].text, schemas))
    assert all(isinstance(json.loads(c.arguments)["on"], bool) for c in _check_calls(outs[-1].text, schemas))


# ---- reasoning and thinking budget --------------------------------------------------------------


def test_thinking_budget_then_answer_under_grammar(llm, tok):
    """A prompt that opens <think> (Thinking-2507 style): exactly 8 thought tokens, forced </think>,
    then the answer matches the schema (EOS inside thinking does not stop it: ignore_eos)."""
    schema = SCHEMAS["numeric_ranges"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Pick numbers"}], enable_thinking=True)
    prompt += "<think>\n"
    think_close = tok.token_to_id("</think>")
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, reasoning=True, thinking_budget=8,
                             ignore_eos=True, guided_decoding=_json(json=schema)) for s in range(3)]
    for out in llm.generate([prompt] * 3, params):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop"
        assert completion.token_ids.index(think_close) == 8
        reasoning, content, _ = split_reasoning_and_tools(completion.text, starts_in_reasoning=True)
        assert reasoning and "</think>" not in reasoning
        jsonschema.validate(json.loads(content), schema)
        assert json.loads(completion.text.split("</think>", 1)[1]) is not None  # only whitespace before it


def test_thinking_budget_zero_and_no_grammar(llm, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}]) + "<think>\n"
    out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=5, reasoning=True,
                                              thinking_budget=0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids[0] == tok.token_to_id("</think>")
    out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=12, reasoning=True,
                                              thinking_budget=3, ignore_eos=True))[0].outputs[0]
    assert out.token_ids[3] == tok.token_to_id("</think>")


def test_thinking_disabled_constrains_from_the_first_token(llm, tok):
    schema = SCHEMAS["booleans_and_null"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "JSON please"}], enable_thinking=False)
    assert llm.engine.grammar_backend.start_phase(SamplingParams(reasoning=True), tok.encode(prompt)) is Phase.ANSWER
    outs = llm.generate([prompt] * 2, [SamplingParams(temperature=t, seed=1, max_tokens=100, reasoning=True,
                                                      thinking_budget=4, guided_decoding=_json(json=schema))
                                       for t in (0.0, 1.0)])
    for out in outs:
        assert out.outputs[0].text.startswith("{")
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_pending_phase_end_to_end(llm, tok):
    """enable_thinking=True with the default template: the model may open <think> or answer; either way
    the answer (after thinking, if any) validates and thinking stays within the budget."""
    schema = SCHEMAS["enums"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Pick"}], enable_thinking=True)
    ids = tok.encode(prompt)
    assert llm.engine.grammar_backend.start_phase(SamplingParams(reasoning=True), ids) is Phase.PENDING
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, reasoning=True, thinking_budget=5,
                             ignore_eos=True, guided_decoding=_json(json=schema)) for s in range(6)]
    for out in llm.generate([ids] * 6, params):
        c = out.outputs[0]
        assert c.finish_reason == "stop"
        if c.token_ids[0] == tok.token_to_id("<think>"):
            assert c.token_ids.index(tok.token_to_id("</think>")) <= 6
            c_text = c.text.split("</think>", 1)[1]
        else:
            c_text = c.text
        jsonschema.validate(json.loads(c_text), schema)


def test_pending_mask_is_grammar_plus_think_open(llm, tok):
    backend = llm.engine.grammar_backend
    guided = _json(json=SCHEMAS["enums"])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "q"}]))
    think_open, think_close = tok.token_to_id("<think>"), tok.token_to_id("</think>")

    guide = backend.guide(SamplingParams(reasoning=True, thinking_budget=2, guided_decoding=guided), prompt)
    assert guide.phase is Phase.PENDING and guide.needs_mask
    plain = backend.guide(SamplingParams(guided_decoding=guided), prompt)  # no reasoning: ANSWER at once
    assert plain.phase is Phase.ANSWER
    grammar_allowed = _allowed(backend, plain)
    assert grammar_allowed and think_open not in grammar_allowed
    assert tok.encode("\n")[0] not in grammar_allowed  # xgrammar's JSON allows no leading whitespace
    assert _allowed(backend, guide) == grammar_allowed | {think_open}
    # Nothing the tokenizer lacks, and no special token, is ever allowed.
    assert all(t < tok.vocab_size and t not in tok.special_token_ids for t in grammar_allowed)

    # <think> opens thinking: no mask until the budget is spent, then only </think>.
    assert guide.accept(think_open) and guide.phase is Phase.THINKING and not guide.needs_mask
    for token in tok.encode(" hmm ok")[:2]:
        assert not guide.needs_mask
        assert guide.accept(token)
    assert guide.thinking_tokens == 2 and guide.needs_mask
    assert _allowed(backend, guide) == {think_close}
    assert guide.accept(think_close) and guide.phase is Phase.ANSWER
    after = _allowed(backend, guide)  # the grammar again, with leading whitespace allowed
    assert grammar_allowed <= after and tok.encode("\n")[0] in after

    # Any other first token goes to the grammar: ANSWER, matcher advanced.
    other = backend.guide(SamplingParams(reasoning=True, guided_decoding=guided), prompt)
    first = min(grammar_allowed)
    assert other.accept(first) and other.phase is Phase.ANSWER
    assert think_open not in _allowed(backend, other)
    # A token outside the mask is rejected.
    assert not backend.guide(SamplingParams(guided_decoding=guided), prompt).accept(tok.encode("zz")[0])


def test_start_phases(llm, tok):
    backend = llm.engine.grammar_backend
    r = SamplingParams(reasoning=True)
    msgs = [{"role": "user", "content": "q"}]
    on = tok.encode(tok.apply_chat_template(msgs, enable_thinking=True))
    off = tok.encode(tok.apply_chat_template(msgs, enable_thinking=False))
    opened = tok.encode(tok.apply_chat_template(msgs) + "<think>\n")
    assert backend.start_phase(r, on) is Phase.PENDING
    assert backend.start_phase(r, off) is Phase.ANSWER
    assert backend.start_phase(r, opened) is Phase.THINKING
    assert backend.start_phase(r, off + opened) is Phase.THINKING  # only the last turn counts
    assert backend.start_phase(SamplingParams(), opened) is Phase.ANSWER  # reasoning off: nothing tracked
    assert backend.guide(r, on) is None  # nothing to constrain, no budget: no guide at all


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guided, message", [
    (dict(json={"type": "objec"}), r"invalid JSON schema: .*objec"),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "invalid JSON schema"),
    (dict(regex="(ab"), r"invalid regex '\(ab': .*parenthesis"),
    (dict(grammar="root ::= missing_rule"), r"invalid grammar .*missing_rule"),
    (dict(tool_calls=ToolCallConstraint(tools=[{"name": "f", "parameters": {"type": "strnig"}}])),
     r"invalid JSON schema for the parameters of tool 'f'"),
])
def test_invalid_constraints_raise_and_leave_the_engine_clean(llm, guided, message):
    params = SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(**guided))
    with pytest.raises(ValueError, match=message):
        llm.generate("hello", params)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", [1, 2, 3], params)
    with pytest.raises(ValueError, match=message):
        llm.engine.validate_guided_decoding(params)
    assert _free_blocks_are_full(llm) and not llm.engine._guides
    out = llm.generate("hello", SamplingParams(max_tokens=30, guided_decoding=_json(choice=["ok"])))[0].outputs[0]
    assert out.text == "ok" and out.finish_reason == "stop"
    assert _free_blocks_are_full(llm) and not llm.engine._guides


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of .* got none"),
    (dict(regex="a", choice=["a"]), "exactly one of .* got regex, choice"),
    (dict(json="{not json"), "invalid JSON schema: guided_decoding.json is not JSON"),
    (dict(choice=[]), "guided_decoding.choice must be a non-empty list"),
    (dict(json_object=1), "exactly one of|json_object must be a bool"),
])
def test_bad_guided_decoding_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidedDecodingParams(**kwargs)


def test_bad_tool_constraints_and_thinking_params():
    with pytest.raises(ValueError, match=r"tool_calls\.name must name one of the tools"):
        ToolCallConstraint(tools=[ADD], mode="named", name="sub")
    with pytest.raises(ValueError, match=r"tool_calls\.tools must be a non-empty list"):
        ToolCallConstraint(tools=[])
    with pytest.raises(ValueError, match="duplicate names"):
        ToolCallConstraint(tools=[ADD, ADD])
    with pytest.raises(ValueError, match=r"tool_calls\.mode"):
        ToolCallConstraint(tools=[ADD], mode="auto")
    with pytest.raises(ValueError, match="thinking_budget must be an integer >= 0"):
        SamplingParams(reasoning=True, thinking_budget=-1)
    with pytest.raises(ValueError, match="thinking_budget needs reasoning=True"):
        SamplingParams(thinking_budget=4)
    with pytest.raises(ValueError, match="guided_decoding must be GuidedDecodingParams"):
        SamplingParams(guided_decoding={"regex": "a"})


# ---- stops, n > 1, chunked prefill, preemption, the wire -------------------------------------------


def test_complete_grammar_stops_despite_ignore_eos_and_min_tokens(llm):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=50, ignore_eos=True, min_tokens=40,
                            guided_decoding=_json(choice=["alpha", "beta"]))
    out = llm.generate("pick", params)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_token_ids


def test_abort_frees_the_matchers(llm, tok):
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, max_tokens=50, guided_decoding=_json(json=SCHEMAS["enums"]))
    engine.add_request("to-abort", tok.encode("hello there"), params)
    assert set(engine._guides) == {"to-abort#0", "to-abort#1"}
    engine.step()
    engine.step()
    engine.abort("to-abort")
    assert not engine._guides and _free_blocks_are_full(llm)


def test_token_bitmask_unpacking_matches_xgrammar():
    rng = np.random.default_rng(0)
    V = 1000
    bitmask = torch.from_numpy(rng.integers(-2**31, 2**31, size=(3, (V + 31) // 32), dtype=np.int64)
                               .astype(np.int32))
    logits = torch.zeros(3, V)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=V)
    assert torch.equal(unpack_token_bitmask(bitmask, V), logits == 0)


def test_n2_chunked_prefill_preemption_and_pickled_plans(tok):
    """Small KV cache (preemption), 8-token step budget (chunked prefill), n=2 (a matcher per
    sequence), and every plan pickled on its way to the runner, as through Ray."""
    # 16 blocks of 4: one sequence (15 prompt tokens, at most ~20 the schema allows) needs 9, the six
    # together far more, whatever the default model answers, so some are preempted
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=16, max_num_batched_tokens=8, progress=False)
    runner_execute = llm.engine.executor.execute
    masked_steps = []

    def through_the_wire(plan):
        if plan.token_masks:
            masked_steps.append(plan)
        return runner_execute(pickle.loads(pickle.dumps(plan)))

    llm.engine.executor.execute = through_the_wire
    schema = SCHEMAS["array_of_objects"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Give me a list number {i}"}]) for i in range(3)]
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=60, guided_decoding=_json(json=schema))
    outs = llm.generate(prompts, params)
    assert llm.engine.stats()["num_preemptions"] > 0
    assert masked_steps and all(m is None or m.bitmask.dtype == np.int32
                                for plan in masked_steps for m in plan.token_masks)
    for out in outs:
        assert len(out.outputs) == 2
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), schema)
    assert _free_blocks_are_full(llm) and not llm.engine._guides
