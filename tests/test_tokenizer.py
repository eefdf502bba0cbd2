"""Tokenizer and chat template: round trips, special tokens, and the Qwen3 wire format written out by hand."""
from __future__ import annotations

import json
import shutil

import pytest

from expertmesh.model.tiny import default_chat_template, make_tiny
from expertmesh.model.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS_SECTION = (
    "# Tools\n\nYou may call one or more functions to help with the request.\n\n"
    "The function signatures are listed inside <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call><|im_end|>\n'
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tok"), num_layers=1, num_experts=2, top_k=1, num_shards=1)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt)


def call(name: str, arguments: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Hello, world! The quick brown fox.",
    "今天天气很好，我们去公园散步吧。没见过的字：鑫龘",
    "مرحبا بالعالم! كيف حالك؟",
    "नमस्ते दुनिया! क़ ज़ फ़",
    "😀 🚀 👨‍👩‍👧 🇫🇷 🫠 ❤️",
    'def f(x):\n\treturn {"a": [1, 2.5e-3]}  # tabs\tand   spaces\r\n',
    "Ünïcödé ∑∫√ ♞ 𝔘𝔫𝔦 \u200b\x00\x7f",
])
def test_multilingual_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    controls = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    ids = [tok.token_to_id(t) for t in specials + controls]
    assert ids == list(range(1024, 1033)) and tok.vocab_size == 1033
    for token, token_id in zip(specials + controls, ids, strict=True):
        assert tok.encode(token) == [token_id]
        assert tok.id_to_token(token_id) == token
    assert tok.special_token_ids == frozenset(ids[:3])
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")

    text = "<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call>"


def test_from_pretrained_errors_and_fallbacks(ckpt, tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ckpt / "tokenizer.json", bare)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_pretrained(bare)  # no generation_config: eos from tokenizer_config
    assert t.eos_token_ids == [t.token_to_id("<|im_end|>")]
    assert t.chat_template == default_chat_template()
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")
    (bare / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert Tokenizer.from_pretrained(bare).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]"


# -- chat template ------------------------------------------------------------------------------

def test_system_and_user(tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n")


def test_enable_thinking_false(tok):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    messages = [{"role": "user", "content": parts}]
    assert tok.apply_chat_template(messages, enable_thinking=False) == (
        "<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(messages, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_tools_in_system_turn(tok):
    user = {"role": "user", "content": "Weather in Paris?"}
    system = {"role": "system", "content": "Be brief."}
    with_system = tok.apply_chat_template([system, user], tools=[WEATHER_TOOL])
    assert with_system == (
        "<|im_start|>system\nBe brief.\n\n" + TOOLS_SECTION
        + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([user], tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_SECTION
        + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_parallel_tool_calls_and_two_results(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", '{"city": "Paris"}', "call_1"),
            call("get_weather", '{"city": "Zürich"}', "call_2"),
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"celsius": 12}'},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n"
        '<tool_response>\n{"celsius": 18}\n</tool_response>\n'
        '<tool_response>\n{"celsius": 12}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    # Content before the calls, and arguments given as an object, render the same way.
    messages[1] = {"role": "assistant", "content": "Checking.",
                   "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n') in tok.apply_chat_template(messages)


def test_reasoning_kept_only_in_current_tool_exchange(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "\nGreet back.\n", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<think>\nOld style.\n</think>\n\nAsking."},
        {"role": "user", "content": "In Paris."},
        {"role": "assistant", "reasoning_content": "Need the tool.", "content": "",
         "tool_calls": [call("get_weather", '{"city": "Paris"}', "c1")]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "<think>\nIt is sunny.\n</think>\n\nSunny in Paris."},
        {"role": "user", "content": "<tool_response>\nnot a query\n</tool_response>"},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\nAsking.<|im_end|>\n"
        "<|im_start|>user\nIn Paris.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nIt is sunny.\n</think>\n\nSunny in Paris.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nnot a query\n</tool_response><|im_end|>\n"
    )
    # As in Qwen3, a final assistant message after the last query always carries a think block.
    final = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(final, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")


@pytest.mark.parametrize("messages, problem", [
    ({"role": "user", "content": "x"}, "messages must be a list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"content": "x"}], r"messages\[0\] has no string 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}],
     r"messages\[1\] has unknown role 'robot'"),
    ([{"role": "user", "content": 42}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": "x", "tool_calls": [call("f", "{}", "c")]}],
     r"messages\[0\] has tool_calls"),
    ([{"role": "assistant", "tool_calls": [call("f", "{oops", "c")]}], r"tool_calls\[0\].*not valid JSON"),
    ([{"role": "assistant", "tool_calls": [call("f", "[1, 2]", "c")]}], "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "string 'name'"),
])
def test_malformed_messages(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)


def test_caller_messages_not_modified(tok):
    messages = [{"role": "assistant", "content": None, "tool_calls": [call("f", '{"a": 1}', "c")]}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


def test_template_helpers(ckpt, tmp_path):
    shutil.copy(ckpt / "tokenizer.json", tmp_path)
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "|{{ {'k': ['é', 1]} | tojson(indent=1) }}|{{ strftime_now('%Y') | length }}|{{ flavour }}"
        "{% if boom %}{{ raise_exception('no ' ~ boom) }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    t = Tokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "é<x>"}, {"role": "user", "content": "second"}]
    assert t.apply_chat_template(messages, flavour="mint") == (
        '{"role": "user", "content": "é<x>"}|{\n "k": [\n  "é",\n  1\n ]\n}|4|mint')
    with pytest.raises(ValueError, match="no luck"):
        t.apply_chat_template(messages, boom="luck")


def test_template_matches_transformers_rendering(ckpt, tok):
    """transformers renders our default template to the same text as we do."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in 東京?"},
        {"role": "assistant", "reasoning_content": "Use the tool.", "content": "",
         "tool_calls": [{"type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
        {"role": "tool", "content": "rain"},
    ]
    for kwargs in ({}, {"enable_thinking": False}):
        ours = tok.apply_chat_template(messages, tools=[WEATHER_TOOL], **kwargs)
        theirs = hf.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False,
                                        add_generation_prompt=True, **kwargs)
        assert ours == theirs
