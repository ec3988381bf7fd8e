"""The paper's tables from DVC experiments, as Markdown and as one self-contained HTML page.

Experiments (``dvc exp show``) are grouped by base model x training method (``meta.*`` keys of
``metrics/eval.json``, else the params); runs that differ only in ``seed`` are replicates of one
configuration (mean ± sd, n). Columns are the benchmarks in the paper's order plus its Total;
every cell has its 95 % interval and a mark when it differs significantly from the baseline
(the RLAIF row, else the untrained base). With two or more bases the pooled view (the paper's
Table 2) averages the bases per strategy.

>>> rows = [{"name": "exp-a", "params": {"kinship": "sim", "train.method": "dpo",
...          "base_model.source": "m"}, "metrics": {"policy.arc_easy.score": 0.5,
...          "base.arc_easy.score": 0.4}}]
>>> print(markdown_table(rows).splitlines()[0])
### DPO · base m
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import shutil
import statistics
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from karma.core.errors import KarmaError
from karma.core.settings import BENCHMARKS, DEFAULT_GROUPS, is_operational, iter_fields
from karma.core.stats import mcnemar_exact
from karma.params import Params

log = logging.getLogger(__name__)

STRATEGY_ORDER = ["rlaif", "score", "sim", "score_sim", "random"]
STRATEGY_LABEL = {
    "rlaif": "RLAIF (baseline)",
    "score": "KARMA score",
    "sim": "KARMA sim",
    "score_sim": "KARMA score_sim",
    "random": "random pairs",
}
COLORS = {
    "": "#9e9e9e",
    "rlaif": "#e08a2c",
    "score": "#3b6ea5",
    "sim": "#4c9a5b",
    "score_sim": "#8a5aa8",
    "random": "#8d6e63",
}
BENCH_LABEL = {
    "ifeval": "IFEval",
    "mmlu_stem": "MMLU-STEM",
    "mmlu_pro": "MMLU-Pro",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
}
#: The paper's Table 2 Total: its five percent-scale benchmarks (it reports MMLU-Pro as a
#: fraction, and leaves it out of the Total); the Total is their sum.
TOTAL_BENCHMARKS = tuple(b for b in BENCHMARKS if b != "mmlu_pro")
TOTAL = "total"
SUITE_NOTE = {
    "embedded": "the project's offline mini suites, 40-49 items per benchmark: a smoke test "
    "of the pipeline, not comparable with the paper's numbers",
    "lm_eval": "lm-eval's full tasks",
    "paper": "the paper's protocol (generative prompting, answer extraction)",
    "embedded_paper": "the paper's protocol on the offline mini suites (40-49 items per "
    "benchmark): a smoke test",
}
#: Per-sample results the evaluate stages keep in the DVC cache (one row per item).
SAMPLE_FILES = {
    "policy": "data/eval/policy/samples.parquet",
    "base": "data/eval/base/samples.parquet",
}
# Data-side columns: (label, metric); ``file:key`` names a key that several metrics files share.
DATA_KEYS = [
    ("pairs", "preferences:pairs"),
    ("mean kinship", "preferences:mean_kinship"),
    ("mean S_pref gap", "preferences:mean_s_pref_gap"),
    ("rating agreement", "preferences:rating_agree"),
    ("pairs trained", "select:pairs_kept"),
    ("train loss", "train:train_loss"),
    ("train time (s)", "train:wall_time_s"),
]
HELDOUT = [
    ("loss", "loss"),
    ("reward accuracy", "reward_accuracy"),
    ("reward margin", "reward_margin"),
]
# The headline metric of a benchmark in metrics without ``<who>.<bench>.score`` (older runs).
PRIMARY = ["prompt_level_strict_acc", "acc_norm", "exact_match", "acc"]
CURVES = ["loss", "rewards/accuracies", "rewards/margins", "learning_rate"]
# Params that name the table a run belongs to, or its replicate, not its configuration.
GROUPING = {"seed", "kinship", "train.method", "evaluate.suite"}
Z = 1.959963984540054  # two-sided 95 %
Row = dict[str, Any]
SampleLoader = Callable[[Row, str], "dict[str, dict[str, float]] | None"]


# --------------------------------------------------------------------------- reading


def _strip(key: str) -> str:
    """``metrics/eval.json:policy.x`` -> ``eval:policy.x`` (DVC prefixes names files share)."""
    if ":" not in key:
        return key
    path, name = key.split(":", 1)
    return name if Path(path).name == "params.yaml" else f"{Path(path).stem}:{name}"


def _get(metrics: dict[str, Any], key: str) -> Any:
    """``metrics[key]``, where ``file:name`` also matches a plain ``name`` that DVC left bare."""
    if key in metrics:
        return metrics[key]
    return metrics.get(key.split(":", 1)[-1])


def _num(value: Any) -> float | None:
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
                    params_keys |= set(_flatten(file_params.get("data", {})))
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
            name = _strip(key)
            if name in params_keys:
                params[name] = value
            elif _num(value) is not None:
                metrics[name] = float(value)
            elif isinstance(value, str) and name.split(":")[-1].startswith("meta."):
                metrics[name] = value
        label = item.get("Experiment") or item.get("rev") or "?"
        rows.append(
            {"name": str(label), "rev": item.get("rev"), "params": params, "metrics": metrics}
        )
    if not rows:
        raise KarmaError("no experiments with metrics: run `dvc repro` or `dvc exp run` first")
    return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterable[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
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


def _row_samples(row: Row, who: str) -> dict[str, dict[str, float]] | None:
    """Per-sample results put into a row by hand (tests): ``row["samples"][who]``."""
    return (row.get("samples") or {}).get(who)


# --------------------------------------------------------------------------- statistics
# Small helpers to be swapped for karma.core.stats once it is merged (same signature as
# karma.core.stats.paired, plus 2-D inputs for replicates).


@dataclass
class Estimate:
    """A number with its 95 % interval (``lo``/``hi`` None when unknown), and its seed spread."""

    value: float
    lo: float | None = None
    hi: float | None = None
    sd: float | None = None
    n: int = 1
    p: float | None = None
    how: str = ""

    @property
    def se(self) -> float | None:
        """Standard error implied by the interval."""
        return None if self.lo is None or self.hi is None else (self.hi - self.lo) / (2 * Z)

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval lies above / below 0 (a difference that is significant)."""
        if self.lo is not None and self.lo > 0:
            return 1
        return -1 if self.hi is not None and self.hi < 0 else 0


