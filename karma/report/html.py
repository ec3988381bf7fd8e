"""The report as one self-contained HTML page (inline CSS, images as data URIs; offline).

Order: the verdict per base model, the paper's Table 2 (pooled over bases x methods), the
per-base tables each with its differences from the reference (visible, not collapsed), data
and held-out tables, then the figures (each experiment's labelled with its configuration).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from karma.report.collect import Row, SampleLoader, row_samples
from karma.report.figures import (
    capability_png,
    differences_png,
    experiment_figures,
    kinship_figures,
    selection_figure,
)
from karma.report.markdown import (
    LEGEND,
    caption,
    col_label,
    data_table,
    diff_text,
    heldout_table,
    line_label,
    mark,
    p_text,
    ref_name,
    spread,
    verdict,
)
from karma.report.tables import TOTAL, Table, build_tables

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:1rem auto;max-width:1860px;padding:0 16px}
body{color:#222}
h1{font-size:1.5rem;margin:.4rem 0}
h2{font-size:1.2rem;margin:1.4rem 0 .3rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1rem 0 .2rem}p.cap{margin:.1rem 0 .3rem;color:#555;font-size:13px}
table{border-collapse:collapse;margin:.2rem 0 .6rem;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d5d9e0;padding:3px 7px;text-align:right;vertical-align:top}
td,th{white-space:nowrap}table.wrap td,table.wrap th{white-space:normal}
th{background:#f3f5f8;font-weight:600}
th small,td small{display:block;font-weight:400;color:#666;font-size:12px}
td:first-child,th:first-child{text-align:left;white-space:normal;min-width:180px;max-width:330px}
tr.untrained td{background:#f4f4f4;font-style:italic;color:#555}
tr.ref td:first-child{font-weight:600}
td.ge{background:#e3f2e3}td.best .v{font-weight:700}
.mk{color:#1a7f37;padding-left:2px}.mk.dn{color:#c62828}
table.diff td{font-size:13px}table.diff small{font-size:11px}
.legend{background:#f6f8fa;border:1px solid #e1e4e8;padding:6px 10px;font-size:13px}
.verdict{background:#fffbe6;border:1px solid #e8d9a8;padding:6px 14px}
.verdict li{margin:.2rem 0}code{font-size:13px;background:#f0f0f0;padding:0 3px}
figure{margin:.4rem 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #ddd}figure.half{width:49%}
figcaption{font-size:13px;color:#444}ul.missing li{color:#8a4b00}
""".replace("\n", "")


def img(data: bytes, alt: str, cls: str = "") -> str:
    """An inline PNG with its caption."""
    src = base64.b64encode(data).decode()
    cap = html.escape(alt)
    klass = f" class='{cls}'" if cls else ""
    image = f"<img alt='{cap}' src='data:image/png;base64,{src}'>"
    return f"<figure{klass}>{image}<figcaption>{cap}</figcaption></figure>"


