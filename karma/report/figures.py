"""The report's figures: capability bars, differences with intervals, training curves, and
each experiment's own figures read from its revision (labelled with its configuration).

Figures are PNG bytes (matplotlib, Agg); sizes chosen to be legible at 1280 px.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from karma.core.settings import DEFAULT_GROUPS
from karma.report.collect import Row, git_file
from karma.report.estimates import Z, linear
from karma.report.markdown import col_label, line_label, ref_name
from karma.report.tables import Estimate, Line, Table, meta

COLORS = {
    "": "#9e9e9e",
    "rlaif": "#e08a2c",
    "score": "#3b6ea5",
    "sim": "#4c9a5b",
    "score_sim": "#8a5aa8",
    "random": "#8d6e63",
}
CURVES = ["loss", "rewards/accuracies", "rewards/margins"]
CURVES_DIR = "dvclive/train/plots/metrics"
#: The figure each experiment makes of its own data (git-tracked at its revision).
PAIRS_PNG = "plots/preferences/pairs.png"
#: Shared figures of the workspace: (folder, caption, what makes them).
KINSHIP_DIR = "plots/kinship"
KINSHIP_WHY = "not in this clone: run `dvc pull plots/kinship` or `dvc repro kinship`"
SELECT_PNG = "plots/select/margins.png"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (no timestamp metadata: the same bytes every run)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def _capability(line: Line, benches: Sequence[str]) -> Estimate | None:
    parts = [line.cells[b] for b in benches if b in line.cells]
    return linear(parts, [1 / len(parts)] * len(parts)) if parts else None


def capability_png(tables: Sequence[Table]) -> bytes:
    """Per-capability bars (the paper's Fig. 5): one panel per table, a bar per line."""
    plt = pyplot()
    groups = list(DEFAULT_GROUPS.items())
    cols = min(2, len(tables))
    nrows = math.ceil(len(tables) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.6 * nrows), squeeze=False)
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
                label=line_label(line, table.pooled),
                color=COLORS.get(line.strategy, "#607d8b"),
                alpha=0.6 if line.untrained else 1,
            )
        ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g, _ in groups], fontsize=10)
        ax.set_title(table.title, fontsize=10)
        ax.set_ylabel("mean score (×100), 95 % interval")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def differences_png(tables: Sequence[Table]) -> bytes | None:
    """Each strategy's difference from the reference per column, with its 95 % interval
    (filled: significant after Holm; hollow: not): replaces the radar, whose areas mislead."""
    tables = [t for t in tables if any(ln.diffs for ln in t.lines)]
    if not tables:
        return None
    plt = pyplot()
    cols = min(2, len(tables))
    nrows = math.ceil(len(tables) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.4 * nrows), squeeze=False)
    for ax, table in zip(axes.flat, tables, strict=False):
        lines = [ln for ln in table.lines[1:] if ln.diffs]
        columns = table.columns
        for i, line in enumerate(lines):
            off = (i - (len(lines) - 1) / 2) * (0.7 / max(1, len(lines)))
            for j, col in enumerate(columns):
                d = line.diffs.get(col)
                if d is None:
                    continue
                y = len(columns) - 1 - j + off
                color = COLORS.get(line.strategy, "#607d8b")
                if d.lo is not None and d.hi is not None:
                    ax.plot([100 * d.lo, 100 * d.hi], [y, y], color=color, lw=1.6)
                ax.plot(
                    100 * d.value,
                    y,
                    "o",
                    color=color,
                    ms=6,
                    mfc=color if d.significant else "white",
                    label=line_label(line, table.pooled) if j == 0 else None,
                )
        ax.axvline(0, color="#444", lw=0.8)
        ax.set_yticks(range(len(columns)), [col_label(c) for c in reversed(columns)], fontsize=10)
        ax.set_xlabel(f"difference from {ref_name(table)} (points, 95 % interval)")
        ax.set_title(table.title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(
            fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
        )
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def _series(name: str, text: str) -> tuple[str, list[tuple[float, float]]]:
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    last = (reader.fieldnames or ["?"])[-1]
    return name, [(float(r["step"]), float(r[last])) for r in reader]


def curves_png(series: Sequence[tuple[str, list[tuple[float, float]]]], title: str) -> bytes | None:
    """Training curves (one panel per dvclive metric), titled with the run's configuration."""
    series = [s for s in series if s[1]]
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.0), squeeze=False)
    for ax, (key, pts) in zip(axes.flat, series, strict=False):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#3b6ea5", marker=".")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png(fig)


