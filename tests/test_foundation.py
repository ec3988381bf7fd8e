"""The shared pieces: atomic output, typed params, the CLI's error contract."""

from __future__ import annotations

import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from karma.config import from_dict, load_params
from karma.errors import KarmaError
from karma.io import atomic_path, write_json


def test_atomic_file_appears_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
    write_json(target, {"b": 1, "a": [1.5]})
    assert target.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_dir_replaces_old_output_and_is_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    with pytest.raises(ValueError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "partial.txt").write_text("x")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # old result kept
    assert len(list(tmp_path.iterdir())) == 1


@dataclass
class Demo:
    method: Literal["dpo", "sft"] = "dpo"
    ratio: float = 0.4
    steps: int = 1
    groups: dict[str, list[str]] = field(default_factory=dict)


def test_from_dict_types_and_literals() -> None:
    cfg = from_dict(Demo, {"method": "sft", "ratio": 1, "steps": 3}, where="params.yaml:demo")
    assert cfg == Demo(method="sft", ratio=1.0, steps=3)
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"metod": "dpo"}, "field 'metod': unknown key; did you mean 'method'?"),
        ({"method": "ppo"}, "field 'method': wrong type (got 'ppo'; expected 'dpo' | 'sft')"),
        ({"steps": 1.5}, "field 'steps': wrong type (got 1.5; expected int)"),
        ({"steps": True}, "field 'steps': wrong type"),
    ],
)
def test_from_dict_errors_name_file_field_value(data: dict, needle: str) -> None:
    with pytest.raises(KarmaError) as err:
        from_dict(Demo, data, where="params.yaml:demo")
    assert str(err.value).startswith("params.yaml:demo: ")
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_load_params_errors(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(KarmaError, match="not valid YAML"):
        load_params(bad)


def test_cli_turns_errors_into_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "scores.csv"
    bad.write_text("model,ifeval\ngpt-4,85\ngpt-4,80\n")
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "kinship", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("karma: error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_suggests_close_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "kinsip"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Did you mean 'kinship'?" in proc.stderr
