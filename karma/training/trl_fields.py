"""TRL's config fields per objective, as a table read without importing TRL.

Importing TRL imports torch (8 s and more on a busy CPU), so a typo in a training setting
would cost that long before its one-line error. ``trl_fields.json`` holds, for each objective's
config class, every field's name and value kinds (``int``, ``float``, ``bool``, ``str``,
``null``, ``other``; e.g. ``"float|null"``); the checks of :mod:`karma.training.trl_config`
read it.
``tests/test_training.py`` keeps it equal to TRL's own dataclasses; after a TRL upgrade:
``python -m karma.training.trl_fields``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from functools import cache
from pathlib import Path

from karma.training.objectives import OBJECTIVES

TABLE = Path(__file__).with_name("trl_fields.json")
_SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}

Fields = dict[str, list[str]]


def _kinds(tp: object) -> list[str]:
    """The value kinds of a field type (``other`` for anything but the simple ones)."""
    if isinstance(tp, str):  # an unresolved annotation: nothing is checked
        return ["other"]
    args = typing.get_args(tp) or (tp,)
    return sorted({_SIMPLE.get(a, "other") for a in args})  # type: ignore[call-overload]


def reflect() -> dict[str, Fields]:
    """The table from TRL's own config classes (imports TRL)."""
    out: dict[str, Fields] = {}
    for name, obj in sorted(OBJECTIVES.items()):
        cls = obj.config_class()
        out[name] = {f.name: _kinds(f.type) for f in dataclasses.fields(cls) if f.init}
    return out


@cache
def fields(method: str) -> Fields:
    """The init fields of ``method``'s TRL config, with their value kinds."""
    table = json.loads(TABLE.read_text(encoding="utf-8"))[method]
    return {name: kinds.split("|") for name, kinds in table.items()}


def write() -> None:
    """Regenerate ``trl_fields.json`` from the installed TRL."""
    table = {m: {f: "|".join(k) for f, k in fs.items()} for m, fs in reflect().items()}
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write()