def paired(a: np.ndarray, b: np.ndarray, *, seed: int, n_boot: int = 2000) -> dict[str, float]:
    """mean(a) - mean(b) with a seeded paired bootstrap 95 % interval over items.

    :func:`karma.core.stats.paired` for one run per side, extended to seed replicates:

    ``a``/``b`` are scores per item, or per (replicate, item) for several seeds: items are
    resampled jointly on both sides (paired), replicates independently on each side.
    ``p`` (exact McNemar) is given for one replicate per side with 0/1 scores.
    """
    a2, b2 = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a2.shape[1] != b2.shape[1] or a2.shape[1] == 0:
        raise ValueError("paired: a and b need the same, non-zero number of items")
    rng = np.random.default_rng(seed)
    m = a2.shape[1]
    chunk = max(1, 2_000_000 // (m * max(a2.shape[0], b2.shape[0])))
    draws = []
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)

        def side(x: np.ndarray, k: int = k) -> np.ndarray:
            if x.shape[0] == 1:
                return np.broadcast_to(x[0], (k, m))
            return x[rng.integers(0, x.shape[0], size=(k, x.shape[0]))].mean(axis=1)

        diff = side(a2) - side(b2)
        items = rng.integers(0, m, size=(k, m))
        draws.append(np.take_along_axis(diff, items, axis=1).mean(axis=1))
    d = np.concatenate(draws)
    out = {
        "score": float(a2.mean() - b2.mean()),
        "ci_low": float(np.percentile(d, 2.5)),
        "ci_high": float(np.percentile(d, 97.5)),
        "n": float(m),
    }
    binary = np.isin(a2, (0.0, 1.0)).all() and np.isin(b2, (0.0, 1.0)).all()
    if a2.shape[0] == b2.shape[0] == 1 and binary:
        out["p"] = mcnemar_exact(a2[0], b2[0])
    return out


def replicates(ests: Sequence[Estimate]) -> Estimate:
    """Mean ± sd over seeds; interval from sd²/n (seed noise) + mean se² (shared items)."""
    if len(ests) == 1:
        return ests[0]
    vals = [e.value for e in ests]
    n, mean = len(vals), math.fsum(vals) / len(vals)
    sd = statistics.stdev(vals)
    ses = [e.se for e in ests]
    if any(s is None for s in ses):
        return Estimate(mean, sd=sd, n=n)
    se = math.sqrt(sd**2 / n + math.fsum(s**2 for s in ses) / n)  # type: ignore[operator]
    return Estimate(mean, mean - Z * se, mean + Z * se, sd=sd, n=n, how=ests[0].how)


def linear(ests: Sequence[Estimate], weights: Sequence[float], how: str = "") -> Estimate:
    """sum w·x of independent estimates (normal approximation for the interval)."""
    value = math.fsum(w * e.value for e, w in zip(ests, weights, strict=True))
    ses = [e.se for e in ests]
    if any(s is None for s in ses):
        return Estimate(value, how=how)
    se = math.sqrt(math.fsum((w * s) ** 2 for s, w in zip(ses, weights, strict=True)))  # type: ignore[operator]
    return Estimate(value, value - Z * se, value + Z * se, how=how)


def _seed_of(seed: int, *parts: str) -> int:
    """A reproducible sub-seed per comparison (independent of the order of the tables)."""
    return zlib.crc32(":".join([str(seed), *parts]).encode())


# --------------------------------------------------------------------------- tables


@dataclass
class Line:
    """One table row: the untrained base, or a configuration with its replicate runs."""

    label: str
    strategy: str
    rows: list[Row]
    cells: dict[str, Estimate]
    untrained: bool = False
    key: tuple[Any, ...] = ()
    diffs: dict[str, Estimate] = field(default_factory=dict)
    bold: set[str] = field(default_factory=set)
    at_or_above: set[str] = field(default_factory=set)
    parts: dict[str, Line] = field(default_factory=dict)  # pooled: the line of each base

    @property
    def n(self) -> int:
        """Number of replicate runs (seeds)."""
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        """The experiments this line was read from."""
        return [r["name"] for r in self.rows]


@dataclass
class Table:
    """A paper-style table: the untrained base first, then each configuration."""

    method: str
    suite: str
    protocol: str
    bases: list[str]
    benches: list[str]
    items: dict[str, str]
    lines: list[Line]
    reference: Line
    pooled: bool = False

    @property
    def columns(self) -> list[str]:
        """Benchmark columns, then the Total when every Total benchmark is there."""
        total = all(b in self.benches for b in TOTAL_BENCHMARKS)
        return [*self.benches, *([TOTAL] if total else [])]

    @property
    def title(self) -> str:
        """``DPO · base X`` / ``DPO · pooled over 2 base models``."""
        who = (
            f"pooled over {len(self.bases)} base models" if self.pooled else f"base {self.bases[0]}"
        )
        return f"{self.method.upper()} · {who}"


def _meta(row: Row, key: str, param: str | None = None) -> str | None:
    """A ``meta.<key>`` of the run's metrics (eval.json first), else the param; as text."""
    for file in ("eval", "train", "select", "preferences"):
        value = _get(row["metrics"], f"{file}:meta.{key}")
        if value is not None:
            break
    else:
        value = row["params"].get(param) if param else None
    if value is None:
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _score(row: Row, who: str, bench: str) -> Estimate | None:
    """``<who>.<bench>.score`` with its interval (older metrics: the headline metric ± stderr)."""
    m = row["metrics"]

    def num(key: str) -> float | None:
        return _num(_get(m, f"eval:{who}.{bench}.{key}"))

    value = num("score")
    se = num("stderr")
    if value is None:
        metric = next((p for p in PRIMARY if num(p) is not None), None)
        if metric is None:
            return None
        value, se = num(metric), num(f"{metric}_stderr")
    lo, hi = num("ci_low"), num("ci_high")
    if (lo is None or hi is None) and se is not None:
        lo, hi = value - Z * se, value + Z * se  # type: ignore[operator]
    return Estimate(value, lo, hi)  # type: ignore[arg-type]


def _benches(rows: Sequence[Row]) -> list[str]:
    """Benchmarks with a policy score, in the paper's order (others after, by name)."""
    found = set()
    for row in rows:
        for key in row["metrics"]:
            name = key.split(":")[-1]
            if name.startswith("policy.") and name.count(".") >= 2:
                found.add(name.split(".")[1])
    found = {b for b in found if any(_score(r, "policy", b) for r in rows)}
    return [b for b in BENCHMARKS if b in found] + sorted(found - set(BENCHMARKS))


def _items(rows: Sequence[Row], bench: str) -> str:
    counts = set()
    for row in rows:
        n = _num(_get(row["metrics"], f"eval:meta.items.{bench}"))
        n = n if n is not None else _num(_get(row["metrics"], f"eval:policy.{bench}.n"))
        if n is not None:
            counts.add(int(n))
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    return f"{lo} items" if lo == hi else f"{lo}-{hi} items"


