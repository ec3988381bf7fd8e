"""Typed params: read a section of ``params.yaml`` into a dataclass that validates itself.

Each stage's config is a dataclass in its own module; ``from_dict`` rejects unknown keys and
wrong types with a message naming the file and the field.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     tau: float = 0.1
>>> from_dict(Demo, {"tau": 0.2}, where="params.yaml:demo")
Demo(tau=0.2)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from karma.errors import KarmaError

T = TypeVar("T")
PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Load the whole params file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise KarmaError("params file not found", file=p)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise KarmaError(f"not valid YAML: {' '.join(str(err).split())}", file=p) from None
    if not isinstance(data, dict):
        raise KarmaError("top level must be a mapping", file=p, value=type(data).__name__)
    return data


def section(params: dict[str, Any], name: str, *, file: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Return ``params[name]`` as a dict (empty when absent)."""
    value = params.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KarmaError("must be a mapping", file=file, field=name, value=value)
    return value


def _check(tp: Any, value: Any) -> bool:
    """Loose runtime type check for the annotation kinds params use."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check(a, value) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` names the source (``file:section``)."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KarmaError(
                f"unknown key{hint}", file=where, field=key, expected=", ".join(sorted(fields))
            )
    for key, value in data.items():
        tp = hints[key]
        if not _check(tp, value):
            raise KarmaError(
                "wrong type", file=where, field=key, value=value, expected=_describe(tp)
            )
        if tp is float:
            data[key] = float(value)  # YAML's `1` for a float field
    try:
        obj = cls(**data)
    except KarmaError:
        raise
    except (TypeError, ValueError) as err:
        raise KarmaError(str(err), file=where) from None
    return obj
