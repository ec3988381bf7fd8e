"""Reading experiments: ``dvc exp show`` rows, their diagnostics and per-item samples.

A row is ``{name, rev, params, metrics}``; metrics keys are ``<file stem>:<key>``
(``eval:policy.ifeval.score``), from the DVC metrics (``metrics/headline.json``) and the
git-tracked diagnostics of each experiment (``diagnostics/<stage>.json`` at its rev).
"""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError
from karma.report.headline import DIAGNOSTICS

log = logging.getLogger(__name__)

Row = dict[str, Any]
SampleLoader = Callable[[Row, str], "dict[str, dict[str, float]] | None"]
#: Per-sample results the evaluate stages keep in the DVC cache (one row per item).
SAMPLE_FILES = {
    "policy": "data/eval/policy/samples.parquet",
    "base": "data/eval/base/samples.parquet",
}


def strip_key(key: str) -> str:
    """``metrics/eval.json:policy.x`` -> ``eval:policy.x`` (DVC prefixes names files share)."""
    if ":" not in key:
        return key
    path, name = key.split(":", 1)
    return name if Path(path).name == "params.yaml" else f"{Path(path).stem}:{name}"


def get(metrics: dict[str, Any], key: str) -> Any:
    """``metrics[key]``, where ``file:name`` also matches a plain ``name`` that DVC left bare."""
    if key in metrics:
        return metrics[key]
    return metrics.get(key.split(":", 1)[-1])


def num(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and not math.isnan(value) else None


def collect_experiments(repo: str | Path = ".", *, workspace: bool = False) -> list[Row]:
    """Experiments derived from HEAD (baseline included) as ``{name, rev, params, metrics}``.

    Metrics keep numbers and the ``meta.*`` strings (base model, suite, protocol...).
    """
    import dvc.api
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as r:
            params_keys = set()
            for rev_params in r.params.show().values():
                for file_params in rev_params.get("data", {}).values():
                    params_keys |= set(flatten(file_params.get("data", {})))
        raw = dvc.api.exp_show(repo=str(repo))
    except Exception as err:  # dvc raises many types; report one line
        raise KarmaError(f"cannot read DVC experiments: {err}", file=repo) from None
    rows = []
    for item in raw:
        if item.get("rev") == "workspace" and not workspace:
            continue
        params, metrics = {}, {}
        for key, value in item.items():
            if key in {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}:
                continue
            name = strip_key(key)
            if name in params_keys:
                params[name] = value
            elif num(value) is not None:
                metrics[name] = float(value)
            elif isinstance(value, str) and name.split(":")[-1].startswith("meta."):
                metrics[name] = value
        label = item.get("Experiment") or item.get("rev") or "?"
        rows.append(
            {"name": str(label), "rev": item.get("rev"), "params": params, "metrics": metrics}
        )
    if not rows:
        raise KarmaError("no experiments with metrics: run `dvc repro` or `dvc exp run` first")
    for row in rows:
        add_diagnostics(row, repo)
    return rows


def git_file(repo: str | Path, rev: str | None, path: str) -> bytes | None:
    """A git-tracked file at ``rev`` (the workspace's file for ``None``/``workspace``)."""
    if rev in (None, "", "workspace"):
        full = Path(repo, path)
        return full.read_bytes() if full.is_file() else None
    done = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, check=False
    )
    return done.stdout if done.returncode == 0 else None


def add_diagnostics(row: Row, repo: str | Path) -> None:
    """Merge the experiment's ``diagnostics/<stage>.json`` (git-tracked outputs at its rev) into
    its metrics as ``<stage>:<key>``; metrics DVC already gave keep their value."""
    for stage in DIAGNOSTICS:
        data = git_file(repo, row.get("rev"), f"diagnostics/{stage}.json")
        if data is None:
            continue
        for key, value in json.loads(data).items():
            name = f"{stage}:{key}"
            if name in row["metrics"]:
                continue
            if num(value) is not None:
                row["metrics"][name] = float(value)
            elif isinstance(value, str):
                row["metrics"][name] = value


def flatten(d: dict[str, Any], prefix: str = "") -> Iterable[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flatten(v, key + ".")
        else:
            yield key


def samples_table(frame: Any) -> dict[str, dict[str, float]]:
    """``{benchmark: {item: score}}`` from a per-sample frame (one row per item).

    Column names accepted: benchmark|bench|task, doc_id|item|item_id|id, score|value|acc.
    """
    cols = set(frame.columns)

    def pick(*names: str) -> str:
        found = next((n for n in names if n in cols), None)
        if found is None:
            raise KarmaError(f"per-sample results need a column {' or '.join(names)}")
        return found

    bench, item, score = (
        pick("benchmark", "bench", "task"),
        pick("doc_id", "item", "item_id", "id"),
        pick("score", "value", "acc"),
    )
    out: dict[str, dict[str, list[float]]] = {}
    for b, i, s in zip(*(frame[c].to_list() for c in (bench, item, score)), strict=True):
        out.setdefault(str(b), {}).setdefault(str(i), []).append(float(s))
    return {b: {i: sum(v) / len(v) for i, v in items.items()} for b, items in out.items()}


def sample_loader(repo: str | Path) -> SampleLoader:
    """Per-sample results of an experiment (``dvc.api.open`` at its rev), cached; None if absent."""
    import dvc.api
    import polars as pl

    cache: dict[tuple[str, str], dict[str, dict[str, float]] | None] = {}

    def load(row: Row, who: str) -> dict[str, dict[str, float]] | None:
        rev = str(row.get("rev") or "")
        if (rev, who) not in cache:
            path = SAMPLE_FILES[who]
            try:
                if rev in ("", "workspace"):
                    frame = pl.read_parquet(Path(repo, path))
                else:
                    with dvc.api.open(path, repo=str(repo), rev=rev, mode="rb") as fh:
                        frame = pl.read_parquet(io.BytesIO(fh.read()))
                cache[rev, who] = samples_table(frame)
            except Exception as err:  # not in the cache, not an output of that run, ...
                log.debug("no per-sample results %s at %s: %s", path, rev, err)
                cache[rev, who] = None
        return cache[rev, who]

    return load


def row_samples(row: Row, who: str) -> dict[str, dict[str, float]] | None:
    """Per-sample results put into a row by hand (tests): ``row["samples"][who]``."""
    return (row.get("samples") or {}).get(who)
