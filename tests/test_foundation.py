"""The shared pieces: the settings model, one-line errors, the digest, staged outputs, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from karma.core.errors import KarmaError
from karma.core.io import MARKER, atomic_file, cache_root, record_written, tree_digest
from karma.core.settings import iter_fields
from karma.core.stage import Stage, execute, input_path, output_path
from karma.params import Params, build_params, defaults_yaml, load_params
from karma.selection.settings import SelectConfig

# --------------------------------------------------------------------------- settings


def test_defaults_are_valid_and_round_trip_through_the_generated_yaml() -> None:
    text = defaults_yaml()
    assert Params.model_validate(yaml.safe_load(text)) == Params()
    # every leaf setting is documented in the generated file, with its help text
    for key, info in iter_fields(Params):
        assert info.description, key
        assert f"# {info.description}" in text, key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kinshp": "sim"}, "params.yaml: field 'kinshp': unknown key; did you mean 'kinship'?"),
        ({"kinship": "simm"}, "field 'kinship': not one of the choices; did you mean 'sim'?"),
        ({"select": {"raito": 0.3}}, "field 'select.raito': unknown key; did you mean 'ratio'?"),
        ({"select": {"ratio": 0}},
         "field 'select.ratio': out of range (got 0; expected 0 < ratio <= 1)"),
        ({"select": {"batch_size": 1.5}}, "field 'select.batch_size': wrong type (got 1.5"),
        ({"seed": -1}, "field 'seed': out of range (got -1; expected 0 <= seed < 9.22337e+18)"),
        ({"similarity": {"tau": 2}},
         "field 'similarity.tau': out of range (got 2; expected -1 <= tau <= 1)"),
        ({"train": {"trl": {"seed": 3}}},
         "field 'train.trl': 'seed' is set by the top-level 'seed'"),
        ({"evaluate": {"apply_chat_template": "gen"}}, "field 'evaluate.apply_chat_template'"),
        ({"base_model": {"source": "embedded:smollm2-135m"}},
         "did you mean 'embedded:smollm2-135m-instruct'?"),
        ({"select": "map"}, "field 'select': wrong type"),
    ],
)  # fmt: skip
def test_params_file_errors_name_the_file_and_key(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KarmaError) as err:
        load_params(path)
    text = str(err.value)
    assert text.startswith(f"{path}: field '")
    assert message.removeprefix("params.yaml: ") in text
    assert "\n" not in text


def test_override_errors_name_the_flag_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("select: {ratio: 0.5}\n")
    with pytest.raises(KarmaError) as err:
        build_params(path, [("select.ratio", 0, "--ratio")])
    assert str(err.value) == "--ratio: out of range (got 0; expected 0 < ratio <= 1)"
    with pytest.raises(KarmaError) as err:
        build_params(None, [("select.beta", -1, "-S select.beta")])
    assert str(err.value).startswith("-S select.beta: out of range")
    # overrides win over the file, the file over the defaults
    p = build_params(path, [("seed", 3, "--seed")])
    assert (p.select.ratio, p.seed, p.select.beta) == (0.5, 3, SelectConfig().beta)


def test_params_file_problems(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(KarmaError, match=r"line \d+: not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(KarmaError, match="top level must be a mapping"):
        load_params(bad)


# --------------------------------------------------------------------------- io


def test_tree_digest_of_a_directory_and_its_memo(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"abc")
    (d / "sub" / "b.txt").write_bytes(b"xyz")
    first = tree_digest(d)
    assert tree_digest(d, memo=True) == first
    assert len(list(cache_root("digests").rglob("*"))) == 2  # one shard dir, one entry
    # same size, same mtime: the memo answers without reading (proof: a stale answer)
    st = (d / "a.bin").stat()
    (d / "a.bin").write_bytes(b"abd")
    os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree_digest(d, memo=True) == first
    assert tree_digest(d) != first  # without the memo the content counts
    os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # any rewrite moves mtime
    assert tree_digest(d, memo=True) == tree_digest(d) != first
    # names count, not only bytes
    before = tree_digest(d)
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert tree_digest(d) != before


def test_atomic_file_appears_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# --------------------------------------------------------------------------- staged outputs


@dataclass(frozen=True, kw_only=True)
class DemoPaths:
    src: Path = input_path("input")
    out: Path = output_path("out dir", is_dir=True)
    metrics: Path | None = output_path("metrics", ".json", required=False)


def _demo(fail_after: bool = False) -> Stage:
    def run(params: Params, paths: DemoPaths) -> dict[str, Any]:
        Path(paths.out, "data.txt").write_text(Path(paths.src).read_text().upper())
        if paths.metrics is not None:
            Path(paths.metrics).write_text('{"n": 1}\n')
        if fail_after:
            raise KarmaError("boom")
        return {"n": 1}

    return Stage(name="demo", settings=(), paths=DemoPaths, run=run)


def test_outputs_appear_together_only_after_success(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("new")
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    out.mkdir()
    (out / "data.txt").write_text("OLD")
    (out / MARKER).write_text('{"by": "karma", "files": ["data.txt"]}')  # an earlier output
    metrics.write_text("old")
    record_written(metrics)  # an earlier output of karma's
    with pytest.raises(KarmaError, match="boom"):
        execute(_demo(fail_after=True), Params(), DemoPaths(src=src, out=out, metrics=metrics))
    assert (out / "data.txt").read_text() == "OLD" and metrics.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "m.json", "out"]
    execute(_demo(), Params(), DemoPaths(src=src, out=out, metrics=metrics))
    assert (out / "data.txt").read_text() == "NEW" and metrics.read_text() == '{"n": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "m.json", "out"]


def test_leftovers_of_a_killed_run_are_cleaned_and_a_half_commit_restored(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("x")
    out = tmp_path / "out"
    # a kill after "old aside" and before "new in": only the set-aside copy exists
    (tmp_path / ".out.karma-old").mkdir()
    (tmp_path / ".out.karma-old" / "data.txt").write_text("KEPT")
    (tmp_path / ".out.karma-old" / MARKER).write_text('{"by": "karma", "files": ["data.txt"]}')
    (tmp_path / ".out.karma-tmp").mkdir()  # and a half-written temporary
    (tmp_path / ".m.karma-tmp.json").write_text("{")
    with pytest.raises(KarmaError):
        execute(_demo(fail_after=True), Params(), DemoPaths(src=src, out=out))
    assert (out / "data.txt").read_text() == "KEPT"  # restored, then left alone by the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.karma-tmp.json", "in.txt", "out"]
    execute(_demo(), Params(), DemoPaths(src=src, out=out, metrics=tmp_path / "m.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "m.json", "out"]


@pytest.mark.parametrize(
    ("out", "metrics", "message"),
    [
        ("in.txt", None, "in.txt: field '--out': output path is (or holds, or lies inside) the "
         "input --src"),
        (".", None, ".: field '--out': output path is (or holds, or lies inside) the input --src"),
        ("o", "in.txt", "in.txt: field '--metrics': output path is"),
        ("o", "m.txt",
         "m.txt: field '--metrics': wrong output suffix (got '.txt'; expected .json)"),
    ],
)  # fmt: skip
def test_output_paths_that_would_destroy_inputs_are_refused(
    tmp_path: Path, monkeypatch: Any, out: str, metrics: str | None, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("in.txt").write_text("precious")
    paths = DemoPaths(src=Path("in.txt"), out=Path(out), metrics=metrics and Path(metrics))
    with pytest.raises(KarmaError) as err:
        execute(_demo(), Params(), paths, flag=lambda n: f"--{n}")
    assert message in str(err.value)
    assert Path("in.txt").read_text() == "precious"
    assert sorted(os.listdir(".")) == ["in.txt"]


def test_missing_input_is_one_line(tmp_path: Path) -> None:
    paths = DemoPaths(src=tmp_path / "nope.txt", out=tmp_path / "o")
    with pytest.raises(KarmaError) as err:
        execute(_demo(), Params(), paths, flag=lambda n: f"--{n}")
    assert str(err.value) == f"{tmp_path / 'nope.txt'}: field '--src': input not found"


# --------------------------------------------------------------------------- the command line


def _karma(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "karma.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "scores.csv"
    bad.write_text("model,ifeval\ngpt-4,85\ngpt-4,80\n")
    cases = [
        (["kinship", "--scores", str(bad), "--out", str(tmp_path / "o")], 1, "duplicate model"),
        (["kinship", "--scores", str(bad), "--out", str(tmp_path / "o"), "--tau", "3"], 1,
         "--tau: out of range (got 3; expected -1 <= tau <= 1)"),
        (["kinship", "--scores", str(bad), "--out", str(tmp_path / "o"), "--params",
          str(tmp_path / "typo.yaml")], 1, "typo.yaml: params file not found"),
        (["kinship", "--scores", str(bad), "--out", str(tmp_path / "o"), "-S",
          "similarity.metrc=cosine"], 1, "-S similarity.metrc: unknown key; did you mean"),
        (["kinship", "--out", str(tmp_path / "o")], 2, "Missing option '--scores'"),
        (["kinsip"], 2, "no such command 'kinsip'; did you mean 'kinship'?"),
    ]  # fmt: skip
    for argv, code, needle in cases:
        proc = _karma(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("karma: error: "), proc.stderr
        assert needle in lines[0], lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_every_setting_of_every_stage_is_a_flag() -> None:
    from karma.cli import STAGES
    from karma.command import load_stage, make_command

    for name, (ref, short) in STAGES.items():
        stage = load_stage(ref)
        command = make_command(stage, name, short, settings=True)
        flags = {opt for p in command.params for opt in p.opts}
        for key in stage.setting_keys(Params):
            assert f"--{key.rsplit('.', 1)[-1].replace('_', '-')}" in flags, (name, key)
        assert {"--params", "-S"} <= flags
