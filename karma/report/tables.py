"""The paper's tables from experiment rows: per base model x method, and pooled.

Experiments are grouped by base model x training method (``meta.*`` keys of the evaluation
diagnostics, else the params); runs that differ only in ``seed`` are replicates of one
configuration (mean ± sd, n). Columns are the paper's Table 2 benchmarks in its order (MMLU,
MMLU-Pro, ARC-E, ARC-C, IFEval), its Total (their 0-1 mean), then any other benchmark
(HellaSwag is only in the paper's origin-model table). Every cell has its 95 % interval and a
mark when it differs significantly from the reference (the RLAIF row, else the untrained base;
:mod:`karma.report.estimates` for the rule).

Two pooled views: **the paper's Table 2** averages each strategy over every base model x method
(its Table 4 rows), and the **per-method view** averages over the base models of one method.

>>> rows = [{"name": "exp-a", "params": {"kinship": "sim", "train.method": "dpo",
...          "base_model.source": "m"}, "metrics": {"policy.arc_easy.score": 0.5,
...          "base.arc_easy.score": 0.4}}]
>>> [t.title for t in build_tables(rows)[0]]
['DPO · base m']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from karma.core.errors import KarmaError
from karma.core.settings import BENCHMARKS, TABLE2_BENCHMARKS, is_operational, iter_fields
from karma.core.stats import stratified_bootstrap, stratified_sign_flip_p
from karma.params import Params
from karma.report.collect import Row, SampleLoader, get, num, row_samples
from karma.report.estimates import (
    Estimate,
    adjust,
    linear,
    paired,
    replicates,
    seed_of,
    total_replicates,
)

STRATEGY_ORDER = ["rlaif", "score", "sim", "score_sim", "random"]
STRATEGY_LABEL = {
    "rlaif": "RLAIF (baseline)",
    "score": "KARMA score",
    "sim": "KARMA sim",
    "score_sim": "KARMA score_sim",
    "random": "random pairs",
}
BENCH_LABEL = {
    "ifeval": "IFEval",
    "mmlu_stem": "MMLU",
    "mmlu_pro": "MMLU-Pro",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
}
TOTAL = "total"
SUITE_NOTE = {
    "embedded": "the project's offline mini suites, 40-49 items per benchmark: a smoke test "
    "of the pipeline, not comparable with the paper's numbers",
    "lm_eval": "lm-eval's full tasks",
    "paper": "the paper's protocol (generative prompting, answer extraction)",
    "embedded_paper": "the paper's protocol on the offline mini suites (40-49 items per "
    "benchmark): a smoke test",
}
# The headline metric of a benchmark in metrics without ``<who>.<bench>.score`` (older runs).
PRIMARY = ["prompt_level_strict_acc", "acc_norm", "exact_match", "acc"]
# Params that name the table a run belongs to, or its replicate, not its configuration.
GROUPING = {"seed", "kinship", "train.method", "evaluate.suite"}
Compare = Callable[["Line", "Line", str], "Estimate | None"]


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
    parts: dict[str, Line] = field(default_factory=dict)  # pooled: the line of each table

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
    """A paper-style table: the untrained base first, then each configuration.

    ``kind``: ``base`` (one base model x method), ``paper`` (the paper's Table 2: pooled over
    base models x methods) or ``method`` (pooled over the base models of one method).
    """

    method: str
    suite: str
    protocol: str
    bases: list[str]
    benches: list[str]
    items: dict[str, str]
    lines: list[Line]
    reference: Line
    kind: str = "base"
    methods: list[str] = field(default_factory=list)

    @property
    def pooled(self) -> bool:
        """A pooled view (lines average other tables' lines)."""
        return self.kind != "base"

    @property
    def columns(self) -> list[str]:
        """Table 2 benchmarks, the Total when all five are there, then the others."""
        first = [b for b in TABLE2_BENCHMARKS if b in self.benches]
        total = [TOTAL] if len(first) == len(TABLE2_BENCHMARKS) else []
        return [*first, *total, *(b for b in self.benches if b not in TABLE2_BENCHMARKS)]

    @property
    def title(self) -> str:
        """``DPO · base X`` / ``Table 2 ...`` / ``DPO · pooled over 2 base models``."""
        if self.kind == "paper":
            methods = " + ".join(m.upper() for m in self.methods)
            return (
                f"Table 2 (the paper's pooling): mean over {len(self.bases)} base model(s) × "
                f"{len(self.methods)} method(s) ({methods})"
            )
        if self.kind == "method":
            return f"{self.method.upper()} · pooled over {len(self.bases)} base models"
        return f"{self.method.upper()} · base {self.bases[0]}"


def meta(row: Row, key: str, param: str | None = None) -> str | None:
    """A ``meta.<key>`` of the run's metrics (eval first), else the param; as text."""
    for file in ("eval", "train", "select", "preferences"):
        value = get(row["metrics"], f"{file}:meta.{key}")
        if value is not None:
            break
    else:
        value = row["params"].get(param) if param else None
    if value is None:
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def score(row: Row, who: str, bench: str) -> Estimate | None:
    """``<who>.<bench>.score`` with its interval (older metrics: the headline metric ± stderr)."""
    m = row["metrics"]

    def value_of(key: str) -> float | None:
        return num(get(m, f"eval:{who}.{bench}.{key}"))

    value = value_of("score")
    se = value_of("stderr")
    if value is None:
        metric = next((p for p in PRIMARY if value_of(p) is not None), None)
        if metric is None:
            return None
        value, se = value_of(metric), value_of(f"{metric}_stderr")
    lo, hi = value_of("ci_low"), value_of("ci_high")
    if (lo is None or hi is None) and se is not None:
        lo, hi = value - 1.959963984540054 * se, value + 1.959963984540054 * se  # type: ignore[operator]
    return Estimate(value, lo, hi)  # type: ignore[arg-type]


def _benches(rows: Sequence[Row]) -> list[str]:
    """Benchmarks with a policy score: Table 2's order, then the others (BENCHMARKS, name)."""
    found = set()
    for row in rows:
        for key in row["metrics"]:
            name = key.split(":")[-1]
            if name.startswith("policy.") and name.count(".") >= 2:
                found.add(name.split(".")[1])
    found = {b for b in found if b != TOTAL and any(score(r, "policy", b) for r in rows)}
    order = [*TABLE2_BENCHMARKS, *(b for b in BENCHMARKS if b not in TABLE2_BENCHMARKS)]
    return [b for b in order if b in found] + sorted(found - set(order))


def _items(rows: Sequence[Row], bench: str) -> str:
    counts = set()
    for row in rows:
        n = num(get(row["metrics"], f"eval:meta.items.{bench}"))
        n = n if n is not None else num(get(row["metrics"], f"eval:policy.{bench}.n"))
        if n is not None:
            counts.add(int(n))
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    return f"{lo} items" if lo == hi else f"{lo}-{hi} items"


def total(cells: dict[str, Estimate]) -> Estimate | None:
    """The paper's Total: the 0-1 mean of the five Table 2 benchmarks (None if one is missing)."""
    if not all(b in cells for b in TABLE2_BENCHMARKS):
        return None
    parts = [cells[b] for b in TABLE2_BENCHMARKS]
    return linear(parts, [1 / len(parts)] * len(parts))


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
        ests = [score(r, who, bench) for r in rows]
        if all(e is not None for e in ests):
            cells[bench] = replicates(ests)  # type: ignore[arg-type]
    totals = [total({b: e for b in benches if (e := score(r, who, b)) is not None}) for r in rows]
    if all(t is not None for t in totals):
        cells[TOTAL] = replicates(totals)  # type: ignore[arg-type]
    return cells


def _delta(row: Row, bench: str) -> Estimate | None:
    """The evaluation's paired policy-vs-base difference for one run (its raw p)."""
    m = row["metrics"]

    def value_of(key: str) -> Any:
        return get(m, f"eval:delta.{bench}.{key}")

    value = num(value_of("score"))
    if value is None:
        return None
    items = num(value_of("n"))
    return Estimate(
        value,
        num(value_of("ci_low")),
        num(value_of("ci_high")),
        p=num(value_of("p")),
        how="the evaluation's paired delta",
        items=int(items) if items is not None else 0,
        test=str(value_of("test") or ""),
    )


def _sides(line: Line, ref: Line, samples: SampleLoader) -> list[dict | None]:
    side_a = [samples(r, "policy") for r in line.rows]
    side_b = (
        [samples(r, "base") for r in line.rows[:1]]
        if ref.untrained
        else [samples(r, "policy") for r in ref.rows]
    )
    return [*side_a, *side_b]


def _items_of(tables: list[dict | None], bench: str, n_a: int) -> tuple[np.ndarray, int] | None:
    per = [t.get(bench) if t else None for t in tables]
    if not all(per):
        return None
    common = sorted(set.intersection(*(set(t) for t in per)))  # type: ignore[arg-type]
    if not common:
        return None
    return np.array([[t[i] for i in common] for t in per]), n_a  # type: ignore[index]


def compare(
    line: Line, ref: Line, bench: str, *, samples: SampleLoader, seed: int, n_boot: int
) -> Estimate | None:
    """``line - ref`` for one column: paired where per-sample results exist, else the
    evaluation's deltas, else unpaired. Pooled lines: the mean over the parts of each part's
    difference. The Total: the bootstrap of the Total itself over items."""
    if bench not in line.cells or bench not in ref.cells:
        return None
    kw = {"samples": samples, "seed": seed, "n_boot": n_boot}
    if line.parts:
        both = [b for b in line.parts if b in ref.parts]
        ds = [d for b in both if (d := compare(line.parts[b], ref.parts[b], bench, **kw))]
        how = f"mean over {len(ds)} tables of their differences"
        return linear(ds, [1 / len(ds)] * len(ds), how) if ds else None
    deltas = [_delta(r, bench) for r in line.rows] if ref.untrained else []
    if deltas and line.n == 1 and deltas[0] is not None and bench != TOTAL:
        return deltas[0]
    tables = _sides(line, ref, samples)
    if bench == TOTAL:
        return _total_compare(line, ref, tables, seed=seed, n_boot=n_boot)
    got = _items_of(tables, bench, line.n)
    if got is not None:
        arr, n_a = got
        sub = seed_of(seed, *line.names, *ref.names, bench)
        r = paired(arr[:n_a], arr[n_a:], seed=sub, n_boot=n_boot)
        how = f"paired over {arr.shape[1]} items ({r['test']})"
        how += f", {line.n} vs {arr.shape[0] - n_a} runs resampled" if line.n > 1 else ""
        return Estimate(
            r["score"],
            r["ci_low"],
            r["ci_high"],
            p=r["p"],
            how=how,
            items=arr.shape[1],
            test=str(r["test"]),
        )
    if deltas and all(d is not None for d in deltas):
        est = replicates(deltas)  # type: ignore[arg-type]
        est.how, est.items = f"the evaluation's paired deltas of {line.n} runs", deltas[0].items  # type: ignore[union-attr]
        est.p, est.test = _normal_p(est), "normal"
        return est
    est = linear([line.cells[bench], ref.cells[bench]], [1, -1], "unpaired (no per-item data)")
    return est


def _normal_p(est: Estimate) -> float | None:
    from karma.report.estimates import normal_p

    return normal_p(est.value, est.se)


def _total_compare(
    line: Line, ref: Line, tables: list[dict | None], *, seed: int, n_boot: int
) -> Estimate | None:
    """The Total's difference: the bootstrap of the Total itself over items (and over the runs
    of each side for replicates) where per-item data exist; else the evaluation's
    ``delta.total`` for
    one run against the untrained base; else the mean of the benchmarks' differences."""
    sides = []
    for bench in TABLE2_BENCHMARKS:
        got = _items_of(tables, bench, line.n)
        if got is None:
            break
        arr, n_a = got
        sides.append((arr[:n_a], arr[n_a:]))
    if len(sides) == len(TABLE2_BENCHMARKS):
        sub = seed_of(seed, *line.names, *ref.names, TOTAL)
        n = int(sum(a.shape[1] for a, _ in sides))
        if all(a.shape[0] == 1 and b.shape[0] == 1 for a, b in sides):
            diffs = [a[0] - b[0] for a, b in sides]
            mean, low, high = stratified_bootstrap(diffs, n_boot=n_boot, seed=sub)
            p = stratified_sign_flip_p(diffs, n_perm=n_boot, seed=sub)
            how = f"bootstrap of the Total over {n} items (stratified by benchmark)"
            return Estimate(mean, low, high, p=p, how=how, items=n, test="stratified_sign_flip")
        r = total_replicates(sides, seed=sub, n_boot=n_boot)
        how = f"bootstrap of the Total over {n} items and the runs of each side"
        return Estimate(r["score"], r["ci_low"], r["ci_high"], p=r["p"], how=how, items=n,
                        test="bootstrap")  # fmt: skip
    if ref.untrained and line.n == 1 and (d := _delta(line.rows[0], TOTAL)) is not None:
        return d
    return None


def _diffs(table: Table, cmp: Compare) -> None:
    for line in table.lines[1:]:
        if line is table.reference:
            continue
        for col in table.columns:
            if col == TOTAL:
                continue
            if (d := cmp(line, table.reference, col)) is not None:
                line.diffs[col] = d
        if TOTAL in table.columns:
            d = cmp(line, table.reference, TOTAL)
            if d is None and all(b in line.diffs for b in TABLE2_BENCHMARKS):
                parts = [line.diffs[b] for b in TABLE2_BENCHMARKS]
                d = linear(parts, [0.2] * 5, "mean of the benchmarks' differences")
            if d is not None:
                line.diffs[TOTAL] = d
        adjust(line.diffs)


def shown(est: Estimate | None) -> float | None:
    """The value as displayed (x100, one decimal): what the bold and highlight compare."""
    return None if est is None else round(100 * est.value, 1)


def _decorate(table: Table) -> None:
    """Bold: the best shown value of a column, significantly above the reference and not below
    the untrained base; (pooled views) cells at or above the reference's shown value."""
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


def _group_rows(
    rows: Sequence[Row], notes: list[str]
) -> dict[tuple[str, str, str], dict[tuple[Any, ...], list[Row]]]:
    """``{(method, suite, base): {(strategy, config): runs}}``; a repeated seed is left out."""
    skip = GROUPING | _operational()
    info = []
    for row in rows:
        group = (
            meta(row, "train_method", "train.method") or "?",
            meta(row, "suite", "evaluate.suite") or "?",
            meta(row, "base_model", "base_model.source") or "?",
        )
        strategy = str(row["params"].get("kinship") or meta(row, "kinship") or "?")
        info.append((row, group, strategy, _config(row, skip), meta(row, "seed", "seed") or "?"))
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
    return groups


def _rank(key: tuple[Any, ...]) -> tuple[int, str]:
    s = key[0]
    return (STRATEGY_ORDER.index(s) if s in STRATEGY_ORDER else len(STRATEGY_ORDER), str(key))


def build_tables(
    rows: Sequence[Row],
    *,
    samples: SampleLoader = row_samples,
    seed: int = 0,
    n_boot: int = 2000,
) -> tuple[list[Table], list[Table], list[str]]:
    """``(per-base tables, pooled tables, notes)`` of the experiments.

    A table per (training method, suite, base model); its lines are configurations (the params
    other than ``seed``), their runs replicates. Pooled: the paper's Table 2 (per suite, over
    every base model x method) when there are two or more tables, then the per-method views
    when a method has two or more base models and there is more than one method.
    """
    notes: list[str] = []
    benches = _benches(rows)
    if not benches:
        raise KarmaError("no evaluation scores in the experiments' metrics (policy.<bench>.score)")
    groups = _group_rows(rows, notes)
    configs_all = {k[1] for g in groups.values() for k in g}
    varying = {
        k for c in configs_all for k, v in c if len({dict(x).get(k) for x in configs_all}) > 1
    }

    def cmp(line: Line, ref: Line, bench: str) -> Estimate | None:
        return compare(line, ref, bench, samples=samples, seed=seed, n_boot=n_boot)

    tables: list[Table] = []
    for (method, suite, base), configs in sorted(groups.items()):
        all_rows = [r for rs in configs.values() for r in rs]
        gbenches = [b for b in benches if any(score(r, "policy", b) for r in all_rows)]
        untrained = _untrained(all_rows, gbenches, notes, base)
        lines = [untrained]
        for key in sorted(configs, key=_rank):
            label = _label(key[0], {k: v for k, v in key[1] if k in varying})
            cells = _line_cells(configs[key], "policy", gbenches)
            lines.append(Line(label, key[0], configs[key], cells, key=key))
        protocol = meta(all_rows[0], "protocol") or "not recorded"
        baselines = [ln for ln in lines[1:] if ln.strategy == "rlaif"]
        items = {b: _items(all_rows, b) for b in gbenches}
        ref = baselines[0] if baselines else untrained
        table = Table(
            method, suite, protocol, [base], gbenches, items, lines, ref, methods=[method]
        )
        _diffs(table, cmp)
        _decorate(table)
        tables.append(table)
    paper = _pool(tables, cmp, kind="paper")
    methods = {t.method for t in tables}
    per_method = _pool(tables, cmp, kind="method") if len(methods) > 1 else []
    return tables, [*paper, *per_method], notes


def _untrained(rows: Sequence[Row], benches: Sequence[str], notes: list[str], base: str) -> Line:
    distinct = {
        json.dumps({b: getattr(score(r, "base", b), "value", None) for b in benches}) for r in rows
    }
    if len(distinct) > 1:
        notes.append(
            f"untrained {base}: its scores differ between experiments (evaluation settings "
            "differ); the first experiment's are shown"
        )
    first = list(rows[:1])
    return Line("untrained base", "", first, _line_cells(first, "base", benches), untrained=True)


def _pool(tables: Sequence[Table], cmp: Compare, *, kind: str) -> list[Table]:
    """Pooled tables: ``paper`` per suite over every (base, method) table, as the paper's
    Table 2 averages its Table 4 rows; ``method`` per (method, suite) over the bases."""
    by: dict[tuple[str, ...], list[Table]] = {}
    for t in tables:
        key = (t.suite,) if kind == "paper" else (t.method, t.suite)
        by.setdefault(key, []).append(t)
    out = []
    for group in by.values():
        if len(group) < 2:
            continue
        out.append(pool_tables(group, cmp, kind=kind))
    return out


def _part(t: Table) -> str:
    return f"{t.bases[0]} · {t.method}"


def pool_tables(group: Sequence[Table], cmp: Compare | None = None, *, kind: str) -> Table:
    """One pooled table: each configuration's cells averaged over the tables of ``group``
    (equal weights; a line missing from some tables says so in its label)."""
    benches = [b for b in group[0].benches if all(b in t.benches for t in group)]
    keys: list[tuple[Any, ...]] = [()]
    for t in group:
        keys += [ln.key for ln in t.lines[1:] if ln.key not in keys]
    lines = []
    for key in keys:
        parts = {_part(t): ln for t in group for ln in t.lines if ln.key == key}
        cells = {}
        for col in [*benches, TOTAL]:
            if all(col in p.cells for p in parts.values()):
                ests = [p.cells[col] for p in parts.values()]
                cells[col] = linear(ests, [1 / len(ests)] * len(ests))
        first = next(iter(parts.values()))
        label = first.label
        if len(parts) < len(group):
            label += f" ({len(parts)} of {len(group)} tables)"
        rows = [r for p in parts.values() for r in p.rows]
        lines.append(Line(label, first.strategy, rows, cells, first.untrained, key, parts=parts))
    baselines = [ln for ln in lines[1:] if ln.strategy == "rlaif"]
    items = {b: group[0].items.get(b, "") for b in benches}
    bases = list(dict.fromkeys(b for t in group for b in t.bases))
    methods = list(dict.fromkeys(t.method for t in group))
    ref = baselines[0] if baselines else lines[0]
    method = "+".join(methods)
    table = Table(
        method,
        group[0].suite,
        group[0].protocol,
        bases,
        benches,
        items,
        lines,
        ref,
        kind=kind,
        methods=methods,
    )
    if cmp is not None:
        _diffs(table, cmp)
    _decorate(table)
    return table
