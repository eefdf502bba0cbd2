"""From a request's output constraint to an xgrammar `Grammar`: what the compiler processes run.

    GuidedDecodingParams ──grammar_spec() (caller's thread: size caps, canonical text)──▶ GrammarSpec
        ──build_grammar() (a compiler process, engine/grammar_pool.py)──▶ xgrammar Grammar ─▶ compiled

`grammar_spec` is cheap and runs where the request arrives; it refuses a constraint over the
engine's caps (`LimitsConfig`) with a ValueError naming the setting, before anything is compiled.
A `GrammarSpec` is plain text, so it crosses to a compiler process whatever the schema's depth,
and it is the key of the compiled-grammar cache.

JSON follows `json.dumps` spacing (`{"a": 1, "b": [2, 3]}`), not free whitespace: a model never
loops on whitespace inside the answer, and the format is the one Qwen writes in tool calls.
Strings in a JSON answer never hold a raw control character (U+0000 to U+001F), which JSON
forbids: xgrammar (0.2.x, its issue #800) lowers a string with `minLength`/`maxLength` (and a
`propertyNames` bound) to a class that admits them, so `build_grammar` narrows that class, and a
raw control character written inside a schema's `pattern` is escaped before xgrammar reads it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from expertmesh.engine.config import LimitsConfig
from expertmesh.engine.sampling_params import GuidedDecodingParams

_NO_PARAMETERS = {"type": "object", "properties": {}}
"""The arguments of a tool without `parameters`: `{}` (strict: no properties)."""
_LEADING_WHITESPACE = "root ::= [ \\t\\r\\n]{0,8}"
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_LENGTH_BOUNDED_CHAR = '[^\\"\\\\\\r\\n]'
"""The class xgrammar prints for one character of a length-bounded JSON string: it admits U+0000 to
U+001F except CR and LF, which JSON forbids raw (a strict parser fails: "Invalid control character")."""
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'
"""One unescaped character of a JSON string, as xgrammar's own `basic_string` has it."""
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
"""Schema keywords whose values are data, not schemas: never rewritten."""
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class GrammarSpec:
    """One grammar to compile, as text: `kind` is a `GuidedDecodingParams` field name, `text` the
    constraint (JSON for json, choice and tool_calls), `after_thinking` allows leading whitespace."""
    kind: str
    text: str
    after_thinking: bool = False


@dataclass(frozen=True)
class ToolTokens:
    """The vocabulary's `<tool_call>` and `</tool_call>` ids (None: the tags are written as text)."""
    open: int | None
    close: int | None


def grammar_spec(guided: GuidedDecodingParams, limits: LimitsConfig, after_thinking: bool = False) -> GrammarSpec:
    """The constraint as a spec; ValueError naming the cap when it is over one of `limits`."""
    kind = guided.kinds[0]
    if kind == "json":
        text = guided.json if isinstance(guided.json, str) else _dumps(guided.json, "guided_decoding.json")
        _check_size("guided_decoding.json (the JSON schema) is {} bytes", text, limits)
        _check_enums("guided_decoding.json", [guided.schema], limits)
    elif kind == "json_object":
        text = ""
    elif kind == "regex":
        if len(guided.regex) > limits.grammar_max_regex_chars:
            raise ValueError(f"guided_decoding.regex is {len(guided.regex)} characters, over the limit of "
                             f"{limits.grammar_max_regex_chars} (grammar_max_regex_chars)")
        text = guided.regex
    elif kind == "choice":
        text = json.dumps(list(guided.choice), ensure_ascii=False)
        _check_size("guided_decoding.choice is {} bytes together", text, limits)
        if len(guided.choice) > limits.grammar_max_enum_values:
            raise ValueError(f"guided_decoding.choice has {len(guided.choice)} choices, over the limit of "
                             f"{limits.grammar_max_enum_values} (grammar_max_enum_values)")
    elif kind == "grammar":
        text = guided.grammar
        _check_size("guided_decoding.grammar is {} bytes", text, limits)
    else:  # tool_calls
        functions = [{"name": f["name"], "parameters": f.get("parameters")} for f in guided.tool_calls.functions]
        text = _dumps(functions, "tool_calls.tools")
        _check_size("tool_calls: the tools' parameter schemas are {} bytes together", text, limits)
        _check_enums("tool_calls: the tools' parameter schemas together", [f["parameters"] for f in functions], limits)
    return GrammarSpec(kind, text, after_thinking)


