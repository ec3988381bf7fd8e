"""The report as text: the verdict first, then the tables (Markdown), data and held-out.

Scores are shown x100 (one decimal). A difference from the reference is marked ▲/▼ when its
test's Holm-adjusted p (across the columns of that comparison) is below 0.05 and it rests on at
least 10 items (:mod:`karma.report.estimates`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from karma.core.settings import TABLE2_BENCHMARKS
from karma.report.collect import Row, get, num
from karma.report.estimates import Estimate, replicates
from karma.report.headline import trained_pairs
from karma.report.tables import (
    BENCH_LABEL,
    SUITE_NOTE,
    TOTAL,
    Line,
    Table,
    build_tables,
    meta,
)

# Data-side columns: (label, metric); ``file:key`` names a key of a diagnostics file.
DATA_KEYS = [
    ("pairs made", "preferences:pairs"),
    ("mean kinship", "preferences:mean_kinship"),
    ("mean S_pref gap", "preferences:mean_s_pref_gap"),
    ("rating agreement", "preferences:rating_agree"),
    ("pairs kept (selection)", "select:pairs_kept"),
    ("train loss", "train:train_loss"),
]
HELDOUT = [
    ("loss", "loss"),
    ("reward accuracy", "reward_accuracy"),
    ("reward margin", "reward_margin"),
]
#: What "before training" is for a reference-based objective: the reference against itself.
DEFINITIONAL = {"loss": math.log(2), "reward_accuracy": 0.0, "reward_margin": 0.0}
LEGEND = (
    "Scores ×100 on each benchmark's headline metric; columns in the paper's Table 2 order "
    "(MMLU, MMLU-Pro, ARC-E, ARC-C, IFEval), then its Total: the 0–1 mean of those five "
    "(×100 here), then benchmarks the paper's Table 2 does not have (HellaSwag). A cell shows "
    "the score and its 95 % interval (one run) or the mean ± sd over seeds (replicates: runs "
    "that differ only in seed; intervals with Student t, n − 1 degrees of freedom). ▲/▼: the "
    "difference from the reference (the RLAIF row, else the untrained base) is significant: "
    "its test's p (exact McNemar for 0/1 items with one run per side, sign-flip for continuous "
    "items, a bootstrap p for replicates, a normal p for means over tables), Holm-adjusted "
    "across the columns of that comparison, is below 0.05 — never from fewer than 10 items. "
    "Difference intervals: Tango's score interval for 0/1 items (never zero-width), else a "
    "paired bootstrap; the Total's from the bootstrap of the Total itself. Bold: the best shown "
    "value of a column, significant and not below the untrained base. Green (pooled views): at "
    "or above the reference."
)


def col_label(col: str) -> str:
    """Column heading: the paper's name; the Total; a ``*`` for columns outside Table 2."""
    if col == TOTAL:
        return "Total"
    label = BENCH_LABEL.get(col, col)
    return label if col in TABLE2_BENCHMARKS else f"{label}*"


def mark(line: Line, col: str) -> str:
    """▲/▼ for a significant difference from the reference, else empty."""
    d = line.diffs.get(col)
    return {1: "▲", -1: "▼"}.get(d.sign, "") if d else ""


def interval(est: Estimate, scale: float = 100.0) -> str:
    """``lo–hi`` (scaled), empty when unknown."""
    if est.lo is None or est.hi is None:
        return ""
    return f"{scale * est.lo:.1f}–{scale * est.hi:.1f}"


def spread(line: Line, est: Estimate, pooled: bool) -> str:
    """``± sd`` for replicates, else the 95 % interval."""
    if est.sd is not None and est.n > 1 and not pooled:
        return f"± {100 * est.sd:.1f}"
    return interval(est)


def line_label(line: Line, pooled: bool) -> str:
    """A line's label with its number of runs or seeds."""
    if line.untrained:
        return "untrained base (mean over tables)" if pooled else "untrained base"
    runs = f"{line.n} runs" if pooled else (f"{line.n} seeds" if line.n > 1 else "")
    return f"{line.label} · {runs}" if runs else line.label


def p_fmt(p: float) -> str:
    """A p-value as text: two significant digits, ``< 0.001`` below that."""
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_text(d: Estimate, *, short: bool = False) -> str:
    """``p_holm 0.03 (mcnemar, 42 items)`` (``short``: ``p_holm 0.03``) or why no mark."""
    p = d.p_holm if d.p_holm is not None else d.p
    if p is None:
        return "no test"
    few = d.items and d.items < 10
    if short:
        return f"p_holm {p_fmt(p)}" + (", < 10 items" if few else "")
    tail = " — under 10 items: never marked" if few else ""
    return f"p_holm {p_fmt(p)} ({d.test or 'test'}, {d.items} items){tail}"


