"""The stage registry: dvc.yaml and stages/*.py are generated, code deps are import closures,
each stage reads only the settings it declares, and the house rules hold (layers, sizes, names)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from karma.core.errors import KarmaError
from karma.core.stage import Stage, load_stage, settings_view
from karma.dvcyaml import generated_files, import_closure
from karma.params import Params
from karma.registry import PIPELINE, commands

REPO = Path(__file__).resolve().parents[1]


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def test_committed_dvc_yaml_and_stage_scripts_are_the_generated_ones() -> None:
    for path, text in generated_files().items():
        assert (REPO / path).read_text() == text, f"{path} is stale: run karma dvc-yaml --write"
    scripts = {p.name for p in (REPO / "stages").glob("*.py")}
    assert scripts == {p.name for p in generated_files() if p.parent.name == "stages"}


def test_every_stage_has_one_name() -> None:
    """Stage name = dvc.yaml stage = stages/<name>.py = STAGE.name; commands come from it."""
    assert list(_stages()) == [w.name for w in PIPELINE]
    for w in PIPELINE:  # evaluate_base is the evaluate stage without a baseline
        assert load_stage(w.ref).name == w.name.removesuffix("_base")
        assert f"stages.{w.name} " in _stages()[w.name]["cmd"] + " "
    assert commands()["select"][0] == "karma.selection.select:STAGE"
    assert "evaluate_base" not in commands() and "tau-sweep" in commands()


def _runtime_modules(module: str) -> set[str]:
    code = (
        f"import sys, karma.command, {module}; "
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] == 'karma' and getattr(m, '__file__', None))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=REPO).stdout  # fmt: skip
    return {Path(f).resolve().relative_to(REPO).as_posix() for f in out.split()}


@pytest.mark.parametrize("wiring", PIPELINE, ids=lambda w: w.name)
def test_code_deps_hold_every_module_the_stage_imports(wiring) -> None:
    """What Python actually loads for the stage (an independent check of the AST closure) is
    listed in its deps: editing any of those files makes DVC re-run the stage."""
    deps = set(_stages()[wiring.name]["deps"])
    loaded = _runtime_modules(wiring.ref.partition(":")[0])
    assert loaded and loaded <= deps, sorted(loaded - deps)


def test_task_deps_hold_the_karma_code_task_yamls_load() -> None:
    """The ``!function karma.*`` code of karma's task YAMLs (outside any import closure) is in
    the deps of every lm-eval stage, so that editing it re-runs them."""
    import re

    from karma.registry import TASK_DEPS

    tasks = REPO / "karma/evaluation/tasks"
    named = {
        m.rpartition(".")[0].replace(".", "/") + ".py"
        for path in tasks.rglob("*.yaml")
        for m in re.findall(r"!function\s+(karma\.[\w.]+)", path.read_text())
    }
    assert {"karma/evaluation/extract.py", "karma/evaluation/mmlu.py"} <= named
    assert named <= set(TASK_DEPS)
    for name in ("benchmark", "evaluate_base", "evaluate", "sp_evaluate"):
        assert named <= set(_stages()[name]["deps"]), name


def _layouts_module() -> str:
    """The module that defines ``to_trl`` (the TRL layout select and train apply)."""
    found = [p for p in (REPO / "karma/pairing").glob("*.py") if "\ndef to_trl(" in p.read_text()]
    assert len(found) == 1, found
    return found[0].relative_to(REPO).as_posix()


def test_closure_follows_function_local_imports() -> None:
    files = {p.relative_to(REPO).as_posix() for p in import_closure("karma.selection.select")}
    assert _layouts_module() in files  # imported inside a function of select
    assert "karma/report/report.py" not in files


def _status(root: Path) -> dict[str, set[str]]:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                          capture_output=True, text=True, check=True)  # fmt: skip
    out: dict[str, set[str]] = {}
    for stage, changes in json.loads(proc.stdout or "{}").items():
        for change in changes:
            if isinstance(change, dict):
                for path, what in change.get("changed deps", {}).items():
                    if what == "modified":
                        out.setdefault(stage, set()).add(path)
    return out


def test_editing_the_layouts_module_marks_select_and_train_changed(tmp_path: Path) -> None:
    """The module that holds ``to_trl`` shapes the pairs select and train read: editing it makes
    DVC re-run both (and not kinship, which never imports it)."""
    import re

    from karma.registry import PATHS

    layouts = _layouts_module()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for tree in ("karma", "stages"):
        shutil.copytree(REPO / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    init = [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"]
    subprocess.run(init, cwd=tmp_path, check=True)
    names = ("kinship", "select", "train")
    rels = []
    for name in names:  # stand-ins for every data dep and output, then lock the three stages
        spec = _stages()[name]
        entries = [*spec["deps"], *spec.get("outs", []), *spec.get("metrics", []),
                   *spec.get("plots", [])]  # fmt: skip
        rels += [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    rels = [re.sub(r"\$\{path\.(\w+)\}", lambda m: PATHS[m.group(1)], r) for r in rels]
    for rel in sorted(rels, key=lambda r: -r.count("/")):  # nested files first
        target = tmp_path / rel
        if not target.exists() and "$" not in rel:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")
    commit = [sys.executable, "-m", "dvc", "commit", "-f", "-q", *names]
    subprocess.run(commit, cwd=tmp_path, check=True, capture_output=True)
    assert not any(_status(tmp_path).get(n) for n in names)
    with (tmp_path / layouts).open("a") as f:
        f.write("\n# an edit\n")
    changed = {s for s, paths in _status(tmp_path).items() if layouts in paths and s in names}
    assert changed == {"select", "train"}, (layouts, changed)


def test_a_stage_reads_only_the_settings_it_declares() -> None:
    stage = Stage(name="demo", settings=("select", "seed", "preferences.dataset"), paths=object,
                  run=lambda p, q: {})  # fmt: skip
    view = settings_view(stage, Params())
    assert view.select.ratio == 0.4 and view.seed == 0
    assert view.preferences.dataset == Params().preferences.dataset
    assert view.limits.max_yaml_bytes > 0  # operational limits: always readable
    for read in (lambda: view.train, lambda: view.preferences.rating, lambda: view.kinship):
        with pytest.raises(KarmaError, match="does not declare"):
            read()


def test_stage_modules_read_no_file_at_import() -> None:
    """Importing any karma module opens no file of the project (suites.yaml is read on use)."""
    code = (
        "import builtins, io, pathlib, sys\n"
        "opened = []\n"
        "real = io.open\n"
        "def spy(f, *a, **k):\n"
        "    opened.append(str(f)); return real(f, *a, **k)\n"
        "builtins.open = io.open = spy\n"
        "pathlib.Path.read_text = lambda self, *a, **k: (opened.append(str(self)), '')[1]\n"
        "import pkgutil, importlib, karma\n"
        "for m in pkgutil.walk_packages(karma.__path__, 'karma.'):\n"
        "    if '.tasks' not in m.name: importlib.import_module(m.name)\n"
        "print('\\n'.join(o for o in opened if '/karma/' in o and 'site-packages' not in o))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=REPO).stdout  # fmt: skip
    read = [f for f in out.splitlines() if Path(f).is_file() and "__pycache__" not in f]
    assert [f for f in read if not f.endswith(".py")] == []


# --------------------------------------------------------------------------- house rules

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: Modules allowed over the limit (none).
OVERSIZE: set[str] = set()


def _modules() -> list[Path]:
    return sorted(p for p in (REPO / "karma").rglob("*.py") if "tasks" not in p.parts)


def test_no_module_is_over_600_lines() -> None:
    big = {p.relative_to(REPO).as_posix() for p in _modules()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES}  # fmt: skip
    assert big == OVERSIZE, f"over {MAX_MODULE_LINES} lines: {sorted(big)}"


def _is_njit(node: ast.AST) -> bool:
    return any("njit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


#: Functions allowed over the limit (none).
LONG: set[str] = set()


def test_no_function_is_over_80_lines_but_numba_kernels() -> None:
    long = []
    for path in _modules():
        rel = path.relative_to(REPO).as_posix()
        if rel in OVERSIZE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _is_njit(node):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG:
                    long.append(f"{rel}:{node.name} ({n})")
    assert long == []


def test_no_private_name_is_imported_from_another_module() -> None:
    used = []
    for path in [*_modules(), *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("karma"):
                used += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_") and a.name != "__version__"]  # fmt: skip
    assert set(used) <= PRIVATE, sorted(set(used) - PRIVATE)


#: Private names allowed to cross modules (none).
PRIVATE: set[str] = set()
