"""karma report: paper-style tables from a hand-made grid, and from a real DVC project.

The synthetic grid: two bases x four strategies x two methods x two seeds, 50 items per
benchmark, "the first k items correct" in every run, so every mean, sd, pooled value, Total and
significance mark below is worked out by hand (comments give the arithmetic).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from karma.cli import cli, main
from karma.core.errors import KarmaError
from karma.core.settings import BENCHMARKS, TABLE2_BENCHMARKS
from karma.core.stats import mcnemar_exact, t_quantile, tango_ci
from karma.report import collect, compare, estimates, figures, html, markdown, plots
from karma.report import tables as report
from karma.report.estimates import Z

M = 50  # items per benchmark
START = {"org/base-A": 20, "org/base-B": 30}  # trained runs: first START+offset items correct
UNTRAINED = {"org/base-A": 20, "org/base-B": 30}  # untrained base: first k correct ...
UNTRAINED_HELLASWAG = 45  # ... except HellaSwag, where it beats every trained run (90.0)
# items correct above START for (seed 0, seed 1)
OFFSETS = {
    "dpo": {"rlaif": (0, 1), "score": (10, 11), "sim": (1, 0), "score_sim": (-8, -8)},
    "sft": {"rlaif": (0, 1), "score": (1, 2), "sim": (1, 0), "score_sim": (-8, -8)},
}


def first(k: int) -> dict[str, float]:
    return {str(i): float(i < k) for i in range(M)}


def eval_metrics(who_k: dict[str, dict[str, int]]) -> dict[str, float]:
    """eval.json keys for per-benchmark counts of correct items; intervals score ± 0.05."""
    out: dict[str, float] = {}
    for who, ks in who_k.items():
        for bench, k in ks.items():
            v = k / M
            out |= {f"{who}.{bench}.score": v, f"{who}.{bench}.ci_low": v - 0.05,
                    f"{who}.{bench}.ci_high": v + 0.05, f"{who}.{bench}.n": M}  # fmt: skip
    return out


def grid() -> list[dict]:
    rows = []
    for base, start in START.items():
        untrained = {b: UNTRAINED_HELLASWAG if b == "hellaswag" else UNTRAINED[base]
                     for b in BENCHMARKS}  # fmt: skip
        for method, offsets in OFFSETS.items():
            for strategy, pair in offsets.items():
                for seed, off in enumerate(pair):
                    policy = {b: start + off for b in BENCHMARKS}
                    metrics = eval_metrics({"policy": policy, "base": untrained})
                    metrics |= {"eval:meta.base_model": base, "eval:meta.seed": float(seed),
                                "eval:meta.train_method": method, "eval:meta.suite": "embedded",
                                "eval:meta.protocol": "loglik", "train:train_loss": 0.5 + seed,
                                "train:heldout.after.loss": 0.6, "train:heldout.delta.loss": -0.1,
                                "train:heldout.delta.loss.ci_low": -0.15,
                                "train:heldout.delta.loss.ci_high": -0.05}  # fmt: skip
                    metrics |= {f"eval:meta.items.{b}": M for b in BENCHMARKS}
                    rows.append({
                        "name": f"{base[-1]}-{method}-{strategy}-{seed}",
                        "params": {"kinship": strategy, "seed": seed, "train.method": method,
                                   "base_model.source": base, "select.method": "none"},
                        "metrics": metrics,
                        "samples": {"policy": {b: first(k) for b, k in policy.items()},
                                    "base": {b: first(k) for b, k in untrained.items()}},
                    })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def built() -> tuple[list[report.Table], list[report.Table], list[str]]:
    return report.build_tables(grid(), seed=0, n_boot=2000)


def by_label(table: report.Table) -> dict[str, report.Line]:
    return {ln.label: ln for ln in table.lines}


def test_grid_groups_by_base_and_method(built) -> None:
    tables, pooled, notes = built
    assert [(t.method, t.bases) for t in tables] == [
        ("dpo", ["org/base-A"]), ("dpo", ["org/base-B"]),
        ("sft", ["org/base-A"]), ("sft", ["org/base-B"]),
    ]  # fmt: skip
    assert notes == []
    for t in tables:
        # the paper's Table 2 order, its Total, then HellaSwag (not in Table 2)
        assert t.columns == [*TABLE2_BENCHMARKS, report.TOTAL, "hellaswag"]
        assert [ln.label for ln in t.lines] == [
            "untrained base", "RLAIF (baseline)", "KARMA score", "KARMA sim", "KARMA score_sim"
        ]  # fmt: skip
        assert [ln.n for ln in t.lines[1:]] == [2, 2, 2, 2]  # seeds are replicates
        assert t.reference.label == "RLAIF (baseline)"
        assert t.items["ifeval"] == "50 items" and t.suite == "embedded"
    # the paper's Table 2 pools over bases x methods; the per-method views are kept, named
    assert [(t.kind, t.methods, t.bases) for t in pooled] == [
        ("paper", ["dpo", "sft"], ["org/base-A", "org/base-B"]),
        ("method", ["dpo"], ["org/base-A", "org/base-B"]),
        ("method", ["sft"], ["org/base-A", "org/base-B"]),
    ]  # fmt: skip
    assert pooled[0].title.startswith("Table 2 (the paper's pooling): mean over 2 base model(s)")
    assert pooled[1].title == "DPO · pooled over 2 base models"


def test_grid_means_sd_and_totals(built) -> None:
    tables, _, _ = built
    a_dpo = by_label(tables[0])
    # score on base A: 30 and 31 of 50 -> 0.60, 0.62: mean 0.61, sd = 0.02/sqrt(2) = 0.014142
    score = a_dpo["KARMA score"].cells["ifeval"]
    assert score.value == pytest.approx(0.61)
    assert score.sd == pytest.approx(0.02 / math.sqrt(2))
    # interval: se^2 = sd^2/n + mean(se_i^2) = 0.0001 + (0.05/z)^2, times t(1) = 12.71, not z
    se = math.sqrt(0.0001 + (0.05 / Z) ** 2)
    half = t_quantile(2) * se
    assert (score.lo, score.hi) == pytest.approx((0.61 - half, 0.61 + half))
    # Total: the 0-1 mean of the five Table 2 benchmarks (MMLU-Pro in, HellaSwag out): 0.61
    assert a_dpo["KARMA score"].cells[report.TOTAL].value == pytest.approx(0.61)
    # untrained A: 40 on the five Table 2 benchmarks (its 90 on HellaSwag is not in the Total)
    assert a_dpo["untrained base"].cells[report.TOTAL].value == pytest.approx(0.40)
    assert a_dpo["KARMA score_sim"].cells["arc_easy"].value == pytest.approx(0.24)  # 12 of 50
    assert a_dpo["KARMA score_sim"].cells["arc_easy"].sd == pytest.approx(0.0)


def test_grid_pooled_view_is_the_mean_over_bases(built) -> None:
    _, pooled, _ = built
    dpo = by_label(pooled[1])  # per-method view: DPO over the two bases
    assert dpo["untrained base"].cells["ifeval"].value == pytest.approx(0.50)  # (40 + 60) / 2
    assert dpo["RLAIF (baseline)"].cells["ifeval"].value == pytest.approx(0.51)  # (41 + 61) / 2
    assert dpo["KARMA score"].cells["ifeval"].value == pytest.approx(0.71)  # (61 + 81) / 2
    assert dpo["KARMA score"].cells[report.TOTAL].value == pytest.approx(0.71)
    # pooled interval: se = sqrt(se_A^2 + se_B^2) / 2, each part's se = its t-interval / z
    rlaif = dpo["RLAIF (baseline)"].cells["ifeval"]
    se_part = t_quantile(2) * math.sqrt(0.0001 + (0.05 / Z) ** 2) / Z
    half = Z * math.sqrt(2) * se_part / 2
    assert (rlaif.lo, rlaif.hi) == pytest.approx((0.51 - half, 0.51 + half))
    # the paper's Table 2: every base x method: score = (61 + 81 + 43 + 63) / 4 = 62.0
    paper = by_label(pooled[0])
    assert paper["KARMA score"].cells["ifeval"].value == pytest.approx(0.62)
    assert paper["RLAIF (baseline)"].cells["ifeval"].value == pytest.approx(0.51)
    # highlighted: at or above the baseline's shown value (sim ties it at 51.0)
    assert dpo["KARMA sim"].at_or_above >= {"ifeval", "arc_easy"}
    assert dpo["KARMA score"].at_or_above >= {"ifeval", report.TOTAL}
    assert not dpo["KARMA score_sim"].at_or_above
    assert not dpo["RLAIF (baseline)"].at_or_above  # the baseline itself is not highlighted


def test_grid_marks_and_bold(built) -> None:
    tables, pooled, _ = built
    for table in [tables[0], tables[1], pooled[1]]:  # DPO on A, on B, pooled over bases
        lines = by_label(table)
        # score beats rlaif on items START+1..START+9 in every resample: the bootstrap p is
        # ~0, below 0.05 after Holm across the 7 columns
        assert lines["KARMA score"].diffs["ifeval"].sign == 1
        assert lines["KARMA score"].diffs[report.TOTAL].sign == 1
        # sim = rlaif with the seeds swapped: the difference is 0 on average, symmetric
        assert lines["KARMA sim"].diffs["ifeval"].value == pytest.approx(0.0)
        assert lines["KARMA sim"].diffs["ifeval"].sign == 0
        # score_sim loses items START-8..START-1 in every run: significantly below
        assert lines["KARMA score_sim"].diffs["ifeval"].sign == -1
        # bold: score is the significant best ...
        assert "ifeval" in lines["KARMA score"].bold and report.TOTAL in lines["KARMA score"].bold
        # ... but not on HellaSwag, where the untrained base (90.0) is above every trained run
        assert "hellaswag" not in lines["KARMA score"].bold
        assert lines["KARMA score"].diffs["hellaswag"].sign == 1  # still marked
        assert not lines["RLAIF (baseline)"].diffs  # the baseline is the reference
    # SFT on A: score (21, 22 correct) is the best (42.0) but not significant: with probability
    # 1/16 both sides draw the seeds with 21 correct and the difference is exactly 0, so the
    # bootstrap p is at least 2/16
    sft = by_label(tables[2])
    assert sft["KARMA score"].diffs["ifeval"].lo == 0.0
    assert sft["KARMA score"].diffs["ifeval"].p >= 0.12
    assert sft["KARMA score"].diffs["ifeval"].sign == 0
    assert not any(ln.bold for ln in tables[2].lines)


def test_bold_compares_displayed_values() -> None:
    """Two runs that both show 52.0 tie: neither is bold, though one is significant."""

    def run(name: str, strategy: str, v: float, delta: tuple[float, float, float, float]) -> dict:
        m = {"policy.ifeval.score": v, "policy.ifeval.ci_low": v - 0.01,
             "policy.ifeval.ci_high": v + 0.01, "base.ifeval.score": 0.40,
             "base.ifeval.ci_low": 0.39, "base.ifeval.ci_high": 0.41,
             "delta.ifeval.score": delta[0], "delta.ifeval.ci_low": delta[1],
             "delta.ifeval.ci_high": delta[2], "delta.ifeval.p": delta[3],
             "delta.ifeval.n": 49}  # fmt: skip
        return {"name": name, "params": {"kinship": strategy, "train.method": "dpo",
                                         "base_model.source": "b"}, "metrics": m}  # fmt: skip

    rows = [
        run("s", "score", 0.5204, (0.12, 0.05, 0.2, 0.001)),
        run("t", "sim", 0.5196, (0.12, -0.01, 0.2, 0.2)),
    ]
    (table,), pooled, _ = report.build_tables(rows)
    assert not pooled and table.reference.untrained  # no RLAIF run: vs the untrained base
    assert [report.shown(ln.cells["ifeval"]) for ln in table.lines] == [40.0, 52.0, 52.0]
    assert [ln.diffs["ifeval"].sign for ln in table.lines[1:]] == [1, 0]  # their p, not the CI
    assert not any(ln.bold for ln in table.lines)
    rows[1]["metrics"]["policy.ifeval.score"] = 0.5100  # now 52.0 is the single best
    (table,), _, _ = report.build_tables(rows)
    assert table.lines[1].bold == {"ifeval"}


def test_paired_interval_matches_reference_computations() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(0.6, 1, 300)
    b = a - rng.normal(0.1, 0.5, 300)
    got = estimates.paired(a, b, seed=3, n_boot=20000)
    d = a - b
    # 1. continuous items: scipy's paired percentile bootstrap of the mean difference
    from scipy import stats

    ref = stats.bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True, vectorized=False,
                          n_resamples=20000, method="percentile", random_state=1)  # fmt: skip
    assert got["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert got["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.006)
    assert got["score"] == pytest.approx(d.mean()) and got["test"] == "sign_flip"
    # 2. 0/1 items, one run per side: Tango's interval and exact McNemar, worked by hand:
    # 5 vs 1 discordant pairs -> 2 * P(X <= 1 | n=6) = 14/64
    a6, b6 = np.array([1, 1, 1, 1, 1, 0, 1, 0]), np.array([0, 0, 0, 0, 0, 1, 1, 0])
    six = estimates.paired(a6, b6, seed=0, n_boot=100)
    assert six["p"] == pytest.approx(14 / 64) and six["test"] == "mcnemar"
    assert (six["ci_low"], six["ci_high"]) == tango_ci(a6, b6)
    assert mcnemar_exact(np.array([1, 1, 1, 0]), np.zeros(4)) == pytest.approx(0.25)
    # seeded: the same call gives the same interval
    assert estimates.paired(a, b, seed=3, n_boot=20000) == got


def test_paired_replicates_match_a_plain_loop() -> None:
    """Two seeds per side: seeds resampled on each side, items jointly; vs an explicit loop."""
    rng = np.random.default_rng(0)
    a = (rng.random((2, 80)) < 0.55).astype(float)
    b = (rng.random((2, 80)) < 0.45).astype(float)
    got = estimates.paired(a, b, seed=5, n_boot=20000)
    loop = np.random.default_rng(11)
    draws = []
    for _ in range(20000):
        sa, sb = loop.integers(0, 2, 2), loop.integers(0, 2, 2)
        items = loop.integers(0, 80, 80)
        draws.append(a[sa][:, items].mean() - b[sb][:, items].mean())
    assert got["score"] == pytest.approx(a.mean() - b.mean())
    assert got["ci_low"] == pytest.approx(np.percentile(draws, 2.5), abs=0.008)
    assert got["ci_high"] == pytest.approx(np.percentile(draws, 97.5), abs=0.008)
    share = min(np.mean(np.array(draws) <= 0), np.mean(np.array(draws) >= 0))
    assert got["test"] == "bootstrap" and got["p"] == pytest.approx(2 * share, abs=0.01)
    same = estimates.paired(a[:1], a[:1], seed=0, n_boot=100)  # nothing discordant
    assert same["ci_low"] < 0 < same["ci_high"]  # never a zero-width interval


def test_table2_from_table4_through_the_pooling_code() -> None:
    """The paper's Table 2 is the mean of its Table 4 over 4 base models x {SFT, DPO}; its
    Total the 0-1 mean of MMLU, MMLU-Pro, ARC-E, ARC-C and IFEval. Table 4's published numbers
    could not be retrieved here (no access to the paper's tables from this machine), so this
    is a synthetic Table 4 of the same shape: the report's own pooling must give, cell by
    cell, the plain mean over the 8 rows, and the Total the mean of the five columns."""
    rng = np.random.default_rng(2502_18744)
    bases = ["llama", "qwen", "gemma", "mistral"]
    strategies = ["rlaif", "score", "sim", "score_sim"]
    t4 = {(b, m, s): dict(zip(TABLE2_BENCHMARKS, rng.uniform(0.1, 0.7, 5).round(3), strict=True))
          for b in bases for m in ("sft", "dpo") for s in strategies}  # fmt: skip
    rows = []
    for (b, m, s), cells in t4.items():
        metrics = {f"eval:policy.{k}.score": float(v) for k, v in cells.items()}
        metrics |= {f"eval:base.{k}.score": 0.2 for k in cells}
        rows.append({"name": f"{b}-{m}-{s}", "params": {"kinship": s, "train.method": m,
                     "base_model.source": b, "seed": 0}, "metrics": metrics})  # fmt: skip
    tables, pooled, _ = report.build_tables(rows, n_boot=100)
    assert len(tables) == 8
    (t2,) = [t for t in pooled if t.kind == "paper"]
    assert t2.columns == [*TABLE2_BENCHMARKS, report.TOTAL]
    lines = {ln.strategy: ln for ln in t2.lines[1:]}
    for s in strategies:
        rows8 = [t4[b, m, s] for b in bases for m in ("sft", "dpo")]
        for k in TABLE2_BENCHMARKS:
            assert lines[s].cells[k].value == pytest.approx(np.mean([r[k] for r in rows8]))
        total = np.mean([np.mean(list(r.values())) for r in rows8])
        assert lines[s].cells[report.TOTAL].value == pytest.approx(total)
        # the Total of Table 2 is also the mean of its five pooled columns
        five = np.mean([lines[s].cells[k].value for k in TABLE2_BENCHMARKS])
        assert lines[s].cells[report.TOTAL].value == pytest.approx(five)
    assert markdown.col_label(report.TOTAL) == "Total"
    assert [markdown.col_label(c) for c in TABLE2_BENCHMARKS] == [
        "MMLU", "MMLU-Pro", "ARC-E", "ARC-C", "IFEval"
    ]  # fmt: skip


def test_markdown_of_the_grid(built) -> None:
    md = markdown.markdown_table(grid(), seed=0, n_boot=2000)
    assert md.index("### Verdict") < md.index("### Table 2 (the paper's pooling)")
    assert md.index("### Table 2 (the paper's pooling)") < md.index("### DPO · pooled over 2")
    assert md.index("### DPO · pooled over 2 base models") < md.index("### DPO · base org/base-A")
    head = next(ln for ln in md.splitlines() if ln.startswith("| | MMLU"))
    assert head.split(" | ")[1:3] == ["MMLU (50 items)", "MMLU-Pro (50 items)"]
    assert head.endswith("| Total | HellaSwag* (50 items) |")
    a = md.split("### DPO · base org/base-A")[1].split("###")[0]
    row = next(ln for ln in a.splitlines() if ln.startswith("| KARMA score · 2 seeds"))
    cells = row.split(" | ")
    assert cells[5] == "**61.0 ± 1.4 ▲**"  # IFEval: significant best
    assert cells[6].startswith("**61.0 ± 1.4 ▲")  # Total (0-1 mean x 100)
    assert cells[7] == "61.0 ± 1.4 ▲ |"  # HellaSwag: below the untrained base's 90.0, not bold
    assert "suite embedded (the project's offline mini suites, 40-49 items" in a
    half = t_quantile(1 + 1)  # not used for the untrained base: one run, Wilson-like +-0.05
    assert half > 12 and "| untrained base | 40.0 [35.0–45.0] |" in a
    verdict = md.split("### Verdict")[1].split("###")[0]
    assert (
        "**org/base-A · DPO** (embedded): on the Total: KARMA score beats RLAIF by +20.0" in verdict
    )
    assert "p_holm" in verdict and "significant" in verdict
    # two seeds: t(1) = 12.7 times the se, not z
    assert "Held-out preference split" in md and "-0.1 [-0.424, +0.224]" in md


def test_verdict_without_rlaif_gives_the_command() -> None:
    rows = [r for r in grid() if "rlaif" not in r["name"] and r["name"].startswith("A-dpo")]
    tables, _, _ = report.build_tables(rows, n_boot=100)
    (line,) = markdown.verdict(tables)
    assert "no RLAIF run" in line
    assert ("`dvc exp run --queue -S kinship=rlaif -S train.method=dpo "
            "-S base_model.source=org/base-A && dvc exp run --run-all`") in line  # fmt: skip


def test_heldout_before_is_a_definition_not_a_change() -> None:
    rows = grid()[:2]
    for r in rows:
        r["metrics"] |= {"train:heldout.before.loss": math.log(2),
                         "train:heldout.before.reward_accuracy": 0.0,
                         "train:heldout.before.reward_margin": 0.0,
                         "train:heldout.after.reward_accuracy": 0.62,
                         "train:heldout.delta.reward_accuracy": 0.62,
                         "train:heldout.delta.reward_accuracy.ci_low": 0.52,
                         "train:heldout.delta.reward_accuracy.ci_high": 0.72}  # fmt: skip
    tables, _, _ = report.build_tables(rows, n_boot=50)
    held = markdown.heldout_table(tables)
    assert "definitional" in held and "+0.62" not in held and "▲" not in held


def test_html_is_one_offline_file_with_figures(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "plots" / "kinship").mkdir(parents=True)
    plt.plot([0, 1], [1, 0])
    plt.savefig(tmp_path / "plots" / "kinship" / "pca.png")
    plt.close("all")
    curves = tmp_path / figures.CURVES_DIR
    curves.mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n1\t0.7\n2\t0.6\n")
    page = html.html_page(grid(), repo=tmp_path, n_boot=200)
    # capability bars, differences, the kinship figure, the (one) workspace run's curves
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    assert page.index("<h2>Verdict</h2>") < page.index("Table 2 (the paper&#x27;s pooling)")
    assert "td class='best'" in page and "class='ge'" in page
    assert "<details>" not in page  # differences are visible, not collapsed
    assert (
        "training curves (dvclive/train/plots/metrics): A-dpo-rlaif-0 (kinship=rlaif, dpo, seed 0)"
        in page
    )

    single = html.html_page(grid()[:1], n_boot=50)
    assert "one configuration only" in single  # figures of comparisons need two or more


def test_no_figures_missing_kinship_says_how_to_get_them(tmp_path: Path) -> None:
    _, missing = figures.kinship_figures(tmp_path)
    assert missing[0].startswith("kinship figures (plots/kinship)")
    assert "`dvc pull plots/kinship` or `dvc repro kinship`" in missing[0]
    # no selection ran (select.method none): no empty chart, and nothing said missing
    assert figures.selection_figure(tmp_path, grid()[:1]) == ([], [])


def test_duplicate_seed_is_left_out_with_a_note() -> None:
    rows = grid()[:2]  # A, dpo, rlaif, seeds 0 and 1
    dup = json.loads(json.dumps(rows[0]))
    dup["name"] = "again"
    (table,), _, notes = report.build_tables([*rows, dup], n_boot=50)
    assert table.lines[1].names == ["A-dpo-rlaif-0", "A-dpo-rlaif-1"]
    assert notes == ["again left out: same configuration and seed as A-dpo-rlaif-0"]


def test_diff_markdown_puts_benchmarks_first_and_shows_text() -> None:
    diff = {
        "headline:pairs.made": {"old": 400, "new": 380, "diff": -20},
        "headline:arc_e.delta": {"old": 0.04, "new": 0.05, "diff": 0.01},
        "eval:meta.suite": {"old": "embedded", "new": "paper", "diff": None},
    }
    lines = compare.diff_markdown(diff, "main").splitlines()
    assert lines[0] == "| metric | main | workspace | change |"
    assert lines[2] == "| headline:arc_e.delta | 0.04 | 0.05 | +0.01 |"
    assert "| eval:meta.suite | embedded | paper | changed |" in lines
    assert compare.diff_markdown({}, "main").splitlines()[2] == "| (no metric changed) | | | |"


def test_compare_pairs_two_policies_on_the_same_items() -> None:
    """B answers items 0-29 of each benchmark, A items 0-19: +20 points, McNemar p = 2^-9 each, Holm
    across the six (and the Total)."""
    a = {b: {str(i): float(i < 20) for i in range(50)} for b in BENCHMARKS}
    b = {k: {str(i): float(i < 30) for i in range(50)} for k in BENCHMARKS}
    b["hellaswag"] = dict(a["hellaswag"])
    got = compare.paired_benchmarks(a, b, n_boot=500)
    assert list(got)[:6] == [*TABLE2_BENCHMARKS, report.TOTAL]
    assert got["ifeval"]["score"] == pytest.approx(0.2) and got["ifeval"]["wins"] == 10
    assert got["ifeval"]["p"] == pytest.approx(2 * 0.5**10, rel=1e-5)
    assert got["ifeval"]["significant"] == 1
    assert got["hellaswag"]["score"] == 0 and got["hellaswag"]["ci_low"] < 0
    assert got[report.TOTAL]["score"] == pytest.approx(0.2)
    table = "\n".join(compare.benchmark_rows(got))
    assert "| IFEval | +20.0 |" in table and "| HellaSwag* | +0.0 |" in table


# --------------------------------------------------------------------------- real DVC

STAGE = """
import json, os, yaml
import polars as pl
p = yaml.safe_load(open("params.yaml"))
k = {"rlaif": 20, "score": 30, "sim": 21}[p["kinship"]] + p["seed"]
n = 50
def frame(k):
    return pl.DataFrame({"benchmark": ["arc_easy"] * n, "doc_id": list(range(n)),
                         "score": [float(i < k) for i in range(n)]})
for who, kk in (("policy", k), ("base", 20)):
    os.makedirs(f"data/eval/{who}", exist_ok=True)
    frame(kk).write_parquet(f"data/eval/{who}/samples.parquet")
m = {"meta.base_model": "tiny/base", "meta.seed": p["seed"], "meta.suite": "embedded",
     "meta.train_method": p["train"]["method"], "meta.items.arc_easy": n}
for who, kk in (("policy", k), ("base", 20)):
    v = kk / n
    m |= {f"{who}.arc_easy.score": v, f"{who}.arc_easy.ci_low": v - 0.1,
          f"{who}.arc_easy.ci_high": v + 0.1}
m |= {"delta.arc_easy.score": (k - 20) / n, "delta.arc_easy.ci_low": (k - 20) / n - 0.05,
      "delta.arc_easy.ci_high": (k - 20) / n + 0.05}
json.dump(m, open("metrics/eval.json", "w"))
"""


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _dvc_project(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    dvc = [sys.executable, "-m", "dvc"]
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=tmp_path, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return dvc, env


def test_report_from_real_dvc_experiments(tmp_path: Path) -> None:
    """A tiny DVC project with per-sample outputs in the DVC cache: rlaif/score/sim, 2 seeds of
    score, an SFT grid; the report groups them, reads the samples at each experiment's rev and
    marks score (30/31 of 50 vs rlaif's 20) significant."""
    dvc, env = _dvc_project(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "params.yaml").write_text("kinship: score\nseed: 0\ntrain:\n  method: dpo\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  ev:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [kinship, seed, train]\n"
        "    outs: [data/eval/policy/samples.parquet, data/eval/base/samples.parquet]\n"
        "    metrics:\n      - metrics/eval.json:\n          cache: false\n"
    )
    run = {"cwd": tmp_path, "check": True, "env": env}
    subprocess.run([*dvc, "repro", "-q"], **run)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "baseline")
    # each sets every param it means: an experiment leaves its params in the workspace
    for kinship, seed in (("rlaif", 0), ("sim", 0), ("score", 1)):
        subprocess.run([*dvc, "exp", "run", "-q", "-S", f"kinship={kinship}", "-S", f"seed={seed}"],
                       **run)  # fmt: skip
    # the README's grid, queued and run in one go (two cells of it)
    for k in ("score", "rlaif"):
        subprocess.run([*dvc, "exp", "run", "--queue", "-q", "-n", f"{k}-sft", "-S", f"kinship={k}",
                        "-S", "seed=0", "-S", "train.method=sft"], **run)  # fmt: skip
    subprocess.run([*dvc, "exp", "run", "--run-all", "-q"], **run)

    rows = collect.collect_experiments(tmp_path)
    assert {r["metrics"]["meta.base_model"] for r in rows} == {"tiny/base"}  # strings kept
    loader = collect.sample_loader(tmp_path)
    tables, pooled, notes = report.build_tables(rows, samples=loader, n_boot=2000)
    assert [t.kind for t in pooled] == ["paper"] and notes == []  # 1 base x {dpo, sft}
    assert [(t.method, t.bases) for t in tables] == [("dpo", ["tiny/base"]), ("sft", ["tiny/base"])]
    dpo = by_label(tables[0])
    assert [ln.n for ln in tables[0].lines[1:]] == [1, 2, 1]  # rlaif, score (seeds 0, 1), sim
    assert dpo["KARMA score"].cells["arc_easy"].value == pytest.approx(0.61)
    diff = dpo["KARMA score"].diffs["arc_easy"]
    assert diff.how.startswith("paired over 50 items (bootstrap)")  # read via dvc.api.open
    assert diff.value == pytest.approx(0.21) and diff.sign == 1
    sim = dpo["KARMA sim"].diffs["arc_easy"]  # 21 vs 20 correct, one discordant item
    assert sim.value == pytest.approx(0.02) and sim.sign == 0 and sim.p == pytest.approx(1.0)
    assert "arc_easy" in dpo["KARMA score"].bold

    out = tmp_path / "reports"
    result = CliRunner().invoke(cli, ["report", "--repo", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| KARMA score · 2 seeds" in md and "**61.0 ± 1.4 ▲**" in md
    page = (out / "report.html").read_text()
    assert "kinship figures (plots/kinship)" in page

    diff = compare.metrics_diff("HEAD", tmp_path)
    json.dumps(diff)  # serialisable for CI bots
    # karma compare: the two single-seed DPO runs, paired on their items
    dpo0 = [r for r in rows if r["params"].get("seed") == 0]
    names = {r["params"]["kinship"]: r["name"] for r in dpo0
             if r["params"].get("train.method") == "dpo"}  # fmt: skip
    result = CliRunner().invoke(cli, ["compare", names["rlaif"], names["sim"], "--repo",
                                      str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| ARC-E | +2.0 |" in result.output and "(mcnemar)" in result.output
    # a git revision names the experiment of that commit (the baseline: score, seed 0)
    result = CliRunner().invoke(cli, ["compare", "HEAD", names["sim"], "--repo", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| ARC-E | -18.0 |" in result.output  # sim 21 of 50 vs score 30 of 50


def test_dvc_plots_show_offline_template(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`dvc plots show --html-template` with the template: vega inline, no http(s) reference."""
    dvc, env = _dvc_project(tmp_path)
    js = tmp_path / "js"
    js.mkdir()
    for pkg, _ in plots.VEGA_PACKAGES:  # stand-ins for the npm builds (same file names)
        (js / f"{pkg}.min.js").write_text(f"/* {pkg} stand-in */ var x = '</script>';")
    (tmp_path / "loss.tsv").write_text("step\tloss\n0\t0.7\n1\t0.6\n")
    (tmp_path / "dvc.yaml").write_text("plots:\n  - loss.tsv:\n      x: step\n      y: loss\n")
    out = tmp_path / "offline.html"
    result = CliRunner().invoke(
        cli, ["report", "--plots-template", str(out), "--vega-dir", str(js)]
    )
    assert result.exit_code == 0, result.output
    subprocess.run([*dvc, "plots", "show", "--html-template", str(out), "-o", "shown"],
                   cwd=tmp_path, check=True, env=env, capture_output=True)  # fmt: skip
    page = (tmp_path / "shown" / "index.html").read_text()
    assert "/* vega-embed stand-in */" in page and "vegaEmbed(" in page
    assert "<\\/script>" in page  # a closing tag inside the JS cannot end the script element
    assert not re.search(r"https?://", page.replace("https://vega.github.io/schema/", ""))
    assert "cdn.jsdelivr" not in page

    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--plots-template", str(out), "--vega-dir", str(empty)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"karma: error: {empty}: no vega.min.js nor vega-5.20.2.tgz (`npm pack vega@5.20.2`) here"
    ]


def test_no_scores_is_one_clear_error() -> None:
    rows = [{"name": "x", "params": {}, "metrics": {"train:train_loss": 0.5}}]
    with pytest.raises(KarmaError, match=r"no evaluation scores .*policy.<bench>.score"):
        report.build_tables(rows)
