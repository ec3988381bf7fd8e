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
DATA_KEYS = [
    "pairs_kept",
    "mean_kinship",
    "mean_s_pref_gap",
    "rating_agreement",
    "pairs_selected",
    "train_loss",
    "wall_time_s",
]
Row = dict[str, Any]


def _strip(key: str) -> str:
    """``metrics/eval.json:policy.x.acc`` -> ``policy.x.acc`` (DVC prefixes colliding names)."""
    return key.split(":", 1)[1] if ":" in key else key


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
    """``<benchmark>.<metric>`` names found under ``who.`` in any row, sorted."""
    found = set()
    for row in rows:
        for key in row["metrics"]:
            if key.startswith(who + ".") and key.count(".") >= 2:
                found.add(key[len(who) + 1 :])
    return sorted(found)


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


def _mean(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None and not math.isnan(v)]
    return sum(real) / len(real) if real else None


def markdown_table(rows: Sequence[Row]) -> str:
    """The results table (fractions shown x100); the best policy value per column in bold."""
    benches = benchmarks(rows)
    header = ["", *[b.replace(".", " ") for b in benches], "avg"]
    lines: list[str] = []
    for method, table in results(rows).items():
        best = [
            max((v[i] for _, v in table[1:] if v[i] is not None), default=None)
            for i in range(len(header) - 1)
        ]
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
    keys = [k for k in DATA_KEYS if any(k in r["metrics"] for r in rows)]
    if not keys:
        return ""
    lines = ["| experiment | kinship | method | " + " | ".join(keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 3))
    for row in sorted(rows, key=_order):
        cells = [row["metrics"].get(k) for k in keys]
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

    series = []
    for path in tsv_files:
        with path.open() as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            pts = [(float(r["step"]), float(r[reader.fieldnames[-1]])) for r in reader]
        if pts:
            series.append((str(path.with_suffix("").name), pts))
    if not series:
        return None
    cols = min(3, len(series))
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
        best = [
            max((v[i] for _, v in table[1:] if v[i] is not None), default=None)
            for i in range(len(header) - 1)
        ]
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
    data = [k for k in DATA_KEYS if any(k in r["metrics"] for r in rows)]
    if data:
        parts.append("<h2>Data and training</h2><table><tr><th>experiment</th>")
        parts += [f"<th>{html.escape(k)}</th>" for k in ["kinship", "method", *data]]
        parts.append("</tr>")
        for row in sorted(rows, key=_order):
            p = row["params"]
            parts.append(f"<tr><td>{html.escape(row['name'])}</td>")
            parts.append(f"<td>{html.escape(str(p.get('kinship', '?')))}</td>")
            parts.append(f"<td>{html.escape(str(p.get('train.method', '?')))}</td>")
            for k in data:
                v = row["metrics"].get(k)
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
