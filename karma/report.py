"""The paper's results table from DVC experiments, as Markdown and as a self-contained HTML page.

Rows are experiments (``dvc exp show``), grouped by training method; columns are the
evaluation benchmarks (``policy.<benchmark>.<metric>`` in ``metrics/eval.json``).

>>> rows = [{"name": "exp-a", "params": {"kinship": "sim", "train.method": "dpo"},
...          "metrics": {"policy.arc_easy.acc": 0.5, "base.arc_easy.acc": 0.4}}]
>>> print(markdown_table(rows).splitlines()[0])
### DPO
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from karma.errors import KarmaError

log = logging.getLogger(__name__)

STRATEGY_ORDER = ["rlaif", "score", "sim", "score_sim", "random"]
STRATEGY_LABEL = {
    "rlaif": "RLAIF (baseline)",
    "score": "KARMA score",
    "sim": "KARMA sim",
    "score_sim": "KARMA score_sim",
    "random": "random pairs",
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
# The headline metric of a benchmark when the evaluation reports several (first one found).
PRIMARY = ["prompt_level_strict_acc", "acc_norm", "exact_match", "acc"]
CURVES = ["loss", "rewards/accuracies", "rewards/margins", "learning_rate"]
Row = dict[str, Any]


def _strip(key: str) -> str:
    """``metrics/eval.json:policy.x`` -> ``eval:policy.x`` (DVC prefixes names files share)."""
    if ":" not in key:
        return key
    path, name = key.split(":", 1)
    return f"{Path(path).stem}:{name}"


def _get(metrics: dict[str, float], key: str) -> float | None:
    """``metrics[key]``, where ``file:name`` also matches a plain ``name`` that DVC left bare."""
    if key in metrics:
        return metrics[key]
    return metrics.get(key.split(":", 1)[-1])


def collect_experiments(repo: str | Path = ".", *, workspace: bool = False) -> list[Row]:
    """Experiments derived from HEAD (baseline included) as ``{name, rev, params, metrics}``."""
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
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value)
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


def benchmarks(rows: Sequence[Row], who: str = "policy") -> list[str]:
    """One ``<benchmark>.<metric>`` per benchmark found under ``who.``: its headline metric."""
    found: dict[str, set[str]] = {}
    for row in rows:
        for key in row["metrics"]:
            if key.startswith(who + ".") and key.count(".") >= 2:
                bench, metric = key[len(who) + 1 :].split(".", 1)
                found.setdefault(bench, set()).add(metric)
    out = []
    for bench, metrics in sorted(found.items()):
        metric = next((m for m in PRIMARY if m in metrics), min(metrics))
        out.append(f"{bench}.{metric}")
    return out


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" if abs(value) <= 1.0 else f"{value:.2f}"


def _order(row: Row) -> tuple[int, str]:
    strategy = str(row["params"].get("kinship", ""))
    rank = STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return rank, row["name"]


def results(rows: Sequence[Row]) -> dict[str, list[tuple[str, list[float | None]]]]:
    """Per training method: ``[(row label, values per benchmark + average)]``, base model first."""
    benches = benchmarks(rows)
    out: dict[str, list[tuple[str, list[float | None]]]] = {}
    for row in sorted(rows, key=_order):
        method = str(row["params"].get("train.method", "?"))
        table = out.setdefault(method, [])
        if not table:
            base = [row["metrics"].get(f"base.{b}") for b in benches]
            table.append(("base model (no training)", [*base, _mean(base)]))
        vals = [row["metrics"].get(f"policy.{b}") for b in benches]
        strategy = str(row["params"].get("kinship", "?"))
        select = row["params"].get("select.method")
        label = STRATEGY_LABEL.get(strategy, strategy)
        if select and select != "none":
            label += f" + {select} selection"
        table.append((f"{label} [{row['name']}]", [*vals, _mean(vals)]))
    return out


def _best(table: list[tuple[str, list[float | None]]], n: int) -> list[float | None]:
    """Best policy value per column; none when a table has a single policy (nothing to compare)."""
    if len(table) < 3:
        return [None] * n
    return [max((v[i] for _, v in table[1:] if v[i] is not None), default=None) for i in range(n)]


def _mean(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None and not math.isnan(v)]
    return sum(real) / len(real) if real else None


def markdown_table(rows: Sequence[Row]) -> str:
    """The results table (fractions shown x100); the best policy value per column in bold."""
    benches = benchmarks(rows)
    header = ["", *[b.replace(".", " ") for b in benches], "avg"]
    lines: list[str] = []
    for method, table in results(rows).items():
        best = _best(table, len(header) - 1)
        lines += [f"### {method.upper()}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for i, (label, values) in enumerate(table):
            cells = []
            for j, v in enumerate(values):
                text = _fmt(v)
                cells.append(f"**{text}**" if i and v is not None and v == best[j] else text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    data = data_table(rows)
    if data:
        lines += ["### Data and training", "", data]
    return "\n".join(lines).rstrip() + "\n"


def data_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the data-side metrics each experiment has (pairs, kinship, loss...)."""
    keys = [(lab, k) for lab, k in DATA_KEYS if any(_get(r["metrics"], k) for r in rows)]
    if not keys:
        return ""
    lines = ["| experiment | kinship | method | " + " | ".join(lab for lab, _ in keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 3))
    for row in sorted(rows, key=_order):
        cells = [_get(row["metrics"], k) for _, k in keys]
        text = [f"{v:.4g}" if v is not None else "–" for v in cells]
        p = row["params"]
        lines.append(
            f"| {row['name']} | {p.get('kinship', '?')} | {p.get('train.method', '?')} | "
            + " | ".join(text)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def curves_png(tsv_files: Sequence[Path]) -> bytes | None:
    """Training curves (one panel per dvclive metric TSV) as PNG bytes, or None without data."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def name(path: Path) -> str:
        parts = path.with_suffix("").parts
        return "/".join(parts[parts.index("metrics") + 1 :]) if "metrics" in parts else path.stem

    named = {name(p): p for p in tsv_files}
    chosen = [c for c in CURVES if c in named] or sorted(named)
    series = []
    for key in chosen:
        path = named[key]
        with path.open() as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            pts = [(float(r["step"]), float(r[reader.fieldnames[-1]])) for r in reader]
        if pts:
            series.append((key, pts))
    if not series:
        return None
    cols = min(4, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False)
    for ax, (name, pts) in zip(axes.flat, series, strict=False):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#3b6ea5")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def html_page(
    rows: Sequence[Row],
    *,
    figures: Sequence[Path] = (),
    curve_files: Sequence[Path] = (),
    title: str = "KARMA experiments",
) -> str:
    """A self-contained page (inline CSS, images as data URIs; opens offline)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}",
        "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        "td:first-child,th:first-child{text-align:left}th{background:#f3f5f8}",
        "tr.base td{color:#666;font-style:italic}td.best{font-weight:bold;background:#eaf5ea}",
        "figure{display:inline-block;margin:0.5rem;vertical-align:top}",
        "img{max-width:520px;border:1px solid #ddd}figcaption{font-size:0.85rem;color:#555}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Policy scores on the evaluation suites (×100 for fractions); the best value per "
        "column and method is highlighted. The first row of each table is the untrained base.</p>",
    ]
    benches = benchmarks(rows)
    header = ["", *benches, "avg"]
    for method, table in results(rows).items():
        best = _best(table, len(header) - 1)
        parts.append(f"<h2>{html.escape(method.upper())}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for i, (label, values) in enumerate(table):
            parts.append("<tr class='base'>" if i == 0 else "<tr>")
            parts.append(f"<td>{html.escape(label)}</td>")
            for j, v in enumerate(values):
                cls = " class='best'" if i and v is not None and v == best[j] else ""
                parts.append(f"<td{cls}>{_fmt(v)}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    data = [(lab, k) for lab, k in DATA_KEYS if any(_get(r["metrics"], k) for r in rows)]
    if data:
        parts.append("<h2>Data and training</h2><table><tr><th>experiment</th>")
        labels = ["kinship", "method", *(lab for lab, _ in data)]
        parts += [f"<th>{html.escape(k)}</th>" for k in labels]
        parts.append("</tr>")
        for row in sorted(rows, key=_order):
            p = row["params"]
            parts.append(f"<tr><td>{html.escape(row['name'])}</td>")
            parts.append(f"<td>{html.escape(str(p.get('kinship', '?')))}</td>")
            parts.append(f"<td>{html.escape(str(p.get('train.method', '?')))}</td>")
            for _, k in data:
                v = _get(row["metrics"], k)
                parts.append(f"<td>{'–' if v is None else f'{v:.4g}'}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    curves = curves_png(curve_files) if curve_files else None
    if curves:
        parts.append("<h2>Training curves (current workspace)</h2>")
        parts.append(
            "<figure><img alt='training curves' style='max-width:1000px' "
            f"src='data:image/png;base64,{base64.b64encode(curves).decode()}'></figure>"
        )
    if figures:
        parts.append("<h2>Figures (current workspace)</h2>")
        for fig in figures:
            caption = html.escape(str(fig))
            parts.append(
                f"<figure><img alt='{caption}' src='data:image/png;base64,{_png_b64(fig)}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>\n")
    return "".join(parts)


def _workspace_files(repo: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under the repo's visible top-level folders (not .git, .venv)."""
    skip = {".git", ".dvc", ".venv", "node_modules"}
    found: list[Path] = []
    for top in sorted(p for p in repo.iterdir() if p.is_dir() and p.name not in skip):
        if not top.name.startswith("."):
            found += top.rglob(pattern)
    return sorted(found)


def render(repo: str | Path = ".", *, workspace: bool = False) -> tuple[str, str, int]:
    """``(markdown, html, number of experiments)`` of the project's experiments."""
    repo = Path(repo)
    rows = collect_experiments(repo, workspace=workspace)
    md = "# KARMA experiments\n\n" + markdown_table(rows)
    figures = [f for f in _workspace_files(repo, "*.png") if f.parts[len(repo.parts)] == "plots"]
    curves = [
        p for p in _workspace_files(repo, "*.tsv") if "metrics" in p.parts and "plots" in p.parts
    ]
    return md, html_page(rows, figures=figures, curve_files=curves), len(rows)


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
        cells = [_num(d.get("old")), _num(d.get("new")), _num(d.get("diff"), signed=True)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        lines.append("| (no metric changed) | | | |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, *, signed: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "–"
    return f"{value:+.4g}" if signed else f"{value:.4g}"
