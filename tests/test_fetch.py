"""The fetch stage: a dataset (hub id, local dataset directory, or file) as a local Parquet that
DVC tracks; what it records of the source; the offline error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from karma.core.stage import execute
from karma.pairing import fetch as F
from karma.pairing.settings import FetchConfig
from karma.pairing.source import source_info
from karma.pairing.ultrafeedback import read_ultrafeedback
from karma.params import Params
from tests.fixtures import one_error_line as _one_line
from tests.fixtures import real_record
from tests.fixtures import run_karma as _cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo/ultrafeedback_demo.jsonl"


def _same(a: Path | str, b: Path | str) -> None:
    """Two sources read as the same UltraFeedback frames."""
    x, y = read_ultrafeedback(a), read_ultrafeedback(b)
    assert x.prompts.equals(y.prompts)
    assert x.completions.equals(y.completions)


def test_demo_default_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    """The default source (the embedded demo set) needs no hub; the fetched Parquet reads back
    as the same records (ratings parsed: string ratings and N/A included), byte-identically."""
    assert Params().fetch.dataset == "data/demo/ultrafeedback_demo.jsonl"
    outs = []
    for k in range(2):
        out = tmp_path / f"c{k}.parquet"
        info = execute(F.STAGE, Params(fetch=FetchConfig(dataset=str(DEMO))), F.FetchPaths(out=out))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    _same(DEMO, tmp_path / "c0.parquet")
    assert info["records"] == 480 and info["license"] == "apache-2.0"
    src = source_info(tmp_path / "c0.parquet")
    assert src["dataset"] == str(DEMO) and src["license"] == "apache-2.0"
    assert "fetched from" in src["described"]
    assert source_info(DEMO) == {"dataset": str(DEMO), "license": "apache-2.0"}


def test_local_dataset_directory_through_datasets(tmp_path: Path) -> None:
    """A local dataset directory (what a hub snapshot is) is read by datasets.load_dataset."""
    d = tmp_path / "UltraFeedback" / "data"
    d.mkdir(parents=True)
    records = [real_record(i) for i in range(6)]
    pl.DataFrame(records).write_parquet(d / "train-00000-of-00001.parquet")
    out = tmp_path / "c.parquet"
    params = Params(fetch=FetchConfig(dataset=str(d.parent), split="train"))
    info = execute(F.STAGE, params, F.FetchPaths(out=out))
    assert (info["records"], info["completions"]) == (6, 24)
    _same(d / "train-00000-of-00001.parquet", out)
    fetched = pl.read_parquet(out)
    assert fetched.columns == ["source", "instruction", "completions"]
    fields = [f.name for f in fetched.schema["completions"].inner.fields]  # type: ignore[union-attr]
    assert fields == ["model", "response", "overall_score", "fine-grained_score"]
    meta = json.loads(__import__("pyarrow.parquet").parquet.read_schema(out).metadata[F.META_KEY])
    assert meta["dataset"] == str(d.parent) and meta["split"] == "train"
    # the preferences stage reads the fetched file and states the source in its card
    from karma.kinship.kinship import STAGE as KINSHIP
    from karma.kinship.kinship import KinshipPaths
    from karma.pairing import preferences as P
    from karma.pairing.settings import PreferencesConfig
    from tests.test_preferences import SCORES

    execute(KINSHIP, Params(), KinshipPaths(scores=SCORES, out=tmp_path / "kin"))
    prefs = Params(preferences=PreferencesConfig(dataset=str(out)))
    paths = P.PreferencesPaths(kinship_dir=tmp_path / "kin", out=tmp_path / "prefs")
    m = execute(P.STAGE, prefs, paths)
    assert m["pairs"] == 6
    card = (tmp_path / "prefs" / "README.md").read_text()
    assert f"fetched from `{d.parent}`" in card and "license: other" in card


def test_hub_id_needs_a_pinned_revision_and_fails_offline_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    out = tmp_path / "c.parquet"
    argv = ["fetch", "--out", str(out), "--dataset", "openbmb/UltraFeedback"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 1 and stdout == ""
    line = _one_line(err)
    assert "field 'fetch.revision': a hub dataset needs a pinned revision" in line, line
    code, stdout, err = _cli([*argv, "--revision", "40e3" * 10], capsys)
    assert code == 1 and stdout == ""
    line = _one_line(err)
    assert line.startswith("karma: error: openbmb/UltraFeedback: cannot fetch the dataset"), line
    assert "offline?" in line
    assert (not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "hf"]) or not out.exists()
    code, _, err = _cli(["fetch", "--out", str(out), "--dataset", "no/such.jsonl"], capsys)
    assert code == 1 and "dataset not found" in _one_line(err)


def test_the_licenses_follow_the_source() -> None:
    assert F.license_of("openbmb/UltraFeedback") == "mit"
    assert F.license_of("HuggingFaceH4/ultrafeedback_binarized") == "mit"
    assert F.license_of("some/dataset", "cc-by-4.0") == "cc-by-4.0"
    assert F.license_of("some/dataset") == "other"
    assert F.license_of(str(DEMO)) == "apache-2.0"


def test_fetch_is_a_dvc_stage_that_preferences_depends_on() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    path = dvc["vars"][0]["path"]["completions"]
    stage = dvc["stages"]["fetch"]
    assert (
        stage["cmd"].startswith("python -m stages.fetch") and "${path.completions}" in stage["outs"]
    )
    assert Params().preferences.dataset == path
    assert "${preferences.dataset}" in dvc["stages"]["preferences"]["deps"]
    assert "data/demo/ultrafeedback_demo.jsonl" in stage["deps"]
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--md"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', proc.stdout))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", proc.stdout)}
    assert ("fetch", "preferences") in edges and ("fetch", "tau_sweep") in edges, edges
    assert ("preferences", "select") in edges
