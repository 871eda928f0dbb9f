"""Typed records from YAML mappings: a mapping parsed into frozen dataclasses by their type hints, every value
checked against its field's rule (bounds, choices, an empty list allowed or not); a mistake is ``ParamsError``,
one line naming the key path. ``ofa.pipeline.config`` declares the params with it."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any


class ParamsError(ValueError):
    """A bad value in params.yaml; str() is one line naming the key."""


def rule(*, min: float | None = None, gt: float | None = None, max: float | None = None,
         lt: float | None = None, choices: tuple | None = None, help: str = "", default: Any = dataclasses.MISSING,
         default_factory: Any = dataclasses.MISSING, empty: bool = False) -> Any:
    """A dataclass field with its checks: bounds (min, gt, max, lt), choices, and whether a list may be empty."""
    meta = {"min": min, "gt": gt, "max": max, "lt": lt, "choices": choices, "help": help, "empty": empty}
    return field(default=default, default_factory=default_factory, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}[tp]


def _convert(value: Any, tp: Any, path: str, empty: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner, path, empty)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(f"{path}: got {value!r} ({_type_name(tp)})")
        if not value and not empty:
            raise ParamsError(f"{path}: empty list (at least one entry)")
        return tuple(_convert(v, typing.get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value))
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }[tp]
    if not ok:
        raise ParamsError(f"{path}: got {value!r} ({_type_name(tp)})")
    if tp is float and not math.isfinite(value):
        raise ParamsError(f"{path}: {value!r} is not allowed (a finite number)")
    return value


def _check_range(value: Any, meta: typing.Mapping, path: str) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ParamsError(f"{path}: {value!r} is not allowed (one of {', '.join(map(str, meta['choices']))})")
    bounds = [("min", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("max", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sign in bounds:
        if meta.get(key) is not None and not ok(value, meta[key]):
            allowed = [f"{s} {meta[k] if isinstance(meta[k], int) else format(meta[k], 'g')}"
                       for k, _, s in bounds if meta.get(k) is not None]
            raise ParamsError(f"{path}: {value!r} is out of range ({' and '.join(allowed)})")


def parse(cls: type, raw: Any, path: str) -> Any:
    where = path or "params"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: got {raw!r} (a mapping of {', '.join(f.name for f in dataclasses.fields(cls))})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {path + '.' if path else ''}{close[0]}?" if close else f"allowed: {', '.join(fields)}"
            raise ParamsError(f"{path + '.' if path else ''}{key}: unknown key ({hint})")
    values = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{key}: missing ({_type_name(hints[name])})")
            continue
        values[name] = _convert(raw[name], hints[name], key, f.metadata.get("empty", False))
        _check_range(values[name], f.metadata, key)
    return cls(**values)
