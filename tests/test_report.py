"""karma report: tables from hand-made rows, and from a real DVC project with experiments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from karma import report
from karma.cli import cli

ROWS = [
    {
        "name": "main",
        "params": {"kinship": "score", "train.method": "dpo"},
        "metrics": {
            "policy.arc_easy.acc": 0.50,
            "base.arc_easy.acc": 0.40,
            "policy.ifeval.prompt_acc": 0.30,
            "base.ifeval.prompt_acc": 0.25,
        },
    },
    {
        "name": "exp-rlaif",
        "params": {"kinship": "rlaif", "train.method": "dpo"},
        "metrics": {"policy.arc_easy.acc": 0.45, "policy.ifeval.prompt_acc": 0.35},
    },
    {
        "name": "exp-sft",
        "params": {"kinship": "sim", "train.method": "sft", "select.method": "map"},
        "metrics": {"policy.arc_easy.acc": 0.55, "base.arc_easy.acc": 0.40},
    },
]


def test_results_groups_by_method_with_baseline_first() -> None:
    res = report.results(ROWS)
    assert list(res) == ["dpo", "sft"]
    labels = [label for label, _ in res["dpo"]]
    assert labels[0].startswith("base model")
    assert labels[1].startswith("RLAIF (baseline)")  # rlaif sorts before KARMA variants
    assert "KARMA score" in labels[2]
    assert res["dpo"][2][1] == [0.50, 0.30, pytest.approx(0.40)]  # arc, ifeval, avg
    assert "map selection" in res["sft"][1][0]


def test_markdown_bolds_best_policy_per_column() -> None:
    md = report.markdown_table(ROWS)
    dpo = md.split("### SFT")[0]
    assert "| RLAIF (baseline) [exp-rlaif] | 45.0 | **35.0** |" in dpo
    assert "| KARMA score [main] | **50.0** | 30.0 |" in dpo
    assert "### SFT" in md


def test_html_is_self_contained(tmp_path: Path) -> None:
    png = tmp_path / "fig.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [1, 0])
    plt.savefig(png)
    plt.close("all")
    tsv = tmp_path / "loss.tsv"
    tsv.write_text("timestamp\tstep\tloss\n0\t1\t0.7\n0\t2\t0.6\n")
    page = report.html_page(ROWS, figures=[png], curve_files=[tsv])
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"(src|href)=['\"]https?:", page)
    assert "<td class='best'>50.0</td>" in page


def test_diff_markdown_puts_policy_first() -> None:
    diff = {
        "train:loss": {"old": 1.0, "new": 0.5, "diff": -0.5},
        "eval:policy.arc_easy.acc": {"old": 0.4, "new": 0.5, "diff": 0.1},
    }
    lines = report.diff_markdown(diff, "main").splitlines()
    assert lines[0] == "| metric | main | workspace | change |"
    assert lines[2].startswith("| eval:policy.arc_easy.acc | 0.4 | 0.5 | +0.1 |")
    assert lines[3].startswith("| train:loss")


STAGE = """
import json, yaml
p = yaml.safe_load(open("params.yaml"))
acc = {"score": 0.5, "sim": 0.6}[p["kinship"]]
json.dump({"policy.arc_easy.acc": acc, "base.arc_easy.acc": 0.4}, open("metrics/eval.json", "w"))
"""


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_report_from_real_dvc_experiments(tmp_path: Path) -> None:
    """A tiny DVC project, one `dvc exp run -S kinship=sim`: the report and the diff see both."""
    dvc = [sys.executable, "-m", "dvc"]
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "params.yaml").write_text("kinship: score\ntrain:\n  method: dpo\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  ev:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [kinship, train]\n    metrics:\n      - metrics/eval.json:\n"
        "          cache: false\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([*dvc, "repro", "-q"], cwd=tmp_path, check=True, env=env)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "baseline")
    subprocess.run(
        [*dvc, "exp", "run", "-q", "-S", "kinship=sim"], cwd=tmp_path, check=True, env=env
    )
    rows = report.collect_experiments(tmp_path)
    by_kinship = {r["params"]["kinship"]: r["metrics"]["policy.arc_easy.acc"] for r in rows}
    assert by_kinship == {"score": 0.5, "sim": 0.6}

    # the README's grid, queued and run in one go (two cells of it)
    for k in ("score", "sim"):
        subprocess.run(
            [*dvc, "exp", "run", "--queue", "-q", "-n", f"{k}-sft", "-S", f"kinship={k}",
             "-S", "train.method=sft"],
            cwd=tmp_path, check=True, env=env,
        )  # fmt: skip
    subprocess.run([*dvc, "exp", "run", "--run-all", "-q"], cwd=tmp_path, check=True, env=env)
    rows = report.collect_experiments(tmp_path)
    sft = {r["name"]: r["metrics"]["policy.arc_easy.acc"] for r in rows
           if r["params"]["train.method"] == "sft"}  # fmt: skip
    assert sft == {"score-sft": 0.5, "sim-sft": 0.6}
    assert list(report.results(rows)) == ["dpo", "sft"]

    out = tmp_path / "reports"
    result = CliRunner().invoke(cli, ["report", "--repo", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| KARMA sim" in (out / "report.md").read_text()
    assert "**60.0**" in (out / "report.md").read_text()

    diff = report.metrics_diff("HEAD", tmp_path)
    assert diff["eval:policy.arc_easy.acc"]["diff"] == pytest.approx(0.1)
    json.dumps(diff)  # serialisable for CI bots
