"""Headline metrics vs diagnostics (issue 22): few keys, legible in ``dvc exp show`` at 200
columns, nothing that varies between identical reruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from karma.core.settings import BENCHMARKS, TABLE2_BENCHMARKS
from karma.report.headline import EXP_SHOW_VIEW, SHORT, headline, read_diagnostics

REPO = Path(__file__).resolve().parents[1]


def _default_like() -> dict[str, dict]:
    """Diagnostics of a default run (six benchmarks, the Total, held-out metrics, pairs)."""
    ev: dict[str, float | int | str] = {"meta.suite": "embedded"}
    for i, b in enumerate([*BENCHMARKS, "total"]):
        ev |= {f"policy.{b}.score": 0.5, f"base.{b}.score": 0.4, f"delta.{b}.score": 0.1 + i,
               f"delta.{b}.ci_low": -0.1, f"delta.{b}.ci_high": 0.3, f"delta.{b}.p": 0.2,
               f"delta.{b}.p_holm": 1.0, f"delta.{b}.significant": 0, f"delta.{b}.n": 40,
               f"delta.{b}.wins": 3, f"delta.{b}.losses": 1, f"policy.{b}.acc": 0.5}  # fmt: skip
    train = {"steps": 16, "batch.global": 4, "pairs": 323, "heldout.after.loss": 0.68,
             "heldout.after.reward_accuracy": 0.62, "heldout.after.reward_margin": 0.38,
             "heldout.before.loss": 0.693, "grad_norm": 13.5, "tokens": 9342,
             "dev.heldout.after.reward_margin": 0.3, "dev.heldout.delta.reward_margin.ci_low": 0.1,
             "dev.heldout.after.loss": 0.69}  # fmt: skip
    prefs = {"pairs": 400, "mean_kinship": 0.9165, "diag.pool.mean_kinship": 0.8, "drop_tie": 3,
             "agreement.score.agree": 0.62, "agreement.score.lo": 0.57, "agreement.score.hi": 0.67,
             "agreement.score.n": 386, "rating.overall_score.agree": 200}  # fmt: skip
    kin = {f"loo.{b}.rank_spearman": 0.9 for b in BENCHMARKS} | {"mean_kinship": 0.8}
    return {"eval": ev, "train": train, "preferences": prefs, "select": {"pairs_kept": 323},
            "kinship": kin}  # fmt: skip


def test_headline_keys_are_few_and_named_for_a_reviewer() -> None:
    diag = _default_like()
    out = headline(diag)
    # 7 columns x 5 + 2 held-out + 2 dev + 3 pairs + mean_kinship + agreement with its interval
    assert len(out) <= 46, len(out)
    assert (out["dev.reward_margin"], out["dev.reward_margin.lo"]) == (0.3, 0.1)
    assert "dev.loss" not in out and "dev.heldout.after.loss" not in out
    assert sum(len(d) for d in diag.values()) > 2 * len(out)
    for b in [*BENCHMARKS, "total"]:
        short = SHORT[b]
        assert {f"{short}.{k}" for k in ("score", "delta", "lo", "hi", "sig")} <= set(out)
    assert out["ifeval.delta"] == 0.1 and out["mmlu.delta"] == 1.1  # Table 2 order first
    assert out["pairs.made"] == 400 and out["pairs.kept"] == 323
    assert out["pairs.trained"] == 64  # 16 steps x 4 pairs: what the optimizer saw
    assert (out["agreement"], out["agreement.lo"], out["agreement.hi"]) == (0.62, 0.57, 0.67)
    assert "heldout.loss" not in out and not any("before" in k for k in out)  # definitional
    assert not any(k.startswith(("loo.", "meta.", "diag.")) for k in out)
    assert not any(w in k for k in out for w in ("time", "per_second"))
    assert TABLE2_BENCHMARKS[0] == "mmlu_stem"


def test_committed_headline_matches_the_committed_diagnostics() -> None:
    """metrics/headline.json is what the headline stage makes of diagnostics/ (no timings)."""
    committed = json.loads((REPO / "metrics/headline.json").read_text())
    assert committed == headline(read_diagnostics(REPO / "diagnostics"))
    assert len(committed) <= 46
    train = json.loads((REPO / "diagnostics/train.json").read_text())
    assert "wall_time_s" not in train and "tokens_per_second" not in train
    metrics_files = sorted(p.name for p in (REPO / "metrics").glob("*.json"))
    assert metrics_files == ["headline.json"]


def _readme_view() -> str:
    text = (REPO / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "dvc exp show" in ln and "--keep" in ln)
    assert f"--keep '{EXP_SHOW_VIEW}'" in line, line
    return line


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_exp_show_at_200_columns_shows_the_key_results(tmp_path: Path) -> None:
    """A scratch project with the real params.yaml and the committed headline metrics: the
    README's view of ``dvc exp show`` fits 200 columns (no column collapsed to ``…``) and shows
    the experiment, its kinship and every benchmark's delta."""
    _readme_view()
    env = {**os.environ, "COLUMNS": "200", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    dvc = [sys.executable, "-m", "dvc"]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics").mkdir()
    shutil.copy(REPO / "metrics/headline.json", tmp_path / "metrics/headline.json")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/headline.json\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "run")
    out = run(*dvc, "exp", "show", "--no-pager", "--drop", ".*", "--keep", EXP_SHOW_VIEW)
    assert max(len(line) for line in out.splitlines()) <= 200
    assert "…" not in out, out
    committed = json.loads((REPO / "metrics/headline.json").read_text())
    header = out.splitlines()[1]
    for key in (k for k in committed if k.endswith(".delta")):
        assert key in header, (key, out)
    assert "kinship" in header and "Experiment" in header
    params = (REPO / "params.yaml").read_text()
    kinship = next(ln.split(":", 1)[1].split("#")[0].strip() for ln in params.splitlines()
                   if ln.startswith("kinship:"))  # fmt: skip
    assert kinship in out.splitlines()[3]
    # and the plain view collapses: why the README gives the filtered one
    assert "…" in run(*dvc, "exp", "show", "--no-pager")


def test_constraints_pin_every_installed_dependency() -> None:
    """constraints.txt (what the Makefile installs with) pins exact versions, matching this
    environment: the versions the tests and the committed run use."""
    from importlib.metadata import PackageNotFoundError, version

    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]  # fmt: skip
    assert len(lines) > 100 and all("==" in ln for ln in lines)
    names = {ln.split("==")[0].lower() for ln in lines}
    for must in ("transformers", "trl", "lm-eval", "dvc", "polars", "numba"):
        assert must in names or must.replace("-", "_") in names, must
    mismatched = []
    for ln in lines:
        name, pinned = ln.split("==")
        try:
            if version(name) != pinned:
                mismatched.append((name, pinned, version(name)))
        except PackageNotFoundError:
            mismatched.append((name, pinned, None))
    assert not mismatched, mismatched
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "\nlock:" in makefile
    assert "dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()
