"""Strict `json_schema` output always parses with a strict JSON parser and validates.

xgrammar (0.2.x) lowers a string with `minLength`/`maxLength` to a character class that admits raw
control characters (U+0000 to U+001F but CR and LF), which JSON forbids inside strings, and it
copies a raw control character written in a schema's `pattern` into the output: a random-weight
model sampled at temperature 1 writes them ("Invalid control character" from `json.loads`).
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar as xgr

from expertmesh import LLM, SamplingParams
from expertmesh.engine.sampling_params import GuidedDecodingParams
from expertmesh.model.default import tiny_model_path

BOUNDED_STRINGS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "code": {"type": "string", "minLength": 2, "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "object", "propertyNames": {"maxLength": 4}, "additionalProperties": {"type": "integer"},
                   "maxProperties": 2},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "code", "tags", "scores", "n"],
    "additionalProperties": False,
}
RAW_TAB_PATTERN = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^[a-z\t]{1,6}$"}},
                   "required": ["v"], "additionalProperties": False}
SEEDS = range(32)


@pytest.fixture(scope="module")
def llm():
    # the random tiny model: sampling must wander through every corner of the schema
    llm = LLM(tiny_model_path(), device="cpu", progress=False)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("schema", [BOUNDED_STRINGS, RAW_TAB_PATTERN], ids=["bounded_strings", "raw_tab_pattern"])
def test_sampled_strict_output_parses_and_validates_for_every_seed(llm, schema):
    guided = GuidedDecodingParams(json=schema)
    outs = llm.generate(["Reply in JSON:"] * len(SEEDS), [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=300, guided_decoding=guided) for seed in SEEDS])
    for seed, out in zip(SEEDS, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (seed, completion.text)
        value = json.loads(completion.text, strict=True)  # raw control characters inside strings fail here
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("schema, text", [
    (BOUNDED_STRINGS, '{"name": "a\tb", "code": "ab", "tags": ["x"], "scores": {}, "n": 1}'),
    (BOUNDED_STRINGS, '{"name": "a\x01", "code": "ab", "tags": ["x"], "scores": {}, "n": 1}'),
    (BOUNDED_STRINGS, '{"name": "a", "code": "ab", "tags": ["\x1f"], "scores": {}, "n": 1}'),
    (BOUNDED_STRINGS, '{"name": "a", "code": "ab", "tags": ["x"], "scores": {"k\tk": 1}, "n": 1}'),
    (RAW_TAB_PATTERN, '{"v": "ab\tc"}'),
])
def test_grammar_refuses_raw_control_characters_in_strings(llm, schema, text):
    compiled = llm.engine.grammar_backend.compile(GuidedDecodingParams(json=schema))
    with pytest.raises(ValueError, match="control character"):
        json.loads(text)  # the text is invalid JSON...
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    assert not (matcher.accept_string(text) and matcher.is_terminated())  # ...and the grammar says so


def test_grammar_still_takes_what_the_schema_allows(llm):
    compiled = llm.engine.grammar_backend.compile(GuidedDecodingParams(json=BOUNDED_STRINGS))
    text = '{"name": "日本 ok", "code": "a-1", "tags": ["x", "yz"], "scores": {"ab": 3}, "n": 7}'
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    assert matcher.accept_string(text) and matcher.is_terminated()
    jsonschema.validate(json.loads(text), BOUNDED_STRINGS)
