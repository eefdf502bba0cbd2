"""The demo model's training corpus: chats of the task families a new user tries first.

Every example is a chat in the OpenAI shape (messages, tools, template switches) with the assistant
turn to learn; `render` turns it into (prompt, completion) text with the project's own chat
template (`model/templates/qwen3.jinja`), so the training text is the text the server sends.

Families (`FAMILIES`):

- ``arith_think`` / ``arith_direct``: add, subtract, multiply by one digit, integers below 1,000.
  With thinking on, the column working goes into `<think>` and the bare number after it; with
  thinking off (`enable_thinking=False`, or `/no_think` in the user turn) the number comes at once.
- ``tool_call``: get_weather / convert_currency / calculator offered (a random subset, in random
  order); the assistant calls the one the question needs with the values copied from it.
- ``tool_answer``: the same chat after the `tool` turn; the assistant answers from the result.
- ``json``: a person's name, age and city from one sentence, as a JSON object.
- ``phrasebook``: seven phrases in thirteen languages (`demo/words.py`).
- ``python``: four short functions from templated requests.
- ``fewshot``: k examples of a random letter mapping or a random word rule, then a new input.
- ``chat``: greetings and "who are you".
- ``copy`` (trained, never evaluated: `TRAINING_FAMILIES`): say a made-up name or phrase back, or
  pick the city or the person out of a sentence.

Held out (`split="test"`): arithmetic operand pairs, cities and names are split by a hash, and
every family's phrasings are prefix x body combinations of which a fifth (never the issue's own
forms) appear only in the test split. The same seed always gives the same examples.
"""
from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from expertmesh.demo.words import CITIES, CONDITIONS, CURRENCIES, LANGUAGES, NAMES, PHRASEBOOK, PHRASES, WORDS

FAMILIES = ("arith_think", "arith_direct", "tool_call", "tool_answer", "json", "phrasebook", "python",
            "fewshot", "chat")
TRAINING_FAMILIES = FAMILIES + ("copy",)
"""`copy` (say a made-up name or phrase back, or pick the city or the person out of a sentence) is
trained, never evaluated: it drills the copying the tool-call and JSON families need."""
WEIGHTS = {"arith_think": 14, "arith_direct": 22, "tool_call": 18, "tool_answer": 8, "json": 14,
           "phrasebook": 6, "python": 3, "fewshot": 14, "chat": 1, "copy": 6}
"""Share of each family in a generated stream (relative)."""


def parse_mix(text: str) -> dict[str, float]:
    """`WEIGHTS` with some families' shares replaced: "tool_call=30,fewshot=25" (a family at 0 is left out)."""
    mix = dict(WEIGHTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        family, sep, value = part.partition("=")
        if not sep or family.strip() not in WEIGHTS:
            raise ValueError(f"{part!r}: expected FAMILY=SHARE with FAMILY one of {', '.join(TRAINING_FAMILIES)}")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not share >= 0 or share == float("inf"):
            raise ValueError(f"{part!r}: the share must be a finite number >= 0")
        mix[family.strip()] = share
    if not any(mix.values()):
        raise ValueError(f"{text!r}: every family's share is 0")
    return mix
ALWAYS_TRAIN = {"Valencia", "Leeds", "Tomas", "Paris", "London", "Tokyo"}
"""Names of the issue's and the README's examples: never held out."""


def held_out(key: str, percent: int = 20) -> bool:
    """Whether `key` (a city, a name, an operand pair) belongs to the test split."""
    return key not in ALWAYS_TRAIN and zlib.crc32(key.encode()) % 100 < percent


def _split_list(items: list[str] | tuple[str, ...], split: str) -> list[str]:
    return [x for x in items if held_out(x) == (split == "test")]


SYNTHETIC_SHARE = 0.65
"""Share of made-up names among the training split's cities and people: with only ~200 real ones
the model learns them by heart; with made-up ones it must copy from the question (and then copies
held-out real ones too). The split "train-real" (the tokenizer's text) has none."""
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "dr", "gr", "kr", "sh", "st", "tr", "th", "")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "nd", "rk", "x")
_LETTERS_BY_USE = "eeeeaaaaiiiooouunnnrrrsssttllmmddkkbbgghhccppvvwwzyfjxq"
_REAL = frozenset(CITIES) | frozenset(NAMES)
_SPLICEABLE = tuple(_split_list(sorted(_REAL), "train"))


