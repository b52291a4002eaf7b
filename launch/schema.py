"""Strict checking of YAML values against dataclass fields: unknown keys and wrong types are errors.

The dataclass (its fields and their annotations) is the only source of truth for what a section allows.
"""

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any

from tokensieve.errors import RecipeError

# Sections list their allowed keys in full up to this many; bigger ones (SFTConfig) show close matches.
_MAX_LISTED_KEYS = 40


def init_fields(cls) -> dict[str, dataclasses.Field]:
    """The fields of dataclass `cls` that its constructor takes, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def type_hints(cls) -> dict[str, Any]:
    """Resolved annotations of `cls` (string annotations from `from __future__ import annotations` included)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable forward reference: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, allowed: list[str], where: str, owner: str = "") -> RecipeError:
    """A RecipeError for unknown dotted `key`, suggesting close matches or listing the allowed keys."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    elif len(allowed) <= _MAX_LISTED_KEYS:
        hint = "allowed keys: " + ", ".join(sorted(allowed))
    else:
        hint = f"allowed keys are the fields of {owner}"
    return RecipeError(f"{where}: unknown key '{key}'; {hint}")


def describe(annotation) -> str:
    """A short human name for a type annotation ("float", "list[str]", "int or None", ...)."""
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin is not None:
        args = ", ".join(describe(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]" if args else origin.__name__
    if dataclasses.is_dataclass(annotation):
        return f"a mapping ({annotation.__name__})"
    return getattr(annotation, "__name__", str(annotation))


class _Mismatch(Exception):
    """Raised inside check_value when a value does not fit an annotation (caught to try Union members)."""


def check_value(value, annotation, key: str, where: str):
    """Return `value` checked (and lightly converted) against `annotation`, or raise RecipeError.

    Converted: int -> float for float fields, mappings -> nested dataclasses.
    """
    try:
        return _check(value, annotation, key, where)
    except _Mismatch:
        raise RecipeError(
            f"{where}: {key}: expected {describe(annotation)}, got {value!r} ({type(value).__name__})"
        ) from None


def _check(value, annotation, key, where):
    if annotation is Any or annotation is object or isinstance(annotation, (str, typing.ForwardRef)):
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if str in args and any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = tuple(a for a in args if a is not str)  # `SchedulerType | str`: the str is CLI plumbing
        for member in args:
            try:
                return _check(value, member, key, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_check(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        checked = [check_value(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if len(args) == 2:
            return {k: check_value(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        if any(value == member.value for member in annotation):
            return value  # the dataclass converts the string in its own __post_init__
        raise _Mismatch
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise _Mismatch
        return build_dataclass(annotation, value, key, where)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # an annotation form we do not know: let the class itself judge


def check_section(cls, raw, prefix: str, where: str) -> dict:
    """Check mapping `raw` against dataclass `cls`: unknown keys, missing required keys, value types.

    Returns the checked keyword arguments.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {prefix}: expected a mapping of keys to values, got {raw!r}")
    allowed = init_fields(cls)
    hints = type_hints(cls)
    for name in raw:
        if name not in allowed:
            raise unknown_key_error(f"{prefix}.{name}", list(allowed), where, cls.__name__)
    for name, f in allowed.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key '{prefix}.{name}'")
    return {
        name: check_value(value, hints.get(name, Any), f"{prefix}.{name}", where)
        for name, value in raw.items()
    }


def build_dataclass(cls, raw, prefix: str, where: str):
    """Check `raw` with check_section, then construct `cls`; its own validation errors become RecipeErrors."""
    kwargs = check_section(cls, raw, prefix, where)
    try:
        return cls(**kwargs)
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise RecipeError(f"{where}: {prefix}: {error}") from None
