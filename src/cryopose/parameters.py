"""A method's parameters: one dataclass per method, the single source of their defaults, types,
ranges and documentation.

Each field of a method's ``Params`` dataclass is a parameter: its annotation is its type, its
default the default, and :func:`param` adds a one-line help and, where it has one, a range or a
set of choices. From that one declaration come the checks of a workflow config
(:func:`check_values`), the parsing of the command line's ``--param key=value``
(:func:`parse_pairs`) and the documentation (:func:`describe`, ``cryopose methods``). A rule
between several fields goes in the dataclass's ``__post_init__`` (raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from .errors import InputError

__all__ = ["param", "defaults", "build", "check_values", "validate", "parse_pairs", "describe", "type_name"]


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A parameter field: ``default`` (a list default is copied for each instance), a one-line
    ``help``, and optionally bounds — inclusive ``min``/``max``, exclusive ``above``/``below`` —
    or the allowed ``choices``."""
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
        "choices": tuple(choices) if choices else None,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fits(hint, value) -> bool:
    """Whether ``value`` (as read from YAML or JSON) has the type ``hint``: bool before int (True is
    an int in Python but no seed), 2.0 is no integer count, an int is a fine float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_fits(args[0], v) if args else True for v in value)
    return True


def type_name(hint) -> str:
    """``float | None`` → ``"a number or null"``: what a user must write."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list of numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def defaults(cls) -> dict:
    """The default parameters of ``cls`` as a plain dict (what a model record stores)."""
    return dataclasses.asdict(cls())


def _range_problem(f: dataclasses.Field, value) -> str | None:
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(map(repr, meta['choices']))}"
    if value is None or not _is_number(value):
        return None
    for bound, fails, sign in (
        ("min", value.__lt__, ">="),
        ("above", value.__le__, ">"),
        ("max", value.__gt__, "<="),
        ("below", value.__ge__, "<"),
    ):
        if meta.get(bound) is not None and fails(meta[bound]):
            return f"must be {sign} {meta[bound]:g}"
    return None


def validate(instance) -> None:
    """Check a parameters object's own fields (types, bounds, choices) from their declarations:
    a ``__post_init__`` calls it, so a dataclass built directly is held to the same rules."""
    check_values(type(instance), dataclasses.asdict(instance), where=type(instance).__name__)


def check_values(cls, values: dict, where: str = "--param") -> None:
    """Known keys, each of its declared type and within its range; :class:`InputError` naming the
    key, the value and what was expected."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(
            f"unknown parameter(s) {', '.join(unknown)}; this method takes: {', '.join(sorted(fields)) or 'none'}",
            where=where,
        )
    hints = _hints(cls)
    for key, value in values.items():
        default = _default(fields[key])
        if not _fits(hints[key], value):
            raise InputError(f"{key} must be {type_name(hints[key])} (default {default!r}), got {value!r}", where=where)
        problem = _range_problem(fields[key], value)
        if problem:
            raise InputError(f"{key} {problem}, got {value!r}", where=where)


def build(cls, values: dict | None = None, where: str = "--param"):
    """``cls(**values)`` after :func:`check_values`; a rule between fields that fails
    (``ValueError`` from ``__post_init__``) becomes an :class:`InputError` too."""
    values = dict(values or {})
    check_values(cls, values, where)
    try:
        return cls(**values)
    except InputError as err:
        raise InputError(err.problem, where=where) from err
    except (TypeError, ValueError) as err:
        raise InputError(str(err), where=where) from err


def parse_pairs(cls, pairs: list[str] | None) -> dict:
    """``["seed=3", "lr=1e-3"]`` → ``{"seed": 3, "lr": 0.001}``: values parsed as JSON when they
    can be (a string parameter is a JSON string's content, else its text: ``device=0``), else kept
    as strings; each checked
    against ``cls`` (:func:`check_values`, naming the key)."""
    hints = _hints(cls)
    values: dict = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"parameter {pair!r} is not of the form key=value", where="--param")
        if key not in hints:
            raise InputError(
                f"unknown parameter {key!r}; this method takes: {', '.join(sorted(hints)) or 'none'}", where="--param"
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if hints[key] is str and not isinstance(value, str):
            # A string parameter keeps its text when that reads as another JSON value (device=0);
            # a JSON string is its content (the workflow passes every config value as JSON).
            value = text
        values[key] = value
        check_values(cls, {key: value}, where=f"--param {key}")
    return values


def describe(cls) -> list[dict]:
    """One row per parameter: name, type, default, help, range/choices (the docs' table)."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        limits = ""
        if meta.get("choices"):
            limits = "one of " + ", ".join(map(str, meta["choices"]))
        else:
            lo = (
                f"{meta['min']:g} ≤ "
                if meta.get("min") is not None
                else f"{meta['above']:g} < "
                if meta.get("above") is not None
                else ""
            )
            hi = (
                f" ≤ {meta['max']:g}"
                if meta.get("max") is not None
                else f" < {meta['below']:g}"
                if meta.get("below") is not None
                else ""
            )
            limits = f"{lo}{f.name}{hi}" if lo or hi else ""
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints[f.name]),
                "default": _default(f),
                "help": meta.get("help", ""),
                "limits": limits,
            }
        )
    return rows