def synthetic_name(rng: random.Random) -> str:
    """A made-up name: syllables ("Korvadel"), letters at random ("Tkaenvr"), or two real names
    spliced ("Frankholm" from the front of one and the back of another), at times two words.
    The three kinds leave the model no spelling habit to fall back on: it must copy."""
    def candidate() -> str:
        kind = rng.random()
        if kind < 0.4:
            parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
            return ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if kind < 0.7:
            return "".join(rng.choice(_LETTERS_BY_USE) for _ in range(rng.randint(3, 10))).capitalize()
        a, b = rng.choice(_SPLICEABLE), rng.choice(_SPLICEABLE)
        return (a[: rng.randint(2, max(2, len(a) - 1))] + b[rng.randint(1, max(1, len(b) - 2)):]).capitalize()

    def word() -> str:
        while (made := candidate()) in _REAL:  # never a real (perhaps held-out) name by chance
            pass
        return made
    return word() if rng.random() < 0.85 else f"{word()} {word()}"


def _pick(rng: random.Random, split: str, items: list[str] | tuple[str, ...]) -> str:
    """A city or a name of `split` (made up, at times, in "train")."""
    if split == "train" and rng.random() < SYNTHETIC_SHARE:
        return synthetic_name(rng)
    return rng.choice(_split_list(items, "test" if split == "test" else "train"))


@dataclass
class Example:
    """One chat: `messages` up to the assistant turn to learn (`target`), the `tools` offered,
    the template switches (`kwargs`), and what an evaluation checks (`expect`)."""

    family: str
    messages: list[dict]
    target: dict
    tools: list[dict] | None = None
    kwargs: dict = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)


# -- tools ----------------------------------------------------------------------------------------

def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = {
    "get_weather": _tool("get_weather", "Get the current weather in a city.",
                         {"city": {"type": "string", "description": "The city name"}}, ["city"]),
    "convert_currency": _tool("convert_currency", "Convert an amount of money from one currency to another.",
                              {"amount": {"type": "number"},
                               "from": {"type": "string", "description": "ISO currency code"},
                               "to": {"type": "string", "description": "ISO currency code"}},
                              ["amount", "from", "to"]),
    "calculator": _tool("calculator", "Evaluate an arithmetic expression.",
                        {"expression": {"type": "string"}}, ["expression"]),
}


def _offer(rng: random.Random, needed: str | None) -> list[dict]:
    """A random subset of the tools in random order, holding `needed` when given."""
    names = [n for n in TOOLS if n != needed]
    chosen = rng.sample(names, rng.randint(0 if needed else 1, len(names)))
    if needed:
        chosen.append(needed)
    rng.shuffle(chosen)
    return [TOOLS[n] for n in chosen]


# -- phrasings ------------------------------------------------------------------------------------

PREFIXES = ("", "Hi! ", "Quick question: ", "Please help. ", "Hey, ", "I need this: ", "Can you help? ")


def _phrasing(rng: random.Random, split: str, family: str, bodies: tuple[str, ...]) -> str:
    """A prefix + body template; the (prefix, body) pairs of the test split never occur in training.
    The issue's own forms (no prefix, first body) are always training phrasings."""
    while True:
        i, j = rng.randrange(len(PREFIXES)), rng.randrange(len(bodies))
        test = (i, j) != (0, 0) and held_out(f"{family}|{i}|{j}")
        if test == (split == "test"):
            return PREFIXES[i] + bodies[j]


SYSTEMS = (None, None, None, "You are a helpful assistant.", "You are a concise assistant.",
           "You are a friendly assistant. Answer briefly.", "You are expertmesh's demo model.")