def build_grammar(spec: GrammarSpec, tool_tokens: ToolTokens):
    """The xgrammar `Grammar` of a spec; ValueError naming the problem if it is invalid."""
    import xgrammar as xgr

    if spec.kind == "json":
        grammar = json_schema_grammar(spec.text, "invalid JSON schema")
    elif spec.kind == "json_object":
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    elif spec.kind == "regex":
        grammar = _built(f"invalid regex {_short(spec.text)}", lambda: xgr.Grammar.from_regex(spec.text))
    elif spec.kind == "choice":
        choices = json.loads(spec.text)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)  # EBNF reads JSON escapes
        grammar = _built(f"invalid choice {_short(spec.text)}",
                         lambda: xgr.Grammar.from_ebnf(f"root ::= {alternatives}"))
    elif spec.kind == "grammar":
        grammar = _built(f"invalid grammar {_short(spec.text)}", lambda: xgr.Grammar.from_ebnf(spec.text))
    elif spec.kind == "tool_calls":
        grammar = _tool_calls_grammar(json.loads(spec.text), tool_tokens)
    else:
        raise ValueError(f"guided_decoding sets no constraint (kind {spec.kind!r})")
    if spec.after_thinking:
        grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf(_LEADING_WHITESPACE), grammar)
    return grammar


def json_schema_grammar(schema_text: str, problem: str):
    """xgrammar's grammar of a JSON schema (strict, `json.dumps` spacing), with no raw control
    character allowed inside any string (see the module doc)."""
    import xgrammar as xgr

    schema = json.loads(schema_text)
    if _has_raw_control_in_pattern(schema):
        schema_text = json.dumps(_escape_pattern_controls(schema), ensure_ascii=False)
    grammar = _built(problem, lambda: xgr.Grammar.from_json_schema(schema_text, any_whitespace=False))
    ebnf = str(grammar)
    if _LENGTH_BOUNDED_CHAR not in ebnf:
        return grammar
    return _built(problem, lambda: xgr.Grammar.from_ebnf(ebnf.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)))


def _tool_calls_grammar(functions: list[dict], tags: ToolTokens):
    import xgrammar as xgr
    from xgrammar import structural_tag as st

    calls = []
    for fn in functions:
        name, params = fn["name"], fn.get("parameters")
        schema = dict(params or _NO_PARAMETERS)
        schema.setdefault("type", "object")  # Qwen's wire format: arguments are an object
        args = json_schema_grammar(json.dumps(schema, ensure_ascii=False),
                                   f"invalid JSON schema for the parameters of tool {name!r}")
        calls.append(st.SequenceFormat(elements=[
            st.ConstStringFormat(value='\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '),
            st.GrammarFormat(grammar=str(args)),
            st.ConstStringFormat(value="}\n")]))

    def tag(token_id: int | None, text: str):
        return st.TokenFormat(token=token_id) if token_id is not None else text

    block = st.TagFormat(begin=tag(tags.open, TOOL_CALL_OPEN),
                         content=calls[0] if len(calls) == 1 else st.OrFormat(elements=calls),
                         end=tag(tags.close, TOOL_CALL_CLOSE))
    more = st.StarFormat(content=st.SequenceFormat(elements=[st.ConstStringFormat(value="\n"), block]))
    return _built("invalid tool_calls constraint", lambda: xgr.Grammar.from_structural_tag(
        st.StructuralTag(format=st.SequenceFormat(elements=[block, more]))))


# ---- caps ---------------------------------------------------------------------------------------

def _dumps(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from None


def _check_size(what: str, text: str, limits: LimitsConfig) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.grammar_max_bytes:
        raise ValueError(f"{what.format(size)}, over the limit of {limits.grammar_max_bytes} (grammar_max_bytes)")


def _check_enums(what: str, schemas: list, limits: LimitsConfig) -> None:
    """Counts `enum` values and `const`s (each one alternative of the grammar) without recursion."""
    count, stack = 0, list(schemas)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "enum" and isinstance(value, list):
                    count += len(value)
                elif key == "const":
                    count += 1
                elif key not in _DATA_KEYWORDS:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    if count > limits.grammar_max_enum_values:
        raise ValueError(f"{what} has {count} enum values, over the limit of {limits.grammar_max_enum_values} "
                         "(grammar_max_enum_values)")


# ---- helpers ------------------------------------------------------------------------------------

def _schema_nodes(schema):
    """Every dict of a schema that may be a schema (not inside enum, const, default, examples)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(v for k, v in node.items() if k not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            stack.extend(node)


def _has_raw_control_in_pattern(schema) -> bool:
    return any(isinstance(n.get("pattern"), str) and any(ord(c) < 0x20 for c in n["pattern"])
               for n in _schema_nodes(schema))


def _escape_pattern_controls(schema):
    """A copy of the schema whose `pattern`s spell control characters as regex escapes (`\\x09`):
    xgrammar copies a raw one into the output, where JSON forbids it."""
    if isinstance(schema, list):
        return [_escape_pattern_controls(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key == "pattern" and isinstance(value, str):
            out[key] = "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 else c for c in value)
        else:
            out[key] = _escape_pattern_controls(value)
    return out


def xgrammar_message(exc: Exception) -> str:
    """xgrammar's error text without its log prefix ("[12:00:00] /project/cpp/x.cc:12: ")."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _XGRAMMAR_PREFIX.sub("", lines[0]) if lines else "the grammar compiler refused it without saying why"


def _built(problem: str, build):
    """build(), with any xgrammar error turned into a ValueError that starts with `problem`."""
    try:
        return build()
    except Exception as e:
        raise ValueError(f"{problem}: {xgrammar_message(e)}") from e


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