def _total(cells: dict[str, Estimate]) -> Estimate | None:
    if not all(b in cells for b in TOTAL_BENCHMARKS):
        return None
    parts = [cells[b] for b in TOTAL_BENCHMARKS]
    return linear(parts, [1.0] * len(parts))


def _operational() -> set[str]:
    return {k for k, info in iter_fields(Params) if is_operational(info)}


def _config(row: Row, skip: set[str]) -> tuple[tuple[str, str], ...]:
    """The params that make a run's configuration (not its table, not its seed)."""
    return tuple(
        sorted(
            (k, json.dumps(v, sort_keys=True, default=str))
            for k, v in row["params"].items()
            if k not in skip and not k.startswith("base_model.")
        )
    )


def _label(strategy: str, varying: dict[str, str]) -> str:
    label = STRATEGY_LABEL.get(strategy, strategy or "?")
    select = varying.pop("select.method", None)
    if select and json.loads(select) != "none":
        label += f" + {json.loads(select)} selection"
    extra = ", ".join(f"{k}={json.loads(v)}" for k, v in sorted(varying.items()))
    return f"{label} ({extra})" if extra else label


def _line_cells(rows: Sequence[Row], who: str, benches: Sequence[str]) -> dict[str, Estimate]:
    """Per benchmark (and Total) the runs' scores, aggregated over the replicate runs."""
    cells: dict[str, Estimate] = {}
    for bench in benches:
        ests = [_score(r, who, bench) for r in rows]
        if all(e is not None for e in ests):
            cells[bench] = replicates(ests)  # type: ignore[arg-type]
    totals = [_total({b: e for b in benches if (e := _score(r, who, b)) is not None}) for r in rows]
    if all(t is not None for t in totals):
        cells[TOTAL] = replicates(totals)  # type: ignore[arg-type]
    return cells


def _delta(row: Row, bench: str) -> Estimate | None:
    """eval.json's paired policy-vs-base difference for one run."""
    m = row["metrics"]
    value = _num(_get(m, f"eval:delta.{bench}.score"))
    if value is None:
        return None
    lo, hi = (
        _num(_get(m, f"eval:delta.{bench}.ci_low")),
        _num(_get(m, f"eval:delta.{bench}.ci_high")),
    )
    p = _num(_get(m, f"eval:delta.{bench}.p"))
    return Estimate(value, lo, hi, p=p, how="eval.json paired delta")


def _compare(
    line: Line, ref: Line, bench: str, *, samples: SampleLoader, seed: int, n_boot: int
) -> Estimate | None:
    """``line - ref`` for one benchmark: paired where per-sample results exist, else unpaired.

    Pooled lines: the mean over the bases of each base's difference.
    """
    if bench not in line.cells or bench not in ref.cells:
        return None
    if line.parts:
        both = [b for b in line.parts if b in ref.parts]
        kw = {"samples": samples, "seed": seed, "n_boot": n_boot}
        ds = [d for b in both if (d := _compare(line.parts[b], ref.parts[b], bench, **kw))]
        how = f"mean over {len(ds)} bases of their differences"
        return linear(ds, [1 / len(ds)] * len(ds), how) if ds else None
    deltas = [_delta(r, bench) for r in line.rows] if ref.untrained else []
    if deltas and line.n == 1 and deltas[0] is not None:
        return deltas[0]
    side_a = [samples(r, "policy") for r in line.rows]
    side_b = (
        [samples(r, "base") for r in line.rows[:1]]
        if ref.untrained
        else [samples(r, "policy") for r in ref.rows]
    )
    tables = [s.get(bench) if s else None for s in (*side_a, *side_b)]
    if all(tables):
        common = sorted(set.intersection(*(set(t) for t in tables)))  # type: ignore[arg-type]
        if common:
            arr = np.array([[t[i] for i in common] for t in tables])  # type: ignore[index]
            sub = _seed_of(seed, *line.names, *ref.names, bench)
            r = paired(arr[: len(side_a)], arr[len(side_a) :], seed=sub, n_boot=n_boot)
            how = f"paired bootstrap over {len(common)} items"
            how += f", {line.n} vs {max(1, len(side_b))} runs resampled" if line.n > 1 else ""
            return Estimate(r["score"], r["ci_low"], r["ci_high"], p=r.get("p"), how=how)
    if deltas and all(d is not None for d in deltas):
        est = replicates(deltas)  # type: ignore[arg-type]
        est.how = f"eval.json paired deltas of {line.n} runs"
        return est
    return linear(
        [line.cells[bench], ref.cells[bench]], [1, -1], "unpaired (no per-sample results)"
    )


def _diffs(table: Table, compare: Callable[[Line, Line, str], Estimate | None]) -> None:
    for line in table.lines[1:]:
        if line is table.reference:
            continue
        for bench in table.benches:
            if (d := compare(line, table.reference, bench)) is not None:
                line.diffs[bench] = d
        if all(b in line.diffs for b in TOTAL_BENCHMARKS):
            parts = [line.diffs[b] for b in TOTAL_BENCHMARKS]
            line.diffs[TOTAL] = linear(parts, [1.0] * 5, "sum of the benchmarks' differences")


def shown(est: Estimate | None) -> float | None:
    """The value as displayed (x100, one decimal): what the bold and highlight compare."""
    return None if est is None else round(100 * est.value, 1)


def _decorate(table: Table) -> None:
    """Bold: the best shown value of a column, significantly above the reference and not below
    the untrained base; (pooled view) cells at or above the reference's shown value."""
    untrained, ref = table.lines[0], table.reference
    for col in table.columns:
        trained = [ln for ln in table.lines[1:] if col in ln.cells]
        if not trained:
            continue
        best = max(shown(ln.cells[col]) for ln in trained)  # type: ignore[type-var]
        top = [ln for ln in trained if shown(ln.cells[col]) == best]
        floor = shown(untrained.cells.get(col))
        if all(
            ln is not ref
            and col in ln.diffs
            and ln.diffs[col].sign > 0
            and (floor is None or best >= floor)
            for ln in top
        ):
            for ln in top:
                ln.bold.add(col)
        if table.pooled and col in ref.cells:
            for ln in trained:
                if ln is not ref and shown(ln.cells[col]) >= shown(ref.cells[col]):  # type: ignore[operator]
                    ln.at_or_above.add(col)