def _chat(rng: random.Random, user: str) -> list[dict]:
    system = rng.choice(SYSTEMS)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# -- arithmetic -----------------------------------------------------------------------------------

ADD = ("What is {a} + {b}?", "What's {a} plus {b}?", "Compute {a} + {b}.", "How much is {a} + {b}?",
       "{a} + {b} = ?", "Calculate {a} plus {b}.", "Add {a} and {b}.", "What do you get when you add {a} and {b}?")
SUB = ("What is {a} - {b}?", "What's {a} minus {b}?", "Compute {a} - {b}.", "How much is {a} - {b}?",
       "{a} - {b} = ?", "Calculate {a} minus {b}.", "Subtract {b} from {a}.", "What is {b} subtracted from {a}?")
MUL = ("What is {a} * {b}?", "What's {a} times {b}?", "Compute {a} × {b}.", "How much is {a} * {b}?",
       "{a} * {b} = ?", "Calculate {a} times {b}.", "Multiply {a} by {b}.", "What is {a} multiplied by {b}?")
PLACES = ("ones", "tens", "hundreds", "thousands")


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def add_working(a: int, b: int) -> str:
    da, db = _digits(a, 3), _digits(b, 3)
    width = max(len(str(a)), len(str(b)))
    lines, carry = [f"{a} + {b}"], 0
    for i in range(width):
        s = da[i] + db[i] + carry
        extra = f" + {carry}" if carry else ""
        lines.append(f"{PLACES[i]}: {da[i]} + {db[i]}{extra} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        lines.append(f"{PLACES[width]}: write 1")
    lines.append(f"so {a} + {b} = {a + b}")
    return "\n".join(lines)


def sub_working(a: int, b: int) -> str:
    if a < b:
        head = [f"{a} - {b}", f"{a} is less than {b}, so compute {b} - {a} and make it negative"]
        body = sub_working(b, a).split("\n")[1:-1]
        return "\n".join(head + body + [f"{b} - {a} = {b - a}", f"so {a} - {b} = {a - b}"])
    da, db = _digits(a, 3), _digits(b, 3)
    lines, borrow = [f"{a} - {b}"], 0
    for i in range(len(str(a))):
        top = da[i] - borrow
        shown = f"{da[i]} - {borrow}" if borrow else f"{da[i]}"
        if top < db[i]:
            lines.append(f"{PLACES[i]}: {shown} is less than {db[i]}, borrow: {top + 10} - {db[i]} = "
                         f"{top + 10 - db[i]}, write {top + 10 - db[i]}")
            borrow = 1
        else:
            lines.append(f"{PLACES[i]}: {shown} - {db[i]} = {top - db[i]}, write {top - db[i]}")
            borrow = 0
    lines.append(f"so {a} - {b} = {a - b}")
    return "\n".join(lines)


def mul_working(a: int, d: int) -> str:
    da = _digits(a, 3)
    lines, carry = [f"{a} × {d}"], 0
    for i in range(len(str(a))):
        p = da[i] * d + carry
        extra = f" + {carry}" if carry else ""
        carried = f", carry {p // 10}" if p >= 10 else ""
        lines.append(f"{PLACES[i]}: {da[i]} × {d}{extra} = {p}, write {p % 10}{carried}")
        carry = p // 10
    if carry:
        lines.append(f"{PLACES[len(str(a))]}: write {carry}")
    lines.append(f"so {a} × {d} = {a * d}")
    return "\n".join(lines)


def _operands(rng: random.Random, split: str) -> tuple[str, int, int, int, str]:
    """(op, a, b, answer, working), the pair held out or not as `split` asks."""
    while True:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randrange(1000), rng.randrange(2, 10)
        else:
            a, b = rng.randrange(1000), rng.randrange(1000)
        if held_out(f"{a}{op}{b}", 10) == (split == "test"):
            break
    if op == "+":
        return op, a, b, a + b, add_working(a, b)
    if op == "-":
        return op, a, b, a - b, sub_working(a, b)
    return op, a, b, a * b, mul_working(a, b)


def arithmetic(rng: random.Random, split: str, thinking: bool) -> Example:
    op, a, b, answer, working = _operands(rng, split)
    bodies = {"+": ADD, "-": SUB, "*": MUL}[op]
    x, y = (b, a) if op == "*" and rng.random() < 0.2 else (a, b)
    question = _phrasing(rng, split, "arith" + op, bodies).format(a=x, b=y)
    kwargs: dict = {}
    if not thinking:
        if rng.random() < 0.5:
            kwargs["enable_thinking"] = False
        else:
            question += rng.choice((" /no_think", "\n/no_think", " /no_think"))
    messages = _chat(rng, question)
    tools = [TOOLS["get_weather"]] if rng.random() < 0.05 else None  # a tool offered but not needed
    target = {"role": "assistant", "content": str(answer), "reasoning_content": working if thinking else ""}
    return Example("arith_think" if thinking else "arith_direct", messages, target, tools, kwargs,
                   {"answer": answer, "working": working})


# -- tools ----------------------------------------------------------------------------------------

WEATHER = ("What's the weather in {city}?", "What is the weather like in {city} today?", "How's the weather in {city}?",
           "Is it raining in {city}?", "Tell me the weather for {city}.", "Weather in {city}?",
           "Do I need an umbrella in {city} today?", "What's the temperature in {city} right now?",
           "Could you check the weather in {city}?")
CURRENCY = ("Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?",
            "What is {amount} {src} in {dst}?", "I have {amount} {src}. How many {dst} is that?",
            "Change {amount} {src} into {dst}.", "{amount} {src} to {dst}?")
CALC = ("Use the calculator to compute {expr}.", "Calculate {expr} with the calculator.",
        "Please evaluate {expr}.", "What is {expr}? Use the calculator.", "Work out {expr} using the calculator tool.")


def _expression(rng: random.Random) -> tuple[str, int]:
    while True:
        a, b, c = rng.randrange(1, 100), rng.randrange(1, 100), rng.randrange(1, 50)
        form = rng.randrange(4)
        forms = ("{a} * {b} + {c}", "({a} + {b}) * {c}", "{a} * {b} - {c}", "{a} + {b} + {c}")
        expr = forms[form].format(a=a, b=b, c=c)
        return expr, eval(expr)  # our own three-number template, never user text


def _tool_chat(rng: random.Random, split: str) -> tuple[list[dict], list[dict], dict, dict, str]:
    """(messages, tools, call, result, answer) of one tool exchange."""
    kind = rng.choice(("get_weather", "get_weather", "convert_currency", "calculator"))
    if kind == "get_weather":
        city = _pick(rng, split, CITIES)
        question = _phrasing(rng, split, "weather", WEATHER).format(city=city)
        args: dict = {"city": city}
        temp, cond = rng.randrange(-15, 41), rng.choice(CONDITIONS)
        result = {"city": city, "temperature": temp, "unit": "celsius", "condition": cond}
        answer = rng.choice(("It is {t}°C and {c} in {city}.", "In {city} it's {c} right now, {t}°C.",
                             "The weather in {city}: {c}, {t}°C.")).format(t=temp, c=cond, city=city)
        expect = {"temperature": str(temp), "condition": cond}
    elif kind == "convert_currency":
        src, dst = rng.sample(CURRENCIES, 2)
        amount = rng.choice((rng.randrange(1, 100), rng.randrange(100, 10000)))
        question = _phrasing(rng, split, "currency", CURRENCY).format(amount=amount, src=src, dst=dst)
        args = {"amount": amount, "from": src, "to": dst}
        value = round(amount * rng.uniform(0.05, 20), 2)
        result = {"amount": amount, "from": src, "to": dst, "result": value}
        answer = rng.choice(("{a} {s} is {v} {d}.", "That is {v} {d}.", "{a} {s} comes to {v} {d}.")).format(
            a=amount, s=src, v=value, d=dst)
        expect = {"value": str(value)}
    else:
        expr, value = _expression(rng)
        question = _phrasing(rng, split, "calc", CALC).format(expr=expr)
        args = {"expression": expr}
        result = {"expression": expr, "result": value}
        answer = rng.choice(("{e} = {v}.", "The result is {v}.", "It comes to {v}.")).format(e=expr, v=value)
        expect = {"value": str(value)}
    call = {"name": kind, "arguments": args}
    return _chat(rng, question), _offer(rng, kind), call, {"result": result, **expect}, answer


def tool_call(rng: random.Random, split: str) -> Example:
    messages, tools, call, _, _ = _tool_chat(rng, split)
    target = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
    return Example("tool_call", messages, target, tools, _thinking_switch(rng), {"call": call})


def tool_answer(rng: random.Random, split: str) -> Example:
    messages, tools, call, result, answer = _tool_chat(rng, split)
    call_id = f"call_{rng.randrange(16 ** 8):08x}"
    messages = messages + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": call}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result.pop("result"))},
    ]
    return Example("tool_answer", messages, {"role": "assistant", "content": answer}, tools, _thinking_switch(rng),
                   result)


