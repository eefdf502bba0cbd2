"""Incremental detokenizer and stop strings, on byte-level BPE tokenizers trained here on English,
so that Chinese, Arabic, Hindi and emoji characters are split over several byte tokens."""
from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from expertmesh.engine.detokenizer import IncrementalDetokenizer, StopChecker, find_stop_string

CORPUS = ["The quick brown fox jumps over the lazy dog. ",
          "Hello world, streaming text one token at a time.",
          "Serving engines decode tokens incrementally and hold back partial characters.",
          "The answer is 42. User: tell me more about the weather."] * 20

TEXTS = [
    "你好，世界！这是一个测试。",
    "مرحبا بالعالم، هذا اختبار",
    "नमस्ते दुनिया, यह एक परीक्षण है",
    "Family 👩‍👩‍👧 and flags 🇫🇷🇯🇵, skin 👍🏽, rainbow 🏳️‍🌈!",
    "Mixed: hello 世界 and مرحبا with नमस्ते 😀 the end.",
    "   leading spaces\n\nnew lines\t and tabs 🎉",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tokenizer


def stream(tok, prompt_ids, ids, chunks=None, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    sizes = chunks or [1] * len(ids)
    deltas, i = [], 0
    for size in sizes:
        deltas.append(detok.add(ids[i:i + size]))
        i += size
    assert i >= len(ids) and "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_splits_a_character(tok, text):
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)   # characters really are split
    prompt_ids = tok.encode("The answer is: ").ids
    deltas = stream(tok, prompt_ids, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_random_chunks_give_the_same_text(tok, text):
    ids = tok.encode(text).ids
    rng = random.Random(len(text))
    for _ in range(20):
        sizes = []
        while sum(sizes) < len(ids):
            sizes.append(rng.randint(1, 5))
        deltas = stream(tok, tok.encode(rng.choice(TEXTS)).ids, ids, sizes)
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == text


def test_text_is_released_as_soon_as_a_character_completes(tok):
    ids = tok.encode("世a").ids
    deltas = stream(tok, [], ids)
    assert deltas[:-2] == [""] * (len(ids) - 2) and deltas[-2:] == ["世", "a"]


def test_skip_special_tokens_drops_special_keeps_added(tok):
    text = "<think>hmm 🤔</think> done<|im_end|>"
    ids = tok.encode(text).ids
    assert tok.token_to_id("<|im_end|>") in ids and tok.token_to_id("<think>") in ids
    assert "".join(stream(tok, [], ids)) == "<think>hmm 🤔</think> done"
    assert "".join(stream(tok, [], ids, skip_special_tokens=False)) == text


def test_special_tokens_in_the_prompt_are_context_only(tok):
    prompt_ids = tok.encode("question<|im_end|>\n<think>").ids
    ids = tok.encode(" 你好 world").ids
    assert "".join(stream(tok, prompt_ids, ids)) == " 你好 world"


def test_prompt_context_gives_the_leading_space():
    """Metaspace (SentencePiece) drops the leading space of a decode's first token; with the
    prompt as context the first output token keeps it, as inside the whole sequence."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    prompt_ids = tokenizer.encode("Hello").ids
    output_ids = tokenizer.encode("Hello world, the lazy dog").ids[len(prompt_ids):]
    assert not tokenizer.decode(output_ids).startswith(" ")
    whole = tokenizer.decode(prompt_ids + output_ids)
    assert "".join(stream(tokenizer, prompt_ids, output_ids)) == whole[len("Hello"):] == " world, the lazy dog"


def test_window_stays_bounded(tok):
    ids = tok.encode(" ".join(TEXTS) * 20).ids
    detok = IncrementalDetokenizer(tok, [])
    largest = 0
    for i in ids:
        detok.add([i])
        largest = max(largest, len(detok._ids))
    assert detok.text == tok.decode(ids) and largest <= 12


def test_invalid_utf8_is_released_not_hoarded(tok):
    lead_byte = tok.encode("你").ids[0]        # a 3-byte lead with no continuation: never completes
    ids = [lead_byte] * 40 + tok.encode(" ok").ids + [lead_byte]
    detok = IncrementalDetokenizer(tok, [])
    for i in ids:
        detok.add([i])
        assert len(detok._ids) <= 32   # released prefix (<= 13) + pending (<= 17)
    detok.flush()
    assert detok.text == tok.decode(ids)


def test_find_stop_string():
    assert find_stop_string("Hello world!", 3, ["world"]) == (6, "world")   # spans into old text
    assert find_stop_string("Hello world!", 1, ["world"]) is None           # ended in old text
    assert find_stop_string("xabcd", 4, ["abc", "b"]) == (2, "b")           # ends first wins
    assert find_stop_string("xabcd", 4, ["c", "bc"]) == (2, "bc")           # same end: longer
    assert find_stop_string("stop stop", 9, ["stop"]) == (0, "stop")
    assert find_stop_string("abc", 3, []) is None


def run_checker(tok, text, stops, include=False, chunk=1):
    ids = tok.encode(text).ids
    detok, checker = IncrementalDetokenizer(tok, []), StopChecker(stops, include)
    streamed = []
    for i in range(0, len(ids), chunk):
        detok.add(ids[i:i + chunk])
        update = checker.update(detok.text)
        streamed.append(update.delta)
        if update.stop_str is not None:
            return "".join(streamed), detok.text[:update.text_end], update.stop_str
    update = checker.update(detok.text, finished=True)
    streamed.append(update.delta)
    return "".join(streamed), detok.text, None


@pytest.mark.parametrize("chunk", [1, 2, 7])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_deltas(tok, chunk, include):
    text = "The answer is 42.\n\nUser: tell me more"
    streamed, final, stop = run_checker(tok, text, ["\n\nUser:", "weather"], include, chunk)
    expected = "The answer is 42." + ("\n\nUser:" if include else "")
    assert stop == "\n\nUser:" and streamed == final == expected


def test_earliest_stop_wins_in_stream(tok):
    streamed, final, stop = run_checker(tok, "Hello world, the lazy dog.", ["lazy", "world"], chunk=50)
    assert stop == "world" and final == streamed == "Hello "


def test_held_back_text_is_released(tok):
    # "Us" might start "User:" so it is held back while it might; the end releases it.
    streamed, final, stop = run_checker(tok, "The answer is 42. Us", ["User:"])
    assert stop is None and streamed == final == "The answer is 42. Us"
    checker = StopChecker(["User:"])
    assert checker.update("The answer. Us").delta == "The answer. "
    assert checker.update("The answer. Use").delta == ""
    assert checker.update("The answer. Used").delta == "Used"
    assert checker.update("The answer. Used U").delta == " "
    assert checker.update("The answer. Used U", finished=True).delta == "U"
    assert StopChecker([]).update("abc").delta == "abc"


# ---- stop strings: one automaton, the naive matcher's answers, work independent of their count -----

def naive_stream(text: str, cuts: list[int], stops: list[str], include: bool, check_from: int = 0):
    """The plain matcher over text arriving in pieces (`find_stop_string` on each new piece), as
    StopChecker did before its automaton; matching only from the piece index `check_from` on
    (min_tokens). Returns (final text, stop) or (text, None)."""
    prev = 0
    for i, end in enumerate([*cuts, len(text)]):
        seen = text[:end]
        if i >= check_from:
            match = find_stop_string(seen, end - prev, stops)
            if match is not None:
                index, stop = match
                return seen[:index + len(stop) if include else index], stop
        prev = end
    return text, None


def checker_stream(text: str, cuts: list[int], stops: list[str], include: bool, check_from: int = 0):
    checker, streamed = StopChecker(stops, include), []
    pieces = [*cuts, len(text)]
    for i, end in enumerate(pieces):
        update = checker.update(text[:end], finished=i == len(pieces) - 1, check=i >= check_from)
        streamed.append(update.delta)
        if update.stop_str is not None:
            if check_from == 0:  # (text released under min_tokens may reach past a stop's start)
                assert "".join(streamed) == text[:update.text_end]
            return text[:update.text_end], update.stop_str
    return "".join(streamed), None


def test_stop_matching_agrees_with_the_naive_matcher_on_random_stop_sets():
    rng = random.Random(7)
    alphabet = "ab c\n你😀"
    for trial in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = list({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                      for _ in range(rng.randint(1, 8))})
        if rng.random() < 0.5 and len(text) > 3:  # stops that do occur, often across a cut
            i = rng.randrange(len(text) - 1)
            stops.append(text[i:i + rng.randint(1, 5)])
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1)))) if len(text) > 1 else []
        include = rng.random() < 0.5
        check_from = rng.choice([0, 0, 1, 2])
        assert checker_stream(text, cuts, stops, include, check_from) == \
            naive_stream(text, cuts, stops, include, check_from), (trial, text, cuts, stops, include, check_from)


def test_stop_matcher_work_does_not_grow_with_the_number_of_stops():
    """Structural, not timed: the automaton takes at most two transitions per character of text,
    for 1 stop string or 10,000 of 40 characters (the amplification attack)."""
    rng = random.Random(3)
    text = "".join(rng.choice("abcdefgh ") for _ in range(2000))
    few = ["zz"]
    many = ["".join(rng.choice("abcdefgh ") for _ in range(40)) for _ in range(10_000)]
    many = [s for s in many if s not in text]
    works = []
    for stops in (few, many):
        checker = StopChecker(stops)
        for end in [*range(0, len(text), 3), len(text)]:  # a few characters per update, as tokens arrive
            assert checker.update(text[:end]).stop_str is None
        assert checker.steps <= 2 * len(text)
        works.append(checker.steps)
    assert works[1] <= 2 * len(text) and works[0] >= len(text)  # one step per character at least


def test_stop_split_across_every_cut_is_found_once():
    text = "The answer is 42.\n\nUser: more"
    stops = ["\n\nUser:", "answer is 43"]
    for cut in range(1, len(text)):
        streamed, stop = checker_stream(text, [cut], stops, include=False)
        assert (streamed, stop) == ("The answer is 42.", "\n\nUser:"), cut