def build_tables(
    rows: Sequence[Row],
    *,
    samples: SampleLoader = _row_samples,
    seed: int = 0,
    n_boot: int = 2000,
) -> tuple[list[Table], list[Table], list[str]]:
    """``(per-base tables, pooled tables, notes)`` of the experiments.

    A table per (training method, suite, base model); its lines are configurations (the params
    other than ``seed``), their runs replicates. Pooled tables average the bases per
    (method, suite) when there are two or more.
    """
    notes: list[str] = []
    benches = _benches(rows)
    if not benches:
        raise KarmaError("no evaluation scores in the experiments' metrics (policy.<bench>.score)")
    skip = GROUPING | _operational()
    info = []
    for row in rows:
        group = (
            _meta(row, "train_method", "train.method") or "?",
            _meta(row, "suite", "evaluate.suite") or "?",
            _meta(row, "base_model", "base_model.source") or "?",
        )
        strategy = str(row["params"].get("kinship") or _meta(row, "kinship") or "?")
        info.append((row, group, strategy, _config(row, skip), _meta(row, "seed", "seed") or "?"))
    all_configs = {c for *_, c, _ in info}
    varying = {
        k for c in all_configs for k, v in c if len({dict(x).get(k) for x in all_configs}) > 1
    }

    groups: dict[tuple[str, str, str], dict[tuple[Any, ...], list[Row]]] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for row, group, strategy, config, run_seed in info:
        key = (strategy, config)
        if (group, key, run_seed) in seen:
            notes.append(
                f"{row['name']} left out: same configuration and seed as "
                f"{seen[group, key, run_seed]}"
            )
            continue
        seen[group, key, run_seed] = row["name"]
        groups.setdefault(group, {}).setdefault(key, []).append(row)

    def compare(line: Line, ref: Line, bench: str) -> Estimate | None:
        return _compare(line, ref, bench, samples=samples, seed=seed, n_boot=n_boot)

    def rank(key: tuple[Any, ...]) -> tuple[int, str]:
        s = key[0]
        return (STRATEGY_ORDER.index(s) if s in STRATEGY_ORDER else len(STRATEGY_ORDER), str(key))

    tables: list[Table] = []
    for (method, suite, base), configs in sorted(groups.items()):
        all_rows = [r for rs in configs.values() for r in rs]
        gbenches = [b for b in benches if any(_score(r, "policy", b) for r in all_rows)]
        untrained = _untrained(all_rows, gbenches, notes, base)
        lines = [untrained]
        for key in sorted(configs, key=rank):
            runs = configs[key]
            label = _label(key[0], {k: v for k, v in key[1] if k in varying})
            lines.append(Line(label, key[0], runs, _line_cells(runs, "policy", gbenches), key=key))
        protocol = _meta(all_rows[0], "protocol") or "not recorded"
        baselines = [ln for ln in lines[1:] if ln.strategy == "rlaif"]
        table = Table(
            method,
            suite,
            protocol,
            [base],
            gbenches,
            {b: _items(all_rows, b) for b in gbenches},
            lines,
            baselines[0] if baselines else untrained,
        )
        _diffs(table, compare)
        _decorate(table)
        tables.append(table)
    pooled = _pool(tables, compare)
    return tables, pooled, notes


def _untrained(rows: Sequence[Row], benches: Sequence[str], notes: list[str], base: str) -> Line:
    distinct = {
        json.dumps({b: getattr(_score(r, "base", b), "value", None) for b in benches}) for r in rows
    }
    if len(distinct) > 1:
        notes.append(
            f"untrained {base}: its scores differ between experiments (evaluation settings "
            "differ); the first experiment's are shown"
        )
    first = list(rows[:1])
    return Line("untrained base", "", first, _line_cells(first, "base", benches), untrained=True)


def _pool(
    tables: Sequence[Table], compare: Callable[[Line, Line, str], Estimate | None]
) -> list[Table]:
    """The paper's Table 2: per (method, suite), each configuration averaged over the bases."""
    by: dict[tuple[str, str], list[Table]] = {}
    for t in tables:
        by.setdefault((t.method, t.suite), []).append(t)
    out = []
    for (method, suite), group in by.items():
        if len(group) < 2:
            continue
        benches = [b for b in group[0].benches if all(b in t.benches for t in group)]
        keys: list[tuple[Any, ...]] = [()]
        for t in group:
            keys += [ln.key for ln in t.lines[1:] if ln.key not in keys]
        lines = []
        for key in keys:
            parts = {t.bases[0]: ln for t in group for ln in t.lines if ln.key == key}
            cells = {}
            for col in [*benches, TOTAL]:
                if all(col in p.cells for p in parts.values()):
                    ests = [p.cells[col] for p in parts.values()]
                    cells[col] = linear(ests, [1 / len(ests)] * len(ests))
            first = next(iter(parts.values()))
            label = first.label
            if len(parts) < len(group):
                label += f" ({len(parts)} of {len(group)} bases)"
            rows = [r for p in parts.values() for r in p.rows]
            lines.append(
                Line(label, first.strategy, rows, cells, first.untrained, key, parts=parts)
            )
        baselines = [ln for ln in lines[1:] if ln.strategy == "rlaif"]
        items = {b: group[0].items.get(b, "") for b in benches}
        bases = [t.bases[0] for t in group]
        ref = baselines[0] if baselines else lines[0]
        table = Table(method, suite, group[0].protocol, bases, benches, items, lines, ref, True)
        _diffs(table, compare)
        _decorate(table)
        out.append(table)
    return out


# --------------------------------------------------------------------------- text


def _col_label(col: str) -> str:
    return f"Total ({len(TOTAL_BENCHMARKS)})" if col == TOTAL else BENCH_LABEL.get(col, col)


def _mark(line: Line, col: str) -> str:
    d = line.diffs.get(col)
    return {1: "▲", -1: "▼"}.get(d.sign, "") if d else ""


def _interval(est: Estimate, scale: float = 100.0) -> str:
    if est.lo is None or est.hi is None:
        return ""
    return f"{scale * est.lo:.1f}–{scale * est.hi:.1f}"


def _spread(line: Line, est: Estimate, pooled: bool) -> str:
    """``± sd`` for replicates, else the 95 % interval."""
    if est.sd is not None and est.n > 1 and not pooled:
        return f"± {100 * est.sd:.1f}"
    return _interval(est)


def _line_label(line: Line, pooled: bool) -> str:
    if line.untrained:
        return "untrained base (mean over bases)" if pooled else "untrained base"
    runs = f"{line.n} runs" if pooled else (f"{line.n} seeds" if line.n > 1 else "")
    return f"{line.label} · {runs}" if runs else line.label