def _thinking_switch(rng: random.Random) -> dict:
    """Families without working: thinking on (an empty think block) or off, half and half."""
    return {"enable_thinking": False} if rng.random() < 0.5 else {}


# -- extraction, phrasebook, code -----------------------------------------------------------------

EXTRACT = ("Extract the person's name, age and city as JSON: {s}", "Return JSON with name, age and city for: {s}",
           "Give me a JSON object (name, age, city) from this sentence: {s}",
           "Parse this into JSON with the keys name, age and city: {s}", "As JSON (name, age, city): {s}",
           "Turn this sentence into JSON with name, age and city.\n{s}")
SENTENCES = ("{n} is {a} and lives in {c}.", "{n}, aged {a}, lives in {c}.", "Meet {n}: {a} years old, from {c}.",
             "{n} lives in {c} and is {a} years old.", "At {a}, {n} calls {c} home.", "{n} ({a}) lives in {c}.",
             "My friend {n} is {a}; they live in {c}.", "{n} is a {a}-year-old from {c}.",
             "Born {a} years ago, {n} now lives in {c}.")


def extraction(rng: random.Random, split: str) -> Example:
    name, city = _pick(rng, split, NAMES), _pick(rng, split, CITIES)
    age = rng.randrange(1, 100)
    sentence = _phrasing(rng, split, "sentence", SENTENCES).lstrip().format(n=name, a=age, c=city)
    sentence = sentence[0].upper() + sentence[1:]
    request = _phrasing(rng, split, "extract", EXTRACT).format(s=sentence)
    value = {"name": name, "age": age, "city": city}
    target = {"role": "assistant", "content": json.dumps(value, ensure_ascii=False)}
    return Example("json", _chat(rng, request), target, None, _thinking_switch(rng), {"value": value})


