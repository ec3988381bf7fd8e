"""The names in lm-eval's task registry, read fast.

lm-eval's ``TaskManager()`` parses all of its ~14,000 task YAML files to list the names (about
6 s); checking a user's task name before a run needs only the ``task`` / ``group`` / ``tag`` /
``class`` keys. This scan reads those keys line by line, follows ``include`` files as lm-eval
does (the file's own keys win), and takes well under a second. A test keeps it equal to
``TaskManager().all_tasks`` for the pinned lm-eval.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

_KEY = re.compile(r"""^['"]?(task|group|tag|include|class)['"]?:[ \t]*(.*?)[ \t]*(?:#.*)?$""")
_ITEM = re.compile(r"^[ \t]*-[ \t]*(\S.*?)[ \t]*$")
_MAX_INCLUDE_DEPTH = 8

Keys = dict[str, list[str]]


def _unquote(text: str) -> str:
    return text.strip().strip("'\"")


def _keys(text: str) -> Keys:
    """The name-bearing top-level keys of one task YAML (values as lists of strings)."""
    out: Keys = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        values = out.setdefault(key, [])
        if value.startswith("["):
            values.extend(_unquote(v) for v in value.strip("[]").split(",") if v.strip())
        elif value:
            values.append(value if value.startswith("!") else _unquote(value))
        else:  # a block list follows
            for item in lines[i + 1 :]:
                im = _ITEM.match(item)
                if not im:
                    break
                values.append(_unquote(im.group(1)))
    return out


class _Scan:
    """One pass over a task directory, memoising each file's keys (includes are shared)."""

    def __init__(self) -> None:
        self.files: dict[Path, Keys] = {}

    def raw(self, path: Path) -> Keys:
        if path not in self.files:
            try:
                self.files[path] = _keys(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                self.files[path] = {}
        return self.files[path]

    def resolved(self, path: Path, depth: int = 0) -> Keys:
        keys = dict(self.raw(path))
        if depth < _MAX_INCLUDE_DEPTH:
            for name in keys.get("include", []):
                inc = path.parent / name
                if inc.is_file():
                    for key, value in self.resolved(inc, depth + 1).items():
                        keys.setdefault(key, value)
        return keys


def names_in(root: Path) -> frozenset[str]:
    """Every task, group and tag name defined by the YAML files under ``root``."""
    scan = _Scan()
    names: set[str] = set()
    for path in sorted(root.glob("**/*.yaml")):
        if "__pycache__" in path.parts:
            continue
        keys = scan.resolved(path)
        task = (keys.get("task") or [""])[0]
        if keys.get("group") and "class" not in keys:  # a group (its tags name no entry)
            names.add(keys["group"][0])
        elif task and not task.startswith("!"):  # a task, YAML- or Python-defined
            names.add(task)
            names.update(t for t in keys.get("tag", []) if not t.startswith("!"))
    return frozenset(names)


@cache
def registry_names() -> frozenset[str]:
    """The names of lm-eval's own task registry (the installed package's ``tasks`` folder)."""
    spec = importlib.util.find_spec("lm_eval")  # its path, without importing it (about 1 s)
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    return names_in(Path(next(iter(spec.submodule_search_locations))) / "tasks")