def _diff_text(d: Estimate) -> str:
    text = f"{100 * d.value:+.1f}"
    if d.lo is not None and d.hi is not None:
        text += f" [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"
    return text + ({1: " ▲", -1: " ▼"}.get(d.sign, ""))


def _caption(table: Table) -> str:
    note = SUITE_NOTE.get(table.suite)
    suite = f"suite {table.suite}" if table.suite != "?" else "suite not recorded (meta.suite)"
    suite += f" ({note})" if note else ""
    ref = "the untrained base" if table.reference.untrained else table.reference.label
    return f"{suite}; protocol {table.protocol}; ▲/▼ and bold vs {ref}."


def markdown_table(rows: Sequence[Row], **kwargs: Any) -> str:
    """The paper-style tables as Markdown (scores x100); see :func:`build_tables`."""
    tables, pooled, notes = build_tables(rows, **kwargs)
    lines: list[str] = []
    for table in [*pooled, *tables]:
        lines += _markdown(table)
    data = data_table(tables)
    if data:
        lines += ["### Data and training", "", data]
    held = heldout_table(tables)
    if held:
        lines += ["### Held-out preference split (metrics/train.json)", "", held]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _markdown(table: Table) -> list[str]:
    cols = table.columns
    head = [
        f"{_col_label(c)}" + (f" ({table.items[c]})" if table.items.get(c) else "") for c in cols
    ]
    out = [f"### {table.title}", "", _caption(table), ""]
    out += ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for line in table.lines:
        cells = []
        for col in cols:
            est = line.cells.get(col)
            if est is None:
                cells.append("–")
                continue
            text = f"{100 * est.value:.1f}"
            if col in line.at_or_above:
                text = f"_{text}_"
            spread = _spread(line, est, table.pooled)
            text += f" [{spread}]" if spread and not spread.startswith("±") else f" {spread}"
            text = (text.rstrip() + " " + _mark(line, col)).rstrip()
            cells.append(f"**{text}**" if col in line.bold else text)
        names = "" if line.untrained or table.pooled else f" [{', '.join(line.names)}]"
        out.append(f"| {_line_label(line, table.pooled)}{names} | " + " | ".join(cells) + " |")
    diffs = [ln for ln in table.lines[1:] if ln.diffs]
    if diffs:
        out += ["", f"Difference from {_ref_name(table)} (points, 95 % interval):", ""]
        out += [
            "| | " + " | ".join(_col_label(c) for c in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for ln in diffs:
            cells = [_diff_text(ln.diffs[c]) if c in ln.diffs else "–" for c in cols]
            out.append(f"| {_line_label(ln, table.pooled)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _ref_name(table: Table) -> str:
    return "the untrained base" if table.reference.untrained else table.reference.label


def _aggregate(rows: Sequence[Row], key: str) -> str:
    vals = [v for r in rows if (v := _num(_get(r["metrics"], key))) is not None]
    if not vals:
        return "–"
    mean = math.fsum(vals) / len(vals)
    return f"{mean:.4g} ± {statistics.stdev(vals):.2g}" if len(vals) > 1 else f"{mean:.4g}"


def _group_label(line: Line) -> str:
    r = line.rows[0]
    base = _meta(r, "base_model", "base_model.source") or "?"
    method = _meta(r, "train_method", "train.method") or "?"
    seeds = f" · {line.n} seeds" if line.n > 1 else ""
    return f"{line.label} · {method} · {base}{seeds}"


def data_table(tables: Sequence[Table]) -> str:
    """Markdown table of the data-side metrics per configuration (mean ± sd over seeds)."""
    lines = [ln for t in tables for ln in t.lines[1:]]
    body = [[_group_label(ln), *(_aggregate(ln.rows, k) for _, k in DATA_KEYS)] for ln in lines]
    return _markdown_grid(["configuration", *(lab for lab, _ in DATA_KEYS)], body)


def _change(rows: Sequence[Row], key: str) -> str:
    """A paired change over replicate runs (``key`` with ``.ci_low``/``.ci_high``), as text."""
    ests = []
    for r in rows:
        g = r["metrics"]
        if (v := _num(_get(g, key))) is not None:
            ests.append(
                Estimate(v, _num(_get(g, key + ".ci_low")), _num(_get(g, key + ".ci_high")))
            )
    if not ests or len(ests) < len(rows):
        return "–"
    d = replicates(ests)
    text = f"{d.value:+.3g}"
    if d.lo is not None and d.hi is not None:
        text += f" [{d.lo:+.3g}, {d.hi:+.3g}]"
    return text + {1: " ▲", -1: " ▼"}.get(d.sign, "")


def _markdown_grid(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table, leaving out the columns (but the first) that have no value."""
    keep = [0] + [j for j in range(1, len(head)) if any(r[j] != "–" for r in body)]
    if len(keep) == 1:
        return ""
    lines = ["| " + " | ".join(head[j] for j in keep) + " |", "|---|" + "---|" * (len(keep) - 1)]
    lines += ["| " + " | ".join(r[j] for j in keep) + " |" for r in body]
    return "\n".join(lines) + "\n"


def heldout_table(tables: Sequence[Table]) -> str:
    """Markdown table of the held-out preference metrics (train.json ``heldout.*``)."""
    head, body = ["configuration"], []
    for lab, _ in HELDOUT:
        head += [f"{lab} after", f"Δ {lab}"]
    for ln in (ln for t in tables for ln in t.lines[1:]):
        cells = [_group_label(ln)]
        for _, m in HELDOUT:
            cells += [_aggregate(ln.rows, f"train:heldout.after.{m}"),
                      _change(ln.rows, f"train:heldout.delta.{m}")]  # fmt: skip
        body.append(cells)
    return _markdown_grid(head, body)


# --------------------------------------------------------------------------- figures


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def _capability(line: Line, benches: Sequence[str]) -> Estimate | None:
    parts = [line.cells[b] for b in benches if b in line.cells]
    return linear(parts, [1 / len(parts)] * len(parts)) if parts else None


def capability_png(tables: Sequence[Table]) -> bytes:
    """Per-capability bars (the paper's Fig. 5): one panel per table, a bar per line."""
    plt = pyplot()
    groups = list(DEFAULT_GROUPS.items())
    fig, axes = plt.subplots(1, len(tables), figsize=(6.6 * len(tables), 4.4), squeeze=False)
    for ax, table in zip(axes.flat, tables, strict=False):
        width = 0.8 / len(table.lines)
        for i, line in enumerate(table.lines):
            vals, errs = [], []
            for _, benches in groups:
                est = _capability(line, benches)
                vals.append(100 * est.value if est else np.nan)
                errs.append(100 * Z * est.se if est and est.se is not None else 0.0)
            xs = np.arange(len(groups)) + (i - (len(table.lines) - 1) / 2) * width
            ax.bar(
                xs,
                vals,
                width,
                yerr=errs,
                capsize=2,
                label=_line_label(line, table.pooled),
                color=COLORS.get(line.strategy, "#607d8b"),
                alpha=0.6 if line.untrained else 1,
            )
        ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g, _ in groups])
        ax.set_title(table.title, fontsize=10)
        ax.set_ylabel("mean score (x100)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    return _png(fig)


def radar_png(tables: Sequence[Table]) -> bytes:
    """Per-model radar (the paper's Fig. 6): one panel per base model x method."""
    plt = pyplot()
    cols = min(4, len(tables))
    nrows = math.ceil(len(tables) / cols)
    fig = plt.figure(figsize=(3.4 * cols, 3.4 * nrows + 0.5))
    for k, table in enumerate(tables):
        ax = fig.add_subplot(nrows, cols, k + 1, projection="polar")
        angles = np.linspace(0, 2 * np.pi, len(table.benches), endpoint=False)
        vals = [
            100 * ln.cells[b].value for ln in table.lines for b in table.benches if b in ln.cells
        ]
        lo, hi = (min(vals), max(vals)) if vals else (0, 100)
        for line in table.lines:
            ys = [100 * line.cells[b].value if b in line.cells else np.nan for b in table.benches]
            ax.plot(
                [*angles, angles[0]],
                [*ys, ys[0]],
                lw=1.4,
                ls="--" if line.untrained else "-",
                color=COLORS.get(line.strategy, "#607d8b"),
                label=_line_label(line, False),
            )
        bottom, top = max(0, lo - 5), min(100, hi + 5)
        ax.set_ylim(bottom, top)
        ax.set_yticks(
            np.linspace(bottom, top, 4)[1:], [f"{v:.0f}" for v in np.linspace(bottom, top, 4)[1:]]
        )
        ax.set_xticks(angles, [BENCH_LABEL.get(b, b) for b in table.benches], fontsize=7)
        ax.tick_params(axis="y", labelsize=6, colors="#777")
        ax.set_title(table.title, fontsize=8, pad=16)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    ncol = min(len(labels), max(2, 2 * cols))  # wraps: a long row would be cut off
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig)


def curves_png(tsv_files: Sequence[Path]) -> bytes | None:
    """Training curves (one panel per dvclive metric TSV) as PNG bytes, or None without data."""
    import csv

    plt = pyplot()

    def name(path: Path) -> str:
        parts = path.with_suffix("").parts
        return "/".join(parts[parts.index("metrics") + 1 :]) if "metrics" in parts else path.stem

    named = {name(p): p for p in tsv_files}
    chosen = [c for c in CURVES if c in named] or sorted(named)
    series = []
    for key in chosen:
        with named[key].open() as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            pts = [(float(r["step"]), float(r[reader.fieldnames[-1]])) for r in reader]  # type: ignore[index]
        if pts:
            series.append((key, pts))
    if not series:
        return None
    cols = min(4, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False)
    for ax, (key, pts) in zip(axes.flat, series, strict=False):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#3b6ea5")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


#: Figures of the workspace: (path or folder, caption, what makes it). Kinship first.
FIGURES = [
    (
        "plots/kinship",
        "kinship figures (heatmap, PCA, dendrograms)",
        "not in this clone: run `dvc pull plots/kinship` or `dvc repro kinship`",
    ),
    (
        "plots/preferences/pairs.png",
        "model pairs the preference strategy used",
        "not in this workspace: run `dvc repro preferences`",
    ),
    (
        "plots/select/margins.png",
        "MAP selection: explicit vs implicit margins",
        "not in this clone: run `dvc pull plots/select` or `dvc repro select`",
    ),
]
CURVES_DIR = "dvclive/train/plots/metrics"
FIGURE_HEADINGS = {"kinship": "Kinship", "preferences": "Preference pairs", "select": "Selection"}


# --------------------------------------------------------------------------- html

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:1240px;padding:0 12px;color:#222}
h1{font-size:1.5rem;margin:.4rem 0}
h2{font-size:1.2rem;margin:1.4rem 0 .3rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1rem 0 .2rem}p.cap{margin:.1rem 0 .3rem;color:#555;font-size:12px}
table{border-collapse:collapse;margin:.2rem 0 .6rem;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d5d9e0;padding:3px 7px;text-align:right;vertical-align:top}
td,th{white-space:nowrap}table.wrap td,table.wrap th{white-space:normal}
th{background:#f3f5f8;font-weight:600}
th small,td small{display:block;font-weight:400;color:#777;font-size:11px}
td:first-child,th:first-child{text-align:left;white-space:normal;min-width:180px;max-width:330px}
tr.untrained td{background:#f4f4f4;font-style:italic;color:#555}
tr.ref td:first-child{font-weight:600}
td.ge{background:#e3f2e3}td.best .v{font-weight:700}
.mk{color:#1a7f37;padding-left:2px}.mk.dn{color:#c62828}
details{margin:.1rem 0 .8rem;font-size:12px}summary{cursor:pointer;color:#345}
.legend{background:#f6f8fa;border:1px solid #e1e4e8;padding:6px 10px;font-size:12px}
figure{margin:.4rem 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #ddd}figure.half{width:49%}
figcaption{font-size:12px;color:#555}ul.missing li{color:#8a4b00}
""".replace("\n", "")


def _img(data: bytes, alt: str, cls: str = "") -> str:
    src = base64.b64encode(data).decode()
    cap = html.escape(alt)
    klass = f" class='{cls}'" if cls else ""
    img = f"<img alt='{cap}' src='data:image/png;base64,{src}'>"
    return f"<figure{klass}>{img}<figcaption>{cap}</figcaption></figure>"


def _html_table(table: Table) -> list[str]:
    cols = table.columns
    e = html.escape
    out = [f"<h3>{e(table.title)}</h3><p class='cap'>{e(_caption(table))}</p><table><tr><th></th>"]
    for c in cols:
        sub = f"sum of {len(TOTAL_BENCHMARKS)}" if c == TOTAL else table.items.get(c, "")
        out.append(f"<th>{e(_col_label(c))}<small>{e(sub)}</small></th>")
    out.append("</tr>")
    for line in table.lines:
        cls = "untrained" if line.untrained else ("ref" if line is table.reference else "")
        names = "" if line.untrained or table.pooled else ", ".join(line.names[:4])
        names += " …" if len(line.names) > 4 and not table.pooled else ""
        out.append(
            f"<tr class='{cls}'><td>{e(_line_label(line, table.pooled))}"
            + (f"<small>{e(names)}</small>" if names else "")
            + "</td>"
        )
        for col in cols:
            est = line.cells.get(col)
            if est is None:
                out.append("<td>–</td>")
                continue
            klass = " ".join(
                k for k, on in (("best", col in line.bold), ("ge", col in line.at_or_above)) if on
            )
            d = line.diffs.get(col)
            title = (
                f" title='Δ {e(_diff_text(d))} vs {e(_ref_name(table))}: {e(d.how)}'" if d else ""
            )
            mark = _mark(line, col)
            mk = f"<span class='mk{' dn' if mark == '▼' else ''}'>{mark}</span>" if mark else ""
            out.append(
                f"<td class='{klass}'{title}><span class='v'>{100 * est.value:.1f}</span>{mk}"
                f"<small>{e(_spread(line, est, table.pooled))}</small></td>"
            )
        out.append("</tr>")
    out.append("</table>")
    diffs = [ln for ln in table.lines[1:] if ln.diffs]
    if diffs:
        summary = f"Differences from {e(_ref_name(table))} (points, 95 % interval)"
        out.append(f"<details><summary>{summary}</summary><table><tr><th></th>")
        out += [f"<th>{e(_col_label(c))}</th>" for c in cols] + ["</tr>"]
        for ln in diffs:
            out.append(f"<tr><td>{e(_line_label(ln, table.pooled))}</td>")
            for c in cols:
                d = ln.diffs.get(c)
                out.append(f"<td title='{e(d.how)}'>{e(_diff_text(d))}</td>" if d else "<td>–</td>")
            out.append("</tr>")
        out.append("</table></details>")
    return out


def _md_to_html_table(md: str) -> str:
    """A simple Markdown table (our own output) as an HTML table."""
    rows = [r.strip().strip("|").split(" | ") for r in md.strip().splitlines()]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>", *(f"<th>{html.escape(h.strip())}</th>" for h in head), "</tr>"]
    for r in body:
        out += ["<tr>", *(f"<td>{html.escape(c.strip())}</td>" for c in r), "</tr>"]
    return "".join([*out, "</table>"])


LEGEND = (
    "Scores ×100 on each benchmark's headline metric. A cell shows the score and its 95 % "
    "interval (one run) or the mean ± sd over seeds (replicates: runs that differ only in "
    "<code>seed</code>). ▲/▼: the 95 % interval of the difference from the baseline (the RLAIF "
    "row, else the untrained base) lies above/below 0: paired bootstrap over items where "
    "per-sample results are available, else eval.json's paired deltas or an unpaired interval "
    "(hover a cell for the difference and how it was computed). <b>Bold</b>: the best shown "
    "(rounded) value of a column, significantly above the baseline and not below the untrained "
    "base. Green (pooled view): at or above the baseline. Total: sum of the five percent-scale "
    "benchmarks, as in the paper's Table 2 (which reports MMLU-Pro as a fraction and leaves it "
    "out)."
)


def html_page(
    rows: Sequence[Row],
    *,
    figures: Sequence[Path] = (),
    curve_files: Sequence[Path] = (),
    missing: Sequence[str] = (),
    samples: SampleLoader = _row_samples,
    seed: int = 0,
    n_boot: int = 2000,
    title: str = "KARMA experiments",
) -> str:
    """One self-contained page (inline CSS, images as data URIs; opens offline)."""
    tables, pooled, notes = build_tables(rows, samples=samples, seed=seed, n_boot=n_boot)
    e = html.escape
    runs = sum(ln.n for t in tables for ln in t.lines[1:])
    configs = sum(len(t.lines) - 1 for t in tables)
    bases = sorted({t.bases[0] for t in tables})
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{runs} run(s) in {configs} configuration(s); base models: {e(', '.join(bases))}.</p>",
        f"<p class='legend'>{LEGEND}</p>",
    ]
    if pooled:
        parts.append("<h2>Pooled over base models (the paper's Table 2)</h2>")
        for t in pooled:
            parts += _html_table(t)
    elif len(bases) == 1:
        parts.append(
            "<p class='cap'>Pooled view (the paper's Table 2): one base model only, "
            "so the table below is the pooled view.</p>"
        )
    parts.append("<h2>Per base model</h2>")
    for t in tables:
        parts += _html_table(t)
    data = data_table(tables)
    if data:
        parts += ["<h2>Data and training</h2>", _md_to_html_table(data)]
    held = heldout_table(tables)
    if held:
        parts += [
            "<h2>Held-out preference split (train.json)</h2>",
            "<p class='cap'>After training, and the paired change from before training "
            "(95 % interval; ▲/▼ when it excludes 0).</p>",
            _md_to_html_table(held).replace("<table>", "<table class='wrap'>", 1),
        ]
    parts += _figures_html(tables, pooled, figures, curve_files, list(missing))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _figures_html(
    tables: Sequence[Table],
    pooled: Sequence[Table],
    figures: Sequence[Path],
    curve_files: Sequence[Path],
    missing: list[str],
) -> list[str]:
    """The figures section: what is not shown (and why) first, then the figures."""
    e, figs = html.escape, []
    if sum(len(t.lines) - 1 for t in tables) > 1:
        figs.append("<h3>Results by capability and by model</h3>")
        cap = "Per-capability scores (the paper's Fig. 5): mean of its benchmarks, 95 % intervals"
        figs.append(_img(capability_png(pooled or tables), cap))
        figs.append(_img(radar_png(tables), "Per-model radar (the paper's Fig. 6)"))
    else:
        why = "one configuration only; run more (`dvc exp run -S kinship=...`)"
        missing.insert(0, f"per-capability bars (Fig. 5) and per-model radar (Fig. 6): {why}")
    heading = ""
    for fig in figures:
        rel = fig.parts[fig.parts.index("plots") :] if "plots" in fig.parts else (fig.name,)
        if (now := FIGURE_HEADINGS.get(fig.parent.name, "Other figures")) != heading:
            heading = now
            figs.append(f"<h3>{e(heading)} (workspace)</h3>")
        figs.append(_img(fig.read_bytes(), "/".join(rel), "half"))
    curves = curves_png(curve_files) if curve_files else None
    if curves:
        figs.append("<h3>Training curves (workspace)</h3>")
        figs.append(_img(curves, f"dvclive curves of the workspace's run ({CURVES_DIR})"))
    elif curve_files:
        missing.append(f"training curves: the dvclive TSVs in {CURVES_DIR} are empty")
    out = ["<h2>Figures</h2>"]
    if missing:
        out += ["<p>Not shown:</p><ul class='missing'>", *(f"<li>{e(m)}</li>" for m in missing)]
        out.append("</ul>")
    return out + figs


def _figure_order(path: Path) -> tuple[int, str]:
    """Kinship heatmap, PCA, the all-benchmark dendrogram, then the rest by name."""
    first = ["kinship_heatmap", "pca", "dendrogram_all"]
    return (first.index(path.stem) if path.stem in first else len(first), path.name)


def workspace_figures(repo: Path) -> tuple[list[Path], list[Path], list[str]]:
    """``(figures, training-curve TSVs, what is missing and why)`` in the repo's workspace."""
    figures, missing = [], []
    for rel, caption, why in FIGURES:
        path = repo / rel
        found = sorted(path.glob("*.png"), key=_figure_order) if path.is_dir() else []
        found += [path] if path.is_file() else []
        figures += found
        if not found:
            missing.append(f"{caption} ({rel}): {why}")
    known = {f.resolve() for f in figures}
    plots = repo / "plots"
    extra = (
        sorted(p for p in plots.rglob("*.png") if p.resolve() not in known)
        if plots.is_dir()
        else []
    )
    curves = sorted((repo / CURVES_DIR).rglob("*.tsv")) if (repo / CURVES_DIR).is_dir() else []
    if not curves:
        missing.append(
            f"training curves ({CURVES_DIR}/*.tsv): not in this workspace: run "
            "`dvc repro train` (dvclive writes them; `dvc pull` does not)"
        )
    return [*figures, *extra], curves, missing


def render(
    repo: str | Path = ".", *, workspace: bool = False, seed: int = 0, n_boot: int = 2000
) -> tuple[str, str, int]:
    """``(markdown, html, number of experiments)`` of the project's experiments."""
    repo = Path(repo)
    rows = collect_experiments(repo, workspace=workspace)
    loader = sample_loader(repo)
    md = "# KARMA experiments\n\n" + markdown_table(rows, samples=loader, seed=seed, n_boot=n_boot)
    figures, curves, missing = workspace_figures(repo)
    page = html_page(
        rows,
        figures=figures,
        curve_files=curves,
        missing=missing,
        samples=loader,
        seed=seed,
        n_boot=n_boot,
    )
    return md, page, len(rows)


# --------------------------------------------------------------------------- dvc plots offline

#: The versions dvc-render loads from a CDN (its VegaRenderer.SCRIPTS), as npm packages.
VEGA_PACKAGES = [("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")]


def vega_scripts(js_dir: Path | None = None) -> list[tuple[str, str]]:
    """``[(package@version, JS)]`` of vega, vega-lite and vega-embed, read from ``js_dir``.

    ``js_dir`` holds ``<pkg>.min.js`` files or the tarballs of ``npm pack <pkg>@<version>``.
    Without it: ``$KARMA_CACHE_DIR/vega``, filled once by ``npm pack`` from the npm registry.
    """
    from karma.core.io import cache_root

    folder = js_dir or cache_root("vega")
    specs = [f"{p}@{v}" for p, v in VEGA_PACKAGES]
    if js_dir is None and not all(_find_js(folder, p, v) for p, v in VEGA_PACKAGES):
        if shutil.which("npm") is None:
            files = ", ".join(p + ".min.js" for p, _ in VEGA_PACKAGES)
            raise KarmaError(
                f"vega JS not in {folder} and no npm to fetch it: pass --vega-dir with {files}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with npm pack into %s", " ".join(specs), folder)
        done = subprocess.run(
            ["npm", "pack", "--silent", *specs],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise KarmaError(f"npm pack {' '.join(specs)} failed: {last}")
    out = []
    for pkg, version in VEGA_PACKAGES:
        js = _find_js(folder, pkg, version)
        if js is None:
            why = f"no {pkg}.min.js nor {pkg}-{version}.tgz (`npm pack {pkg}@{version}`) here"
            raise KarmaError(why, file=folder)
        out.append((f"{pkg}@{version}", js))
    return out


def _find_js(folder: Path, pkg: str, version: str) -> str | None:
    plain = folder / f"{pkg}.min.js"
    if plain.is_file():
        return plain.read_text(encoding="utf8")
    tgz = folder / f"{pkg}-{version}.tgz"
    if tgz.is_file():
        with tarfile.open(tgz) as tar:
            member = tar.extractfile(f"package/build/{pkg}.min.js")
            return member.read().decode("utf8") if member else None
    return None


def plots_template(js_dir: Path | None = None) -> str:
    """An HTML template for ``dvc plots show --html-template`` with vega inlined (no CDN).

    It has no ``{scripts}`` placeholder, so dvc adds no CDN ``<script src>``; the inline
    vega, vega-lite and vega-embed define the globals dvc's plot divs call.
    """
    scripts = []
    for name, js in vega_scripts(js_dir):
        safe = js.replace("</script", "<\\/script")
        scripts.append(f"<script>/* {name} (BSD-3-Clause) */\n{safe}\n</script>")
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n{refresh_tag}\n"
        "<title>DVC plots (offline)</title>\n"
        + "\n".join(scripts)
        + "\n<style>table{border-spacing:15px}body{font-family:system-ui,sans-serif}</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- metrics diff


def metrics_diff(rev: str, repo: str | Path = ".") -> dict[str, dict[str, float | None]]:
    """``{metric: {old, new, diff}}`` of every changed metric between ``rev`` and the workspace."""
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as r:
            raw = r.metrics.diff(a_rev=rev, all=True)
    except Exception as err:
        raise KarmaError(f"cannot diff metrics against {rev!r}: {err}", file=repo) from None
    out: dict[str, dict[str, float | None]] = {}
    for path, entries in sorted(raw.get("diff", {}).items()):
        for key, change in sorted(entries.items()):
            out[f"{Path(path).stem}:{key}"] = {k: change.get(k) for k in ("old", "new", "diff")}
    return out


def diff_markdown(diff: dict[str, dict[str, float | None]], rev: str) -> str:
    """A PR-ready table of the evaluation deltas first, then everything else that changed."""

    def order(key: str) -> tuple[int, str]:
        return (0 if ":policy." in key or ":delta." in key else 1), key

    lines = [f"| metric | {rev} | workspace | change |", "|---|---|---|---|"]
    for key in sorted(diff, key=order):
        d = diff[key]
        cells = [
            _numtext(d.get("old")),
            _numtext(d.get("new")),
            _numtext(d.get("diff"), signed=True),
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        lines.append("| (no metric changed) | | | |")
    return "\n".join(lines) + "\n"


def _numtext(value: Any, *, signed: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "–"
    return f"{value:+.4g}" if signed else f"{value:.4g}"