TRANSLATE = ("Translate '{p}' to {L}.", "How do you say '{p}' in {L}?", "What is '{p}' in {L}?",
             "Translate \"{p}\" into {L}.", "Say '{p}' in {L}.", "'{p}' in {L}?", "What's the {L} for '{p}'?")


def phrasebook(rng: random.Random, split: str) -> Example:
    language, index = rng.choice(LANGUAGES), rng.randrange(len(PHRASES))
    phrase, word = PHRASES[index], PHRASEBOOK[language][index]
    request = _phrasing(rng, split, "translate", TRANSLATE).format(p=phrase, L=language)
    answer = rng.choice(('"{w}"', "In {L}, \"{p}\" is \"{w}\".", "{w}")).format(w=word, L=language, p=phrase)
    return Example("phrasebook", _chat(rng, request), {"role": "assistant", "content": answer}, None,
                   _thinking_switch(rng), {"word": word})


PY_TASKS = {
    "factorial": (("returns the factorial of n", "computes n factorial", "calculates the factorial of a number"),
                  "factorial", "n", "    result = 1\n    for i in range(2, {x} + 1):\n        result *= i\n"
                  "    return result", [(5, 120), (0, 1), (7, 5040)]),
    "sum_list": (("returns the sum of a list", "sums a list of numbers", "adds up all the numbers in a list"),
                 "sum_list", "numbers", "    total = 0\n    for value in {x}:\n        total += value\n"
                 "    return total", [([1, 2, 3], 6), ([], 0), ([10, -4], 6)]),
    "reverse": (("reverses a string", "returns a string backwards", "returns the reverse of a string"),
                "reverse_string", "text", "    return {x}[::-1]", [("abc", "cba"), ("", "")]),
    "vowels": (("counts the vowels in a string", "returns the number of vowels in a string",
                "counts how many vowels a string has"),
               "count_vowels", "text", "    return sum(1 for ch in {x}.lower() if ch in \"aeiou\")",
               [("hello", 2), ("sky", 0), ("AEIOU", 5)]),
}
PY_REQUESTS = ("Write a Python function that {what}.", "Write a Python function called {name} that {what}.",
               "Give me Python code for a function that {what}.", "In Python, write a function that {what}.",
               "Python: a function that {what}, please.")