def _code(text: str) -> str:
    """Escaped text with `backticks` as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _bold(text: str) -> str:
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _head(table: Table) -> list[str]:
    e = html.escape
    out = [f"<h3>{e(table.title)}</h3><p class='cap'>{e(caption(table))}</p><table><tr><th></th>"]
    for c in table.columns:
        sub = "mean of the 5" if c == TOTAL else table.items.get(c, "")
        out.append(f"<th>{e(col_label(c))}<small>{e(sub)}</small></th>")
    return [*out, "</tr>"]


def html_table(table: Table) -> list[str]:
    """A table and, right below it, the differences from its reference (with their tests)."""
    e = html.escape
    out = _head(table)
    for line in table.lines:
        cls = "untrained" if line.untrained else ("ref" if line is table.reference else "")
        names = "" if line.untrained or table.pooled else ", ".join(line.names[:4])
        names += " …" if len(line.names) > 4 and not table.pooled else ""
        small = f"<small>{e(names)}</small>" if names else ""
        out.append(f"<tr class='{cls}'><td>{e(line_label(line, table.pooled))}{small}</td>")
        for col in table.columns:
            est = line.cells.get(col)
            if est is None:
                out.append("<td>–</td>")
                continue
            klass = " ".join(
                k for k, on in (("best", col in line.bold), ("ge", col in line.at_or_above)) if on
            )
            mk = mark(line, col)
            mk = f"<span class='mk{' dn' if mk == '▼' else ''}'>{mk}</span>" if mk else ""
            out.append(
                f"<td class='{klass}'><span class='v'>{100 * est.value:.1f}</span>{mk}"
                f"<small>{e(spread(line, est, table.pooled))}</small></td>"
            )
        out.append("</tr>")
    out.append("</table>")
    diffs = [ln for ln in table.lines[1:] if ln.diffs]
    if diffs:
        out.append(
            f"<p class='cap'>Difference from {e(ref_name(table))} (points, 95 % "
            "interval; below: the test's Holm-adjusted p; hover for the test)</p>"
            "<table class='diff'><tr><th></th>"
        )
        out += [f"<th>{e(col_label(c))}</th>" for c in table.columns] + ["</tr>"]
        for ln in diffs:
            out.append(f"<tr><td>{e(line_label(ln, table.pooled))}</td>")
            for c in table.columns:
                d = ln.diffs.get(c)
                if d is None:
                    out.append("<td>–</td>")
                    continue
                title = e(f"{diff_text(d)}: {d.how}; {p_text(d)}")
                mk = {1: " ▲", -1: " ▼"}.get(d.sign, "")
                ci = (
                    "" if d.lo is None or d.hi is None else f"{100 * d.lo:+.1f} … {100 * d.hi:+.1f}"
                )
                out.append(f"<td title='{title}'>{100 * d.value:+.1f}{mk}<small>{e(ci)}</small>"
                           f"<small>{e(p_text(d, short=True))}</small></td>")  # fmt: skip
            out.append("</tr>")
        out.append("</table>")
    return out


def md_to_html_table(md: str) -> str:
    """A simple Markdown table (our own output) as an HTML table."""
    rows = [r.strip().strip("|").split(" | ") for r in md.strip().splitlines()]
    head, body = rows[0], rows[2:]
    out = ["<table class='wrap'><tr>", *(f"<th>{html.escape(h.strip())}</th>" for h in head)]
    out.append("</tr>")
    for r in body:
        out += ["<tr>", *(f"<td>{html.escape(c.strip())}</td>" for c in r), "</tr>"]
    return "".join([*out, "</table>"])


def html_page(
    rows: Sequence[Row],
    *,
    repo: Path | None = None,
    samples: SampleLoader = row_samples,
    seed: int = 0,
    n_boot: int = 2000,
    title: str = "KARMA experiments",
) -> str:
    """One self-contained page; figures from ``repo`` (each experiment's at its revision)."""
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
        "<h2>Verdict</h2><ul class='verdict'>",
        *(f"<li>{_bold(_code(v))}</li>" for v in verdict(tables)),
        "</ul>",
        f"<p class='legend'>{e(LEGEND)}</p>",
    ]
    for t in pooled:
        parts += html_table(t)
    if not any(t.kind == "paper" for t in pooled):
        parts.append(
            "<p class='cap'>The paper's Table 2 (pooled over base models × methods) "
            "needs two or more tables: one base model and one method here.</p>"
        )
    parts.append("<h2>Per base model and method</h2>")
    for t in tables:
        parts += html_table(t)
    parts += _side_tables(tables)
    parts += _figures_html(tables, pooled, rows, repo)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _side_tables(tables: Sequence[Table]) -> list[str]:
    out = []
    data = data_table(tables)
    if data:
        out += ["<h2>Data and training</h2>", md_to_html_table(data)]
    held = heldout_table(tables)
    if held:
        out += [
            "<h2>Held-out preference split (diagnostics/train.json)</h2>",
            "<p class='cap'>After training, with its 95 % interval. For a reference-based "
            "objective (DPO) the policy before training is the reference itself: loss ln 2, "
            "reward accuracy and margin 0 by construction, so no change is shown against "
            "that definition; the after value is the result.</p>",
            md_to_html_table(held),
        ]
    return out


def _figures_html(
    tables: Sequence[Table], pooled: Sequence[Table], rows: Sequence[Row], repo: Path | None
) -> list[str]:
    """The figures: what is not shown (and why) first, then the figures."""
    e = html.escape
    figs: list[str] = []
    missing: list[str] = []
    if sum(len(t.lines) - 1 for t in tables) > 1:
        figs.append("<h3>Results by capability, and differences from the reference</h3>")
        cap = "Per-capability scores (the paper's Fig. 5): mean of its benchmarks, 95 % intervals"
        figs.append(img(capability_png(pooled or tables), cap))
        diff = differences_png([*pooled, *tables])
        if diff is not None:
            figs.append(
                img(
                    diff,
                    "Difference from the reference per column (filled: significant "
                    "after Holm; hollow: not), 95 % intervals",
                )
            )
    else:
        missing.append(
            "per-capability bars and differences: one configuration only; run more "
            "(`dvc exp run -S kinship=...`)"
        )
    if repo is not None:
        for heading, (found, why) in (
            ("Kinship (shared by every experiment of this commit)", kinship_figures(repo)),
            ("Each experiment's own figures", experiment_figures(rows, repo)),
            ("MAP selection (workspace)", selection_figure(repo, rows)),
        ):
            missing += why
            if found:
                figs.append(f"<h3>{e(heading)}</h3>")
                figs += [img(f.data, f.caption, "half" if f.half else "") for f in found]
    out = ["<h2>Figures</h2>"]
    if missing:
        out += ["<p>Not shown:</p><ul class='missing'>", *(f"<li>{_code(m)}</li>" for m in missing)]
        out.append("</ul>")
    return out + figs