def diff_text(d: Estimate) -> str:
    """``+3.1 [-1.0, +7.2] ▲`` (points)."""
    text = f"{100 * d.value:+.1f}"
    if d.lo is not None and d.hi is not None:
        text += f" [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"
    return text + ({1: " ▲", -1: " ▼"}.get(d.sign, ""))


def ref_name(table: Table) -> str:
    """The reference of a table's marks, in words."""
    return "the untrained base" if table.reference.untrained else table.reference.label


def caption(table: Table) -> str:
    """Suite, protocol and reference of a table."""
    note = SUITE_NOTE.get(table.suite)
    suite = f"suite {table.suite}" if table.suite != "?" else "suite not recorded (meta.suite)"
    suite += f" ({note})" if note else ""
    view = {
        "paper": "each strategy averaged over every base model × method, as the paper's Table 2 "
        "averages its Table 4; ",
        "method": "per-method view (not the paper's Table 2): averaged over base models; ",
    }.get(table.kind, "")
    return f"{view}{suite}; protocol {table.protocol}; ▲/▼ and bold vs {ref_name(table)}."


def _cell(line: Line, col: str, table: Table) -> str:
    est = line.cells.get(col)
    if est is None:
        return "–"
    text = f"{100 * est.value:.1f}"
    if col in line.at_or_above:
        text = f"_{text}_"
    sp = spread(line, est, table.pooled)
    text += f" [{sp}]" if sp and not sp.startswith("±") else f" {sp}"
    text = (text.rstrip() + " " + mark(line, col)).rstrip()
    return f"**{text}**" if col in line.bold else text