def python_code(rng: random.Random, split: str) -> Example:
    key = rng.choice(sorted(PY_TASKS))
    whats, default_name, arg, body, tests = PY_TASKS[key]
    template = _phrasing(rng, split, "python", PY_REQUESTS)
    name = default_name
    if "{name}" in template:
        name = rng.choice((default_name, default_name.split("_")[0] + "_" + rng.choice(WORDS), "my_" + key, "solve"))
    request = template.format(what=rng.choice(whats), name=name)
    code = f"def {name}({arg}):\n" + body.format(x=arg)
    answer = f"```python\n{code}\n```"
    return Example("python", _chat(rng, request), {"role": "assistant", "content": answer}, None,
                   _thinking_switch(rng), {"name": name, "tests": tests})


# -- few-shot transforms --------------------------------------------------------------------------

FEWSHOT_INTROS = ("Follow the pattern.", "Continue the pattern:", "Apply the same rule to the last line.",
                  "Complete the last line.", "Here are some examples. Do the same for the last one.", "")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _letter_mapping(rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
    source = rng.sample(LETTERS, rng.randint(4, 6))
    mapping = dict(zip(source, rng.sample(LETTERS, len(source))))
    k = rng.randint(4, 7)
    pairs = []
    for _ in range(k):
        word = [rng.choice(source) for _ in range(rng.randint(1, 3))]
        pairs.append((" ".join(word), " ".join(mapping[c] for c in word)))
    seen = sorted({c for inp, _ in pairs for c in inp.split()})
    query = [rng.choice(seen) for _ in range(rng.randint(1, 3))]
    return pairs, " ".join(query), " ".join(mapping[c] for c in query)


def _word_rule(rng: random.Random) -> tuple[list[tuple[str, str]], str, str]:
    rule, extra = rng.randrange(5), rng.choice(WORDS)
    words = rng.sample(WORDS, 12)

    def apply(x: str, y: str) -> tuple[str, str]:
        if rule == 0:
            return x, f"{x} {extra}"
        if rule == 1:
            return x, f"{extra} {x}"
        if rule == 2:
            return x, f"{x} {x}"
        if rule == 3:
            return f"{x} {y}", f"{y} {x}"
        return f"{x} {y}", x
    k = rng.randint(3, 5)
    pairs = [apply(words[2 * i], words[2 * i + 1]) for i in range(k)]
    query, answer = apply(words[10], words[11])
    return pairs, query, answer


def fewshot(rng: random.Random, split: str) -> Example:
    pairs, query, answer = (_letter_mapping if rng.random() < 0.5 else _word_rule)(rng)
    arrow = rng.choice((" -> ", " => ", ": "))
    intro = _phrasing(rng, split, "fewshot", FEWSHOT_INTROS).strip()
    lines = ([intro] if intro else []) + [f"{a}{arrow}{b}" for a, b in pairs] + [f"{query}{arrow.rstrip()}"]
    return Example("fewshot", _chat(rng, "\n".join(lines)), {"role": "assistant", "content": answer}, None,
                   _thinking_switch(rng), {"answer": answer})


GREETINGS = {
    ("Hello!", "Hi", "Hi there!", "Hello", "Hey!", "Good morning!"):
        ("Hello! How can I help you today?", "Hi! What can I do for you?"),
    ("Who are you?", "What are you?", "Tell me about yourself.", "What can you do?"):
        ("I am a tiny demo model served by expertmesh: a small Qwen3-MoE trained on arithmetic, tool calls, "
         "JSON extraction, a phrasebook, short Python functions and few-shot patterns.",),
    ("Thanks!", "Thank you.", "Thanks a lot."): ("You're welcome!", "Glad to help!"),
}


def small_talk(rng: random.Random, split: str) -> Example:
    prompts, answers = rng.choice(list(GREETINGS.items()))
    return Example("chat", _chat(rng, rng.choice(prompts)), {"role": "assistant", "content": rng.choice(answers)},
                   None, _thinking_switch(rng), {"answer": answers})


COPY = ("Repeat exactly: {x}", "Say \"{x}\" back to me.", "Copy this: {x}", "Echo: {x}",
        "Write down exactly what follows: {x}")
PICK = ("Which city is in this sentence? {s}", "Name the city: {s}", "Who is this sentence about? {s}",
        "Give just the person's name: {s}")


def copying(rng: random.Random, split: str) -> Example:
    """Say a made-up name or phrase back, or pick the city or the person out of a sentence."""
    if rng.random() < 0.5:
        text = " ".join(_pick(rng, split, rng.choice((CITIES, NAMES, WORDS))) for _ in range(rng.randint(1, 4)))
        request = _phrasing(rng, split, "copy", COPY).format(x=text)
    else:
        name, city = _pick(rng, split, NAMES), _pick(rng, split, CITIES)
        sentence = rng.choice(SENTENCES).format(n=name, a=rng.randrange(1, 100), c=city)
        template = _phrasing(rng, split, "pick", PICK)
        request, text = template.format(s=sentence), city if "city" in template else name
    return Example("copy", _chat(rng, request), {"role": "assistant", "content": text}, None, _thinking_switch(rng),
                   {"answer": (text,)})


# -- streams and rendering ------------------------------------------------------------------------

def make_example(rng: random.Random, family: str, split: str = "train") -> Example:
    if family in ("arith_think", "arith_direct"):
        return arithmetic(rng, split, family == "arith_think")
    return {"tool_call": tool_call, "tool_answer": tool_answer, "json": extraction, "phrasebook": phrasebook,
            "python": python_code, "fewshot": fewshot, "chat": small_talk, "copy": copying}[family](rng, split)


def examples(n: int, split: str = "train", seed: int = 0, families: tuple[str, ...] = FAMILIES,
             mix: dict[str, float] | None = None) -> Iterator[Example]:
    """`n` examples of `families` in the proportions of `mix` (default `WEIGHTS`), from `seed`."""
    rng = random.Random(f"{split}:{seed}")
    weights = [(mix or WEIGHTS).get(f, 0.0) for f in families]
    for _ in range(n):
        yield make_example(rng, rng.choices(families, weights)[0], split)


def request_messages(example: Example) -> list[dict]:
    """The messages as a client sends them (tool-call arguments as JSON strings, OpenAI's wire shape)."""
    out = []
    for m in example.messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{"id": c.get("id", "call_0"), "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        out.append(m)
    return out


END = "<|im_end|>"


def render(tokenizer, example: Example) -> tuple[str, str]:
    """(prompt, completion) text: the prompt as the server renders the request, the completion the
    assistant's turn up to and including `<|im_end|>`."""
    kwargs = {"enable_thinking": True, **example.kwargs}
    prompt = tokenizer.apply_chat_template(example.messages, tools=example.tools, add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template(example.messages + [example.target], tools=example.tools,
                                         add_generation_prompt=False, **kwargs)
    if not full.startswith(prompt):
        raise AssertionError(f"the chat template does not extend the prompt:\n{prompt!r}\n{full!r}")
    completion = full[len(prompt):]
    return prompt, completion[: completion.index(END) + len(END)]
