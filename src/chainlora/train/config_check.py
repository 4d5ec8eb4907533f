"""One line for a config's first problem: pydantic's complaint explained in the schema's words.

pydantic checks keys, types and ranges; this module follows its error location through the
schema and the data to name the dotted key, what it accepts and what it got, with a "did you
mean" hint for a mistyped key. Used by train/config.py for every section of the YAML.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from chainlora.errors import ChainloraError


class ConfigError(ChainloraError):
    """A config's problem at one dotted key: `FILE: dotted.key: what is wrong`. The key and the
    complaint are kept apart so a key set on the command line is blamed on its `--set`."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__(f"{source}: {key}: {message}")
        self.key, self.problem = key, message


def fail(source: str, key: str, message: str) -> ConfigError:
    """The one-line error: `FILE: dotted.key: what is wrong`."""
    return ConfigError(source, key, message)


def _optional_of(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def _describe(tp: Any) -> str:
    """What an annotation accepts, in the words of the error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return "a list of text" if args[0] is str else "a list of integers"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}[tp]


def _locate(model: type[BaseModel], loc: tuple, data: Any, key: str) -> tuple[str, Any, Any, tuple]:
    """Follow pydantic's error location through the schema and the data, as far as it names
    fields and list items: the dotted key, its annotation, its value, and what is left (an
    unknown key, a union member's tag, a key inside a mapping)."""
    tp: Any = model
    for i, part in enumerate(loc):
        inner = _optional_of(tp)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and part in inner.model_fields:
            tp, key = inner.model_fields[part].annotation, f"{key}.{part}" if key else part
        elif isinstance(part, int) and typing.get_origin(inner) is list:
            tp, key = typing.get_args(inner)[0], f"{key}[{part}]"
        else:
            return key, tp, data, loc[i:]
        data = data[part]
    return key, tp, data, ()


def _explain(error: ValidationError, model: type[BaseModel], data: Any, prefix: str,
             source: str) -> ChainloraError:
    """pydantic's first complaint (an unknown key first: a typo explains the rest) as one line."""
    errors = error.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    err = min(unknown, key=lambda e: len(e["loc"])) if unknown else errors[0]
    key, tp, value, rest = _locate(model, err["loc"], data, prefix)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        known = list(tp.model_fields)
        hint = difflib.get_close_matches(str(rest[0]), known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
        return fail(source, f"{key}.{rest[0]}" if key else rest[0], f"unknown key{suggestion}")
    bounds = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
              "greater_than": (">", "gt"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, bound = bounds[kind][0], ctx[bounds[kind][1]]
        got = float(value) if isinstance(bound, float) else value  # float fields have float bounds
        return fail(source, key, f"must be {op} {bound}, got {got}")
    if rest and typing.get_origin(tp) is dict:  # a key or value inside the mapping
        return fail(source, key, "expected a mapping of text to text")
    return fail(source, key or "(top level)", f"expected {_describe(tp)}, got {value!r}")


def validate(model: type[BaseModel], data: Any, source: str, prefix: str = "") -> Any:
    """`model` built from `data`, or the one-line ChainloraError saying what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _explain(e, model, data, prefix, source) from None
