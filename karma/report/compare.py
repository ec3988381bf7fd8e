"""Comparing two runs for a pull request: ``karma compare A B`` and ``karma report --diff``.

``karma compare A B`` pairs the two experiments' *policies* item by item (the per-item results
each evaluate stage keeps in the DVC cache, read at each experiment's revision): per benchmark
the difference B - A with its interval and the test's p, Holm-adjusted across the benchmarks,
and the paper's Total with the bootstrap of the Total itself; then the held-out preference
metrics (unpaired: per-pair values are not kept) and every other headline number that changed.
Markdown, ready to paste into a pull request.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from karma.core.errors import KarmaError
from karma.core.settings import TABLE2_BENCHMARKS
from karma.core.stats import adjust_family, paired
from karma.report.collect import Row, collect_experiments, get, num, sample_loader
from karma.report.estimates import Z
from karma.report.figures import config_label
from karma.report.markdown import col_label
from karma.report.tables import TOTAL

HELDOUT = ("loss", "reward_accuracy", "reward_margin")


def _sha(repo: Path, rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"],
                          cwd=repo, capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip()


def find_run(rows: Sequence[Row], name: str, repo: Path) -> Row:
    """The experiment named ``name`` (or whose rev starts with it, or the same commit as the git
    revision ``name``: ``HEAD``, a branch, a sha)."""
    for row in rows:
        if name in (row["name"], row.get("rev")) or str(row.get("rev") or "").startswith(name):
            return row
    sha = _sha(repo, name)
    for row in rows:
        rev = str(row.get("rev") or "")
        if sha and rev not in ("", "workspace") and _sha(repo, rev) == sha:
            return row
    known = ", ".join(r["name"] for r in rows[:12])
    raise KarmaError(f"no experiment or revision {name!r}", expected=f"one of: {known}")


def paired_benchmarks(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, dict[str, Any]]:
    """``{bench: karma.core.stats.paired(B, A)}`` over the items both hold, Holm-adjusted, and
    the Total (bootstrap of the Total itself, stratified sign-flip p) when all five are there."""
    from karma.evaluation.metrics import total_comparison

    out: dict[str, dict[str, Any]] = {}
    arrays = {}
    for bench in [x for x in b if x in a]:
        common = sorted(set(a[bench]) & set(b[bench]))
        if not common:
            continue
        xa = np.array([a[bench][i] for i in common])
        xb = np.array([b[bench][i] for i in common])
        arrays[bench] = (xb, xa)
        out[bench] = paired(xb, xa, seed=seed, n_boot=n_boot)
    total = total_comparison(arrays, seed=seed, n_boot=n_boot)
    if total is not None:
        out[TOTAL] = total
    adjust_family(out)
    order = [*TABLE2_BENCHMARKS, TOTAL]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))


def _pts(x: float | None, signed: bool = True) -> str:
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def benchmark_rows(deltas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows of the paired differences."""
    lines = ["| benchmark | B − A (points) | 95 % interval | p | p (Holm) | significant | items |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for bench, d in deltas.items():
        sig = "yes" if d["significant"] else ("no (< 10 items)" if d["n"] < 10 else "no")
        lines.append(
            f"| {col_label(bench)} | {_pts(d['score'])} | [{_pts(d['ci_low'])}, "
            f"{_pts(d['ci_high'])}] | {d['p']:.3g} ({d['test']}) | {d['p_holm']:.3g} | {sig} | "
            f"{d['n']} |"
        )
    return lines


def heldout_rows(a: Row, b: Row) -> list[str]:
    """Held-out metrics after training, B - A with an unpaired normal interval."""
    lines = []
    for m in HELDOUT:
        key = f"train:heldout.after.{m}"
        va, vb = num(get(a["metrics"], key)), num(get(b["metrics"], key))
        if va is None or vb is None:
            continue
        ses = []
        for row in (a, b):
            lo, hi = (num(get(row["metrics"], f"{key}.ci_{s}")) for s in ("low", "high"))
            ses.append(None if lo is None or hi is None else (hi - lo) / (2 * Z))
        text = f"{vb - va:+.3g}"
        if all(s is not None for s in ses):
            half = Z * math.sqrt(sum(s * s for s in ses))  # type: ignore[operator]
            text += f" [{vb - va - half:+.3g}, {vb - va + half:+.3g}] (unpaired)"
        lines.append(f"| held-out {m} | {va:.3g} | {vb:.3g} | {text} |")
    return lines


def changed_rows(a: Row, b: Row) -> list[str]:
    """Every other headline number or text that differs (text values shown as text)."""
    lines = []
    for key in sorted(set(a["metrics"]) | set(b["metrics"])):
        if not key.startswith(("headline:", "metrics/headline.json:")) and ":" in key:
            continue
        va, vb = a["metrics"].get(key), b["metrics"].get(key)
        if va == vb or key.endswith((".lo", ".hi", ".sig", ".delta", ".score")):
            continue
        lines.append(f"| {key.split(':', 1)[-1]} | {_text(va)} | {_text(vb)} | {_change(va, vb)} |")
    return lines


def _text(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _change(va: Any, vb: Any) -> str:
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
        return f"{vb - va:+.4g}"
    return "changed"


def compare_markdown(repo: str | Path, name_a: str, name_b: str, *, seed: int = 0,
                     n_boot: int = 2000) -> str:  # fmt: skip
    """``karma compare A B`` as Markdown."""
    repo = Path(repo)
    rows = collect_experiments(repo, workspace=True)
    a, b = find_run(rows, name_a, repo), find_run(rows, name_b, repo)
    load = sample_loader(repo)
    sa, sb = load(a, "policy"), load(b, "policy")
    out = [f"### {config_label(b)} vs {config_label(a)}", ""]
    if sa is None or sb is None:
        who = ", ".join(r["name"] for r, s in ((a, sa), (b, sb)) if s is None)
        out += [f"No per-item results for {who} (data/eval/policy/samples.parquet at its "
                "revision, in the DVC cache): `dvc pull` or re-run `dvc exp run`.", ""]  # fmt: skip
    else:
        deltas = paired_benchmarks(sa, sb, seed=seed, n_boot=n_boot)
        out += ["Paired over the items both policies answered (B − A):", ""]
        out += [*benchmark_rows(deltas), ""]
    side = heldout_rows(a, b) + changed_rows(a, b)
    if side:
        out += [f"| | A: {a['name']} | B: {b['name']} | B − A |", "|---|---|---|---|", *side]
    return "\n".join(out).rstrip() + "\n"


def metrics_diff(rev: str, repo: str | Path = ".") -> dict[str, dict[str, Any]]:
    """``{metric: {old, new, diff}}`` of every changed metric between ``rev`` and the workspace."""
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as r:
            raw = r.metrics.diff(a_rev=rev)
    except Exception as err:
        raise KarmaError(f"cannot diff metrics against {rev!r}: {err}", file=repo) from None
    out: dict[str, dict[str, Any]] = {}
    for path, entries in sorted(raw.get("diff", {}).items()):
        for key, change in sorted(entries.items()):
            if change.get("old") == change.get("new"):
                continue
            out[f"{Path(path).stem}:{key}"] = {k: change.get(k) for k in ("old", "new", "diff")}
    return out


def diff_markdown(diff: Mapping[str, Mapping[str, Any]], rev: str) -> str:
    """A PR-ready table of what changed: evaluation numbers first, text values as text."""

    def order(key: str) -> tuple[int, str]:
        name = key.split(":", 1)[-1]
        return (0 if name.split(".")[0] in (*TABLE2_BENCHMARKS, "mmlu", "arc_e", "arc_c",
                                            "total") else 1), key  # fmt: skip

    lines = [f"| metric | {rev} | workspace | change |", "|---|---|---|---|"]
    for key in sorted(diff, key=order):
        d = diff[key]
        old, new = d.get("old"), d.get("new")
        lines.append(f"| {key} | {_text(old)} | {_text(new)} | {_change(old, new)} |")
    if len(lines) == 2:
        lines.append("| (no metric changed) | | | |")
    return "\n".join(lines) + "\n"
