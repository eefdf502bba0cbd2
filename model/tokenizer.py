"""`Tokenizer`: a checkpoint's `tokenizers.Tokenizer` plus its stop tokens and chat template.

Rendering a chat:

1. `apply_chat_template` checks the messages (roles, content shapes, tool calls) and copies them
   into the plain shape templates expect: string `content` (text parts joined with "\n"), tool
   calls as `{"id", "type": "function", "function": {"name", "arguments": <object>}}`.
2. The checkpoint's Jinja template (or our Qwen3-format default, `templates/qwen3.jinja`) renders
   them in a sandbox with the helpers Hugging Face templates use (`tojson`, `raise_exception`,
   `strftime_now`, loop controls). Errors of either step are `ValueError`s.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RawTokenizer

DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen3.jinja"
ROLES = ("system", "user", "assistant", "tool")
_SURROGATE = re.compile("[\ud800-\udfff]")
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")
"""What `apply_chat_template` sets itself: template arguments may not name them."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token: Any) -> str | None:
    """tokenizer_config tokens are strings or (older files) dicts with a "content" key."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _select_template(template: Any, tools: list | None) -> str | None:
    """A chat_template is a string, or a list of {"name", "template"} (HF's named templates)."""
    if not isinstance(template, list):
        return template
    named = {t["name"]: t["template"] for t in template}
    if tools and "tool_use" in named:
        return named["tool_use"]
    return named.get("default")


def read_chat_template(value: str) -> str:
    """A chat template given as a file (`~` expanded) or as the Jinja text itself (vLLM's
    --chat-template). A value that is neither, such as a mistyped path, is a ValueError."""
    candidate = Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and candidate.is_file():
        return candidate.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")


class Tokenizer:
    """Encodes, decodes and renders chats for one checkpoint.

    `eos_token_ids` are the ids that end generation; `special_token_ids` the added tokens marked
    special (dropped by `decode(skip_special_tokens=True)`). Qwen3's `<think>`, `<tool_call>` and
    the like are added tokens too, but not special: they are never split and survive decoding.
    """

    def __init__(
        self,
        raw: RawTokenizer,
        *,
        chat_template: str | list | None = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        special_tokens_map: dict[str, str | None] | None = None,
    ) -> None:
        self.raw = raw
        self._templates = chat_template if isinstance(chat_template, list) else None
        self.chat_template: str = (
            _select_template(chat_template, None) or DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8")
        )
        self.eos_token_ids: list[int] = list(eos_token_ids or [])
        self.pad_token_id: int | None = pad_token_id
        self.special_tokens_map: dict[str, str | None] = dict(special_tokens_map or {})
        added = raw.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        texts = sorted({tok.content for tok in added.values() if tok.content}, key=len, reverse=True)
        self._added_texts = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        self._env.filters["tojson"] = _tojson
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = _strftime_now
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from `path`.

        `chat_template`: a template file, or the Jinja text itself, used instead of the checkpoint's.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer.json in {path}")
        raw = RawTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        template = config.get("chat_template")
        template_file = path / "chat_template.jinja"
        if template_file.is_file():  # newer checkpoints store the template on its own
            template = template_file.read_text(encoding="utf-8")
        if chat_template is not None:
            template = read_chat_template(chat_template)

        tokens = {k: _token_content(config.get(k))
                  for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = generation.get("eos_token_id")
        if isinstance(eos, int):
            eos_ids = [eos]
        elif isinstance(eos, list):
            eos_ids = [int(i) for i in eos]
        else:
            eos_ids = [raw.token_to_id(tokens["eos_token"])] if tokens["eos_token"] else []
            eos_ids = [i for i in eos_ids if i is not None]
        pad_id = raw.token_to_id(tokens["pad_token"]) if tokens["pad_token"] else None
        if pad_id is None:
            pad_id = generation.get("pad_token_id")
        return cls(raw, chat_template=template, eos_token_ids=eos_ids, pad_token_id=pad_id,
                   special_tokens_map=tokens)

    # -- tokens ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self.raw.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.raw.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.raw.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.
        ValueError for text that is not a string of valid Unicode (a lone surrogate such as "\\ud800")."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        surrogate = None if text.isascii() else _SURROGATE.search(text)
        if surrogate is not None:
            raise ValueError(f"the text holds a lone surrogate ({surrogate.group()!r} at character "
                             f"{surrogate.start()}), which is not valid Unicode")
        # Through `encode_batch`, which lets go of the GIL while it works: `encode` holds it, so a
        # prompt of megabytes froze every other thread of the process for seconds.
        return self.raw.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def literal(self, text: str) -> str:
        """`text` with each added token's string in it (`<|im_end|>`, `<tool_call>`, `</tool_response>`)
        broken by a zero-width space after its first character, so that `encode` of a prompt holding it
        reads plain text there, never the control token. For text no party of the chat wrote (a tool's
        output): rendered as it is, it could end the turn it sits in and open one of its own."""
        if self._added_texts is None:
            return text
        return self._added_texts.sub(lambda m: f"{m.group()[0]}\u200b{m.group()[1:]}", text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI chat shape) to the prompt text.

        `template_kwargs` (e.g. `enable_thinking=False`) go into the template's context.
        Raises ValueError for malformed messages or tools, or when the template raises.
        Callers that take the kwargs from a user's dict check it with `check_template_kwargs` first.
        """
        normalized = normalize_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
                raise ValueError("tools must be a list of objects")
            tools = list(tools)
        source = self.chat_template
        if self._templates is not None:
            source = _select_template(self._templates, tools) or source
        template = self._compiled.get(source)
        if template is None:
            try:
                template = self._compiled[source] = self._env.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template does not compile: {e}") from e
        context = {k: v for k, v in self.special_tokens_map.items() if v is not None}
        context.update(template_kwargs)
        context.update(messages=normalized, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return template.render(**context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
        except RecursionError:  # e.g. `tojson` of a value nested deeper than Python recurses
            raise ValueError("chat template error: a value in the messages, tools or template arguments "
                             "is nested too deeply to render") from None
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            # the template met a value of a shape it cannot use (e.g. a number where it adds strings)
            raise ValueError(f"chat template error: {e}") from e


def check_template_kwargs(kwargs: Any) -> None:
    """ValueError unless `kwargs` (a request's `chat_template_kwargs`) is a dict with string keys
    that leaves `messages`, `tools` and `add_generation_prompt` to their own arguments."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError("chat_template_kwargs must be an object with string keys")
    reserved = [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]
    if reserved:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(map(repr, reserved))}: "
                         "pass them as the request's own fields")


def normalize_messages(messages: Any) -> list[dict]:
    """Check chat messages and return copies in template shape (see the module docstring)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        raise ValueError(f"{where} has no string 'role'")
    if role not in ROLES:
        raise ValueError(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
    out = dict(message)
    out["content"] = _content_text(where, message.get("content"))
    if "reasoning_content" not in out and isinstance(out.get("reasoning"), str):
        out["reasoning_content"] = out["reasoning"]
    reasoning = out.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}.reasoning_content must be a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        out.pop("tool_calls", None)
    elif role != "assistant":
        raise ValueError(f"{where} has tool_calls but role {role!r}; only assistant messages call tools")
    elif not isinstance(tool_calls, (list, tuple)):
        raise ValueError(f"{where}.tool_calls must be a list")
    else:
        out["tool_calls"] = [_normalize_tool_call(f"{where}.tool_calls[{j}]", c)
                             for j, c in enumerate(tool_calls)]
    return out


def _content_text(where: str, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                    f"other content types are not supported"
                )
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(
        f"{where}.content must be a string, null or a list of text parts, got {type(content).__name__}")


def _normalize_tool_call(where: str, call: Any) -> dict:
    """OpenAI shape or a bare {"name", "arguments"} → {"id"?, "type", "function": {"name", "arguments"}}.

    `arguments` comes out as a dict: a JSON string is parsed, an empty one means {}.
    """
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} needs a function with a string 'name'")
    arguments = fn.get("arguments")
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from e
        except RecursionError:
            raise ValueError(f"{where}.function.arguments is nested too deeply") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(arguments).__name__}")
    out = {k: v for k, v in call.items() if k not in ("function", "name", "arguments")}
    out["type"] = "function"
    out["function"] = {"name": fn["name"], "arguments": arguments}
    return out


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
