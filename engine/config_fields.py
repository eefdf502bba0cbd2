"""One definition of every setting: the fields of the config dataclasses.

A setting is a dataclass field written once: its type annotation, its default, the docstring
under it (the help text) and, where it needs them, `setting(...)` metadata (choices, bounds, a
public name). Everything else is derived from the fields:

    LLM(**kwargs)              EngineConfig.from_kwargs: the public names of the engine's fields
    expertmesh CLI flags       add_setting_flags (gateway/cli.py): --max-model-len from max_model_len, --help from
                               the docstring, type, default and choices from the field
    AppConfig (Serve args)     app_config_model (gateway/app_config.py): engine and serving fields,
                               a pydantic model that refuses unknown keys
    checks                     check_fields, called by each dataclass's __post_init__

A field of CacheConfig (engine/config.py) and what is read from it:

    block_size: int = setting(16, ge=1)
    '''Tokens per KV-cache block.'''

    >>> from expertmesh.engine.config import CacheConfig
    >>> s = settings_of(CacheConfig)[0]
    >>> (s.name, s.flag, s.type, s.default, s.ge, s.help)
    ('block_size', '--block-size', <class 'int'>, 16, 1, 'Tokens per KV-cache block.')
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, name: str | None = None,
            flag: str | None = None, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, min_length: int | None = None,
            path: bool = False, public: bool = True) -> Any:
    """A dataclass field with what the derived forms need beyond its type, default and docstring.

    name: the public name (LLM keyword, AppConfig key) when it differs from the attribute;
    flag: the CLI flag when it is not `--` + the name with dashes; choices, ge/gt/le, min_length:
    the values allowed (checked everywhere); path: a local path (`~` is expanded, and
    `--print-config` writes it relative to the home folder); public: False keeps an internal
    field (benchmarks, tests) out of the keywords, flags and AppConfig.
    """
    meta = {"name": name, "flag": flag, "choices": choices, "ge": ge, "gt": gt, "le": le,
            "min_length": min_length, "path": path, "public": public}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": meta})


@dataclass(frozen=True)
class Setting:
    """One field as the derived forms see it."""

    name: str
    """Public name: the LLM keyword argument and the AppConfig key."""
    attr: str
    """The attribute of `owner` that holds it."""
    owner: type
    type: Any
    """The annotation without `None`: int, float, str, bool or list[str]."""
    optional: bool
    """None is allowed."""
    default: Any
    help: str
    flag: str
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    path: bool = False
    public: bool = True

    def check(self, value: Any) -> None:
        """ValueError naming the setting when `value` is outside its choices or bounds, or is not a
        bool where the setting is one."""
        if value is None:
            if not self.optional:
                raise ValueError(f"{self.name} must be set")
            return
        if self.type is bool and not isinstance(value, bool):  # "no" would read as true
            raise ValueError(f"{self.name} must be true or false, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        for bound, ok, word in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                raise ValueError(f"{self.name} must be {word} {bound}, got {value}")
        if self.min_length is not None and len(value) < self.min_length:
            raise ValueError(f"{self.name} must have at least {self.min_length} character(s)")


@functools.cache
def settings_of(cls: type, public_only: bool = True) -> tuple[Setting, ...]:
    """The settings of dataclass `cls`, in field order (public ones unless `public_only` is False)."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docstrings(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("setting", {})
        base, optional = _strip_none(hints[f.name])
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        name = meta.get("name") or f.name
        s = Setting(name=name, attr=f.name, owner=cls, type=base, optional=optional, default=default,
                    help=docs.get(f.name, ""), flag=meta.get("flag") or "--" + name.replace("_", "-"),
                    choices=meta.get("choices"), ge=meta.get("ge"), gt=meta.get("gt"), le=meta.get("le"),
                    min_length=meta.get("min_length"), path=meta.get("path", False),
                    public=meta.get("public", True))
        if s.public or not public_only:
            out.append(s)
    return tuple(out)


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance `obj` against its setting (for __post_init__)."""
    for s in settings_of(type(obj), public_only=False):
        s.check(getattr(obj, s.attr))


def unknown_name_error(what: str, name: str, known: typing.Iterable[str]) -> TypeError:
    """TypeError for an unknown keyword, with the closest known name when there is one."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{what} got an unexpected keyword argument {name!r}{hint}")


def unknown_key_error(key: Any, known: typing.Iterable[str]) -> ValueError:
    """ValueError for an unknown key of a config file or mapping, with the closest known key when
    there is one (AppConfig, the tool registry)."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return ValueError(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal under each annotated attribute of `cls` (and its
    dataclass bases), whitespace collapsed to one paragraph."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