@dataclass
class Figure:
    """A figure to embed: PNG bytes and its caption (what it shows, for which run)."""

    data: bytes
    caption: str
    half: bool = True


def config_label(row: Row) -> str:
    """An experiment's name and configuration, as its figures are labelled."""
    kinship = row["params"].get("kinship") or meta(row, "kinship") or "?"
    method = meta(row, "train_method", "train.method") or "?"
    seed = meta(row, "seed", "seed") or "?"
    return f"{row['name']} (kinship={kinship}, {method}, seed {seed})"


def experiment_figures(rows: Sequence[Row], repo: Path) -> tuple[list[Figure], list[str]]:
    """Each experiment's own pairs figure and training curves, read at its revision (git-
    tracked outputs), labelled with its configuration; and what is missing."""
    figs, missing = [], []
    seen: set[str] = set()
    for row in rows:
        label = config_label(row)
        rev = row.get("rev")
        if str(rev) in seen:  # rows without a rev (hand-made) are the workspace: once
            continue
        seen.add(str(rev))
        pairs = git_file(repo, rev, PAIRS_PNG)
        if pairs is not None:
            figs.append(Figure(pairs, f"model pairs used: {label}"))
        series = []
        for name in CURVES:
            text = git_file(repo, rev, f"{CURVES_DIR}/{name}.tsv")
            if text is not None:
                series.append(_series(name, text.decode()))
        curves = curves_png(series, f"training curves: {label}")
        if curves is not None:
            figs.append(Figure(curves, f"training curves ({CURVES_DIR}): {label}", half=False))
        if pairs is None and curves is None:
            missing.append(f"{label}: no {PAIRS_PNG} nor training curves at its revision")
    return figs, missing


def kinship_figures(repo: Path) -> tuple[list[Figure], list[str]]:
    """The workspace's kinship figures (the kinship stage does not read the pairing
    strategy: the same for every experiment of a commit): heatmap, PCA, dendrogram."""
    folder = repo / KINSHIP_DIR
    names = ["kinship_heatmap.png", "pca.png", "dendrogram_all.png"]
    found = [folder / n for n in names if (folder / n).is_file()]
    if not found:
        return [], [f"kinship figures ({KINSHIP_DIR}): {KINSHIP_WHY}"]
    figs = [  # the heatmap full width: its cell numbers are legible at 1280 px only so
        Figure(p.read_bytes(), f"{KINSHIP_DIR}/{p.name} (shared)", half=p.stem != "kinship_heatmap")
        for p in found
    ]
    return figs, []


def selection_figure(repo: Path, rows: Sequence[Row]) -> tuple[list[Figure], list[str]]:
    """The MAP margin scatter, only when the workspace's run selected pairs (no empty chart)."""
    ws = next((r for r in rows if r.get("rev") in (None, "workspace")), rows[0] if rows else None)
    method = (ws or {}).get("params", {}).get("select.method", "none") if ws else "none"
    if method in (None, "none"):
        return [], []
    path = repo / SELECT_PNG
    if not path.is_file():
        return [], [f"MAP selection figure ({SELECT_PNG}): run `dvc repro select`"]
    return [
        Figure(path.read_bytes(), f"MAP selection, explicit vs implicit margins ({SELECT_PNG})")
    ], []