def table_markdown(table: Table) -> list[str]:
    """One table and, below it, the differences from its reference."""
    cols = table.columns
    head = [col_label(c) + (f" ({table.items[c]})" if table.items.get(c) else "") for c in cols]
    out = [f"### {table.title}", "", caption(table), ""]
    out += ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for line in table.lines:
        cells = [_cell(line, col, table) for col in cols]
        names = "" if line.untrained or table.pooled else f" [{', '.join(line.names)}]"
        out.append(f"| {line_label(line, table.pooled)}{names} | " + " | ".join(cells) + " |")
    diffs = [ln for ln in table.lines[1:] if ln.diffs]
    if diffs:
        out += ["", f"Difference from {ref_name(table)} (points, 95 % interval):", ""]
        out += [
            "| | " + " | ".join(col_label(c) for c in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for ln in diffs:
            cells = [diff_text(ln.diffs[c]) if c in ln.diffs else "–" for c in cols]
            out.append(f"| {line_label(ln, table.pooled)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def rlaif_command(table: Table) -> str:
    """The exact command that adds the missing RLAIF row of a table."""
    base = table.bases[0]
    return (
        f"dvc exp run --queue -S kinship=rlaif -S train.method={table.method} "
        f"-S base_model.source={base} && dvc exp run --run-all"
    )


def verdict(tables: Sequence[Table]) -> list[str]:
    """One paragraph per base model x method: which strategies beat RLAIF on the Total, by how
    much, significant after adjustment or not; or the command that runs RLAIF."""
    out = []
    for t in tables:
        head = f"**{t.bases[0]} · {t.method.upper()}** ({t.suite}): "
        lines = [ln for ln in t.lines[1:] if ln.strategy != "rlaif"]
        if t.reference.untrained:
            why = "no RLAIF run, so no verdict against the baseline (marks: vs the untrained base)"
            out.append(f"{head}{why}. Run it: `{rlaif_command(t)}`")
            continue
        col = TOTAL if TOTAL in t.columns else t.columns[0]
        parts = []
        for ln in lines:
            d = ln.diffs.get(col)
            if d is None:
                continue
            word = "beats" if d.value > 0 else ("ties" if d.value == 0 else "trails")
            sig = "significant" if d.significant else "not significant"
            parts.append(f"{ln.label} {word} RLAIF by {diff_text(d)} points ({sig}, {p_text(d)})")
        name = "the Total" if col == TOTAL else col_label(col)
        out.append(head + f"on {name}: " + ("; ".join(parts) or "no KARMA run") + ".")
    return out


def markdown_table(rows: Sequence[Row], **kwargs: Any) -> str:
    """The verdict, then the paper-style tables as Markdown; see :func:`build_tables`."""
    tables, pooled, notes = build_tables(rows, **kwargs)
    lines = ["### Verdict", "", *(f"- {v}" for v in verdict(tables)), ""]
    for table in [*pooled, *tables]:
        lines += table_markdown(table)
    data = data_table(tables)
    if data:
        lines += ["### Data and training", "", data]
    held = heldout_table(tables)
    if held:
        lines += ["### Held-out preference split (diagnostics/train.json)", "", held]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _aggregate(rows: Sequence[Row], key: str) -> str:
    vals = [v for r in rows if (v := num(get(r["metrics"], key))) is not None]
    return _mean_sd(vals)


def _mean_sd(vals: Sequence[float]) -> str:
    if not vals:
        return "–"
    mean = math.fsum(vals) / len(vals)
    return f"{mean:.4g} ± {statistics.stdev(vals):.2g}" if len(vals) > 1 else f"{mean:.4g}"


def group_label(line: Line) -> str:
    """``label · method · base`` (+ seeds) of a configuration."""
    r = line.rows[0]
    base = meta(r, "base_model", "base_model.source") or "?"
    method = meta(r, "train_method", "train.method") or "?"
    seeds = f" · {line.n} seeds" if line.n > 1 else ""
    return f"{line.label} · {method} · {base}{seeds}"


def _trained(rows: Sequence[Row]) -> str:
    vals = []
    for r in rows:
        train = {k.split(":", 1)[1]: v for k, v in r["metrics"].items() if k.startswith("train:")}
        kept = num(get(r["metrics"], "select:pairs_kept"))
        if (n := trained_pairs(train, kept)) is not None:
            vals.append(float(n))
    return _mean_sd(vals)


def data_table(tables: Sequence[Table]) -> str:
    """Markdown table of the data-side numbers per configuration (mean ± sd over seeds);
    "pairs trained" is what the optimizer saw (steps × global batch, at most the pairs kept)."""
    lines = [ln for t in tables for ln in t.lines[1:]]
    body = [
        [group_label(ln), *(_aggregate(ln.rows, k) for _, k in DATA_KEYS), _trained(ln.rows)]
        for ln in lines
    ]
    return markdown_grid(["configuration", *(lab for lab, _ in DATA_KEYS), "pairs trained"], body)


def _change(rows: Sequence[Row], key: str) -> str:
    """A paired change over replicate runs (``key`` with ``.ci_low``/``.ci_high``), as text
    (no mark: the held-out change has no test of its own here)."""
    ests = []
    for r in rows:
        g = r["metrics"]
        if (v := num(get(g, key))) is not None:
            ests.append(Estimate(v, num(get(g, key + ".ci_low")), num(get(g, key + ".ci_high"))))
    if not ests or len(ests) < len(rows):
        return "–"
    d = replicates(ests)
    text = f"{d.value:+.3g}"
    if d.lo is not None and d.hi is not None:
        text += f" [{d.lo:+.3g}, {d.hi:+.3g}]"
    return text


def markdown_grid(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table, leaving out the columns (but the first) that have no value."""
    keep = [0] + [j for j in range(1, len(head)) if any(r[j] != "–" for r in body)]
    if len(keep) == 1:
        return ""
    lines = ["| " + " | ".join(head[j] for j in keep) + " |", "|---|" + "---|" * (len(keep) - 1)]
    lines += ["| " + " | ".join(r[j] for j in keep) + " |" for r in body]
    return "\n".join(lines) + "\n"


def definitional(rows: Sequence[Row]) -> bool:
    """True when "before training" is the reference against itself (loss ln 2, reward
    accuracy and margin 0 by construction): then the change is the "after" value."""
    for r in rows:
        for m, v in DEFINITIONAL.items():
            got = num(get(r["metrics"], f"train:heldout.before.{m}"))
            if got is None or abs(got - v) > 1e-9:
                return False
    return bool(rows)


def heldout_table(tables: Sequence[Table]) -> str:
    """Held-out preference metrics after training (interval), and the paired change where
    "before" is not a definition (reference-free objectives)."""
    head, body = ["configuration"], []
    for lab, _ in HELDOUT:
        head += [f"{lab} after [95 %]", f"Δ {lab}"]
    for ln in (ln for t in tables for ln in t.lines[1:]):
        cells = [group_label(ln)]
        fixed = definitional(ln.rows)
        for _, m in HELDOUT:
            after = _with_interval(ln.rows, f"train:heldout.after.{m}")
            change = (
                "– (before = reference: definitional)"
                if fixed
                else _change(ln.rows, f"train:heldout.delta.{m}")
            )
            cells += [after, change]
        body.append(cells)
    return markdown_grid(head, body)


def _with_interval(rows: Sequence[Row], key: str) -> str:
    ests = []
    for r in rows:
        g = r["metrics"]
        if (v := num(get(g, key))) is not None:
            ests.append(Estimate(v, num(get(g, key + ".ci_low")), num(get(g, key + ".ci_high"))))
    if not ests:
        return "–"
    e = replicates(ests)
    text = f"{e.value:.3g}"
    return text + (f" [{e.lo:.3g}, {e.hi:.3g}]" if e.lo is not None and e.hi is not None else "")
