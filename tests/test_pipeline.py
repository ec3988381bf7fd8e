"""The pipeline as DVC sees it: tracked params, the committed params.yaml, and every stage script
against its ``karma`` command (same settings -> byte-identical outputs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from karma.core.settings import is_operational, iter_fields
from karma.core.stage import load_stage
from karma.params import Params, defaults_yaml
from karma.registry import PATHS

REPO = Path(__file__).resolve().parents[1]


def _dvc_stages() -> dict[str, dict[str, Any]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def _stage_ref(cmd: str) -> str:
    module = cmd.split()[2]  # python -m stages.NAME
    script = REPO / (module.replace(".", "/") + ".py")
    return re.search(r'stage_main\("([^"]+)"\)', script.read_text()).group(1)  # type: ignore[union-attr]


def test_dvc_yaml_tracks_exactly_the_params_that_change_outputs() -> None:
    for name, spec in _dvc_stages().items():
        stage = load_stage(_stage_ref(spec["cmd"]))
        listed = spec.get("params", [])
        assert len(listed) == len(set(listed)), name
        per_instance = {k for k in listed if "${key}" in k}  # scores.measured.${key}
        covered = {k for k in stage.tracked_keys(Params) if any(
            p.startswith(k + ".") for p in per_instance)}  # fmt: skip
        assert set(listed) - per_instance == set(stage.tracked_keys(Params)) - covered, name
        assert f"stages/{name}.py" in spec["deps"], name


def test_committed_params_yaml_is_the_documented_defaults() -> None:
    text = (REPO / "params.yaml").read_text()
    assert text == defaults_yaml(), "regenerate it: karma params > params.yaml"
    assert Params.model_validate(yaml.safe_load(text)) == Params()


def _status(root: Path) -> dict[str, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, set[str]] = {}
    for stage, changes in json.loads(proc.stdout or "{}").items():
        for change in changes:
            keys = (
                change.get("changed deps", {}).get("params.yaml") if isinstance(change, dict) else 0
            )
            if isinstance(keys, dict) and keys:  # a str ("new") is a stage never run
                out.setdefault(stage.split("@")[0], set()).update(keys)
    return out


MEASURED = {"x": "some/model"}  # one benchmark@x instance, so that its params are checked too


def _changed(key: str, value: Any) -> Any:
    if key == "scores.measured":  # the foreach of the benchmark stage: keep benchmark@x
        return {"x": "other/model", "changed": "other/model"}
    return f"changed/{key}/{value}"


def _resolve(text: str, key: str) -> str:
    """A dvc.yaml path with its ``${path.*}`` vars and the foreach ``${key}`` filled in."""
    text = text.replace("${key}", key)
    return re.sub(r"\$\{path\.(\w+)\}", lambda m: PATHS[m.group(1)], text)


def test_dvc_status_ignores_operational_knobs_and_sees_every_other_param(tmp_path: Path) -> None:
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    assert _status(tmp_path) == {}, "dvc.lock is out of step with params.yaml: run dvc repro"
    # a locked benchmark@x (stand-in files for its deps and out), so its params are checked too
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["scores"]["measured"] = MEASURED
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    spec = _dvc_stages()["benchmark"]
    for dep in [*spec["deps"], *spec["outs"]]:  # stand-ins for benchmark@x's deps and outs
        rel = _resolve(dep, "x")
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (tmp_path / rel).exists():
            (tmp_path / rel).write_text("x")
    subprocess.run([*dvc, "commit", "-f", "-q", "benchmark@x"], cwd=tmp_path, check=True)
    baseline = _status(tmp_path)
    # scores and judge read the whole pool (scores.measured); benchmark@x only its own entry
    assert baseline == {"scores": {"scores.measured"}, "judge": {"scores.measured"}}, baseline

    def write(keys: list[str]) -> None:
        data = yaml.safe_load(yaml.safe_dump(params))
        for key in keys:
            *parents, last = key.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[last] = _changed(key, node[last])
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))

    operational = [k for k, info in iter_fields(Params) if is_operational(info)]
    assert {"train.launcher", "train.num_processes", "evaluate.threads"} <= set(operational)
    write(operational)
    assert _status(tmp_path) == baseline, "an operational knob is tracked by dvc.yaml"

    tracked = [k for k, info in iter_fields(Params) if not is_operational(info)]
    write(tracked)
    status = _status(tmp_path)
    locked = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    for name, spec in _dvc_stages().items():
        if name not in locked:  # a stage never run (dvc status: new); dvc repro locks it
            continue
        listed = {_resolve(k, "x") for k in spec.get("params", [])}
        assert status.get(name, set()) == listed, name
    seen = {k.removesuffix(".x") for k in set().union(*status.values())}
    # every result-affecting param is tracked: by a locked stage (seen changed above), or listed
    # by a stage this scratch project never ran (generate@<name>, per pool model)
    listed = {_resolve(k, "x").removesuffix(".x") for s in _dvc_stages().values()
              for k in s.get("params", [])}  # fmt: skip
    assert seen <= set(tracked) and set(tracked) <= seen | listed, "a param is tracked by no stage"


# --------------------------------------------------------------------------- script vs command


def _files(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _script(name: str, args: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _command(argv: list[str]) -> None:
    from karma.cli import main

    try:
        main(argv)
    except SystemExit as exit_:  # pragma: no cover - a failure is the assertion
        raise AssertionError(f"karma {' '.join(argv)} exited with {exit_.code}") from None


@pytest.mark.parametrize("_", [0])
def test_every_stage_script_writes_what_its_command_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _: int
) -> None:
    from tests.fixtures import build_tiny_model

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    # a model that answers the base_model stage's check with some text
    tiny_model_dir = build_tiny_model(tmp_path / "tiny", initializer_range=0.3)
    a, b = tmp_path / "a", tmp_path / "b"  # a: the DVC stage scripts, b: the karma commands
    for d in (a, b):
        (d / "measured").mkdir(parents=True)
    row = {"model": "tiny", **{k: 0.5 + 0.01 * i for i, k in enumerate(["ifeval", "arc_easy"])}}
    row["meta.protocol"] = "paper"  # the reported table's (scores refuses another)
    (a / "measured" / "tiny.json").write_text(json.dumps(row))
    demo = (REPO / "data/demo/ultrafeedback_demo.jsonl").read_text().splitlines()[:40]
    (a / "demo.jsonl").write_text("\n".join(demo) + "\n")
    params = defaults_yaml_with(
        {
            "scores": {"reported": str(REPO / "data/origin/scores.csv"), "measured": {"tiny": "x"}},
            "fetch": {"dataset": str(a / "demo.jsonl")},
            "preferences": {"dataset": "completions.parquet"},
            "sweep": {"taus": [0.1, 0.9]},
            "base_model": {"source": str(tiny_model_dir), "check_expect": None,
                           "check_max_new_tokens": 4},
            "select": {"method": "map", "ratio": 0.5, "cache": False},
            "train": {"trl": {"max_steps": 2, "per_device_train_batch_size": 2,
                              "max_length": 64, "logging_steps": 1}, "checkpoint_steps": 1},
            "benchmark": {"limit": 2, "max_gen_toks": 8, "cache": False,
                          "tasks": {"arc_easy": {"task": "karma_arc_easy", "metric": "acc_norm"},
                                    "ifeval": {"task": "karma_ifeval",
                                               "metric": "prompt_level_strict_acc"}}},
        }
    )  # fmt: skip
    params["evaluate"] = {**params["evaluate"], **params["benchmark"]}
    (a / "params.yaml").write_text(yaml.safe_dump(params))
    pfile = str(a / "params.yaml")

    steps: list[tuple[str, str, list[tuple[str, str]], list[str]]] = [
        # (script, command, [(flag, a-relative path)], outputs)
        ("scores", "scores", [("--measured-dir", "measured"), ("--out", "scores.csv"),
                              ("--protocols", "protocols.json")], ["scores.csv", "protocols.json"]),
        ("kinship", "kinship", [("--scores", "scores.csv"), ("--protocols", "protocols.json"),
                                ("--out", "kin"), ("--plots", "kp"), ("--metrics", "km.json")],
         ["kin", "kp", "km.json"]),
        ("fetch", "fetch", [("--out", "completions.parquet")], ["completions.parquet"]),
        ("preferences", "preferences", [("--kinship-dir", "kin"), ("--out", "prefs"),
                                        ("--metrics", "pm.json"), ("--plot", "pp.png")],
         ["prefs", "pm.json", "pp.png"]),
        ("tau_sweep", "tau-sweep", [("--kinship-dir", "kin"), ("--out", "sweep.csv"),
                                    ("--plot", "sweep.png")], ["sweep.csv", "sweep.png"]),
        ("base_model", "base-model", [("--out", "base")], ["base"]),
        ("select", "select", [("--pairs", "prefs/train_prefs.parquet"), ("--model", "base"),
                                    ("--out", "sel"), ("--metrics", "sm.json"),
                                    ("--plot", "sp.png")], ["sel", "sm.json", "sp.png"]),
        ("train", "train", [("--data", "sel/pairs.parquet"), ("--base", "base"),
                            ("--out", "policy"), ("--checkpoints", "ck"), ("--live-dir", "live"),
                            ("--metrics", "tm.json")], ["policy", "live", "tm.json"]),
        ("evaluate_base", "evaluate", [("--model", "base"), ("--out", "eb")], ["eb"]),
        ("evaluate", "evaluate", [("--model", "policy"), ("--baseline", "eb"), ("--out", "ep"),
                                  ("--metrics", "ep.json")], ["ep", "ep.json"]),
        ("benchmark", "benchmark", [("--model", "base"), ("--name", "tiny"),
                                    ("--out", "bm.json"), ("--samples", "bm.parquet")],
         ["bm.json", "bm.parquet"]),
    ]  # fmt: skip
    monkeypatch.chdir(a)  # the command reads a's inputs by the same (relative) names
    for script, command, flags, outputs in steps:
        _script(script, [x for flag, rel in flags for x in (flag, rel)], a)
        argv = [command, "--params", pfile]
        for flag, rel in flags:  # outputs go to b
            argv += [flag, str(b / rel) if rel.split("/")[0] in outputs else rel]
        _command(argv)
        for out in outputs:
            fa, fb = _files(a / out), _files(b / out)
            if out == "tm.json":  # wall time and throughput are measurements, not results
                fa, fb = ({k: _no_timing(v) for k, v in f.items()} for f in (fa, fb))
            assert fa and fa == fb, (script, out, sorted(fa), sorted(fb))
    # the headline stage reads the stages' diagnostics (here under their own names)
    (a / "diag").mkdir()
    for stage, name in (("kinship", "km"), ("preferences", "pm"), ("select", "sm"),
                        ("train", "tm"), ("eval", "ep")):  # fmt: skip
        shutil.copy(a / f"{name}.json", a / "diag" / f"{stage}.json")
    _script("headline", ["--diagnostics", "diag", "--out", "hl.json"], a)
    _command(["headline", "--params", pfile, "--diagnostics", "diag", "--out", str(b / "hl.json")])
    assert (a / "hl.json").read_bytes() == (b / "hl.json").read_bytes()
    headline = json.loads((a / "hl.json").read_text())
    assert "pairs.trained" in headline and "arc_e.delta" in headline
    assert not any(
        "time" in k or "per_second" in k for k in json.loads((a / "tm.json").read_text())
    )


def _no_timing(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    return {k: v for k, v in data.items() if k not in ("wall_time_s", "tokens_per_second")}


def defaults_yaml_with(changes: dict[str, Any]) -> dict[str, Any]:
    """The default params as a dict with ``changes`` merged into their sections."""
    data = yaml.safe_load(defaults_yaml())
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return data
