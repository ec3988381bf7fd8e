"""Hostile runs (issue 21): races, signals, settings that must not destroy, params as shell.

* Races: pairs of ``karma preferences`` (40k records) and of ``karma kinship`` on one output,
  started 0-200 ms apart (forked after the imports, in a subprocess: ``python -m
  tests.test_hostile_races --race-driver``). Every pair leaves one run's whole output set,
  never a mix; a run that loses the race says so in one line naming the other's pid.
* SIGTERM (``timeout``, schedulers, ``docker stop``) behaves as Ctrl-C: one line, exit 143,
  temporaries removed, the earlier output whole.
* A bad training setting after a run leaves every checkpoint byte-identical.
* No value of ``params.yaml`` is shell text in ``dvc.yaml``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: Size of the races (the issue's: 20 pairs over 40k records).
PAIRS = 20
RECORDS = 40_000
LEFTOVER = re.compile(r"\.karma-(tmp|old|journal|lock)")


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``karma <argv>`` in-process in ``cwd``: (exit code, stdout, stderr)."""
    from karma.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):  # fmt: skip
            main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.handlers[:], root.level = saved
    return code, out.getvalue(), err.getvalue()


def state(p: Path) -> Any:
    """A file's digest, a directory's {file: digest}, or None."""
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        return {f.relative_to(p).as_posix(): state(f) for f in sorted(p.rglob("*")) if f.is_file()}
    return None


def tree(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its content (links as links)."""
    return {
        str(p.relative_to(root)): ("link", os.readlink(p)) if p.is_symlink() else state(p)
        for p in sorted(root.rglob("*"))
    }


def env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "KARMA_CACHE_DIR": str(cache), "PYTHONPATH": path}


# --------------------------------------------------------------------------- races


@dataclass(frozen=True)
class Race:
    """Two commands writing the same outputs."""

    a: list[str]
    b: list[str]
    outputs: tuple[str, ...]


RACES = {
    "preferences": Race(
        ["preferences", "--kinship-dir", "kin", "--dataset", "big.parquet", "--out", "prefs",
         "--metrics", "pm.json", "--kinship", "score"],
        ["preferences", "--kinship-dir", "kin", "--dataset", "big.parquet", "--out", "prefs",
         "--metrics", "pm.json", "--kinship", "random"],
        ("prefs", "pm.json"),
    ),
    "kinship": Race(
        ["kinship", "--scores", "scores.csv", "--out", "kout", "--metrics", "km.json",
         "--metric", "cosine"],
        ["kinship", "--scores", "scores.csv", "--out", "kout", "--metrics", "km.json",
         "--metric", "pearson"],
        ("kout", "km.json"),
    ),
}  # fmt: skip


def _fork(argv: list[str], err_file: Path) -> int:
    from karma.cli import main

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(err_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def race_driver(ws: Path, pairs: int) -> dict[str, Any]:
    """Run the pairs of every race (children forked after the imports) and record each end."""
    import scipy.cluster.hierarchy  # imported once: children start at once
    import scipy.spatial.distance
    import scipy.stats  # noqa: F401

    import karma.kinship.clusters
    import karma.kinship.kinship
    import karma.pairing.preferences  # noqa: F401

    os.chdir(ws)
    rng = random.Random(0)
    logs = ws.parent / "logs"
    logs.mkdir(exist_ok=True)
    report: dict[str, Any] = {}
    for name, race in RACES.items():
        wholes = []
        for i, argv in enumerate((race.a, race.b)):  # each run alone: its whole output set
            for out in race.outputs:
                p = ws / out
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            assert _wait(_fork(argv, logs / f"{name}-alone-{i}.err")) == 0
            wholes.append({o: state(ws / o) for o in race.outputs})
        runs = []
        t0 = time.perf_counter()
        for k in range(pairs):
            first, second = (race.a, race.b) if k % 2 == 0 else (race.b, race.a)
            errs = [logs / f"{name}-{k}-{j}.err" for j in (1, 2)]
            p1 = _fork(first, errs[0])
            time.sleep(rng.uniform(0, 0.2))
            p2 = _fork(second, errs[1])
            codes = [_wait(p1), _wait(p2)]
            runs.append({
                "first_is_a": first is race.a,
                "codes": codes,
                "errors": [e.read_text().strip().splitlines()[-1:] for e in errs],
                "state": {o: state(ws / o) for o in race.outputs},
                "leftovers": sorted(p.name for p in ws.iterdir() if LEFTOVER.search(p.name)),
            })  # fmt: skip
        report[name] = {"wholes": wholes, "runs": runs, "seconds": time.perf_counter() - t0}
    return report


@pytest.fixture(scope="module")
def raced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.fixtures import synthetic_records

    root = tmp_path_factory.mktemp("race")
    ws = root / "ws"
    ws.mkdir()
    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KARMA_CACHE_DIR", str(root / "cache"))
        code, _, err = run_cli(["kinship", "--scores", "scores.csv", "--out", "kin"], ws)
    assert code == 0, err
    synthetic_records(RECORDS, ws / "big.parquet", seed=2)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_hostile_races", "--race-driver", str(ws), str(PAIRS)],
        cwd=REPO, env=env(root / "cache"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(RACES))
def test_concurrent_runs_leave_one_whole_output_set(raced: dict[str, Any], name: str) -> None:
    race = raced[name]
    a, b = race["wholes"]
    assert all(a[o] != b[o] and a[o] and b[o] for o in a)  # the two runs' outputs differ
    lost = 0
    for run in race["runs"]:
        mine = [a, b] if run["first_is_a"] else [b, a]  # whole output of (first, second)
        assert run["state"] in (a, b), run  # never a mix
        assert run["leftovers"] == [], run
        assert 0 in run["codes"] and set(run["codes"]) <= {0, 1}, run
        if run["codes"] != [0, 0]:  # one lost the race: it said so, the winner's set is there
            loser = run["codes"].index(1)
            assert run["state"] == mine[1 - loser], run
            assert run["errors"][loser], run
            line = run["errors"][loser][0]
            assert re.search(r"karma: error: .*another karma run \(pid \d+\) is writing", line)
            lost += 1
    assert lost >= 1, "no pair overlapped: the race was not tested"


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    assert run_cli(["kinship", "--scores", "scores.csv", "--out", "kin"], ws)[0] == 0
    before = tree(ws)
    fd = os.open(ws / ".kin.karma-lock", os.O_RDWR | os.O_CREAT)  # another run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        t0 = time.perf_counter()
        code, _, err = run_cli(["kinship", "--scores", "scores.csv", "--out", "kin"], ws)
        assert time.perf_counter() - t0 < 5
    finally:
        os.close(fd)
    assert code == 1 and err.strip().splitlines() == [
        "karma: error: kin: field '--out': another karma run (pid 4242) is writing this output; "
        "wait for it to finish or choose another path"
    ]
    (ws / ".kin.karma-lock").unlink()
    assert tree(ws) == before
    assert run_cli(["kinship", "--scores", "scores.csv", "--out", "kin"], ws)[0] == 0
    assert not [p for p in ws.iterdir() if LEFTOVER.search(p.name)]


def test_a_symlinked_file_output_is_followed_never_replaced(tmp_path: Path, monkeypatch: Any):
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    (ws / "shared").mkdir(parents=True)
    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    argv = ["kinship", "--scores", "scores.csv", "--out", "kin", "--metrics"]
    assert run_cli([*argv, "shared/km.json"], ws)[0] == 0  # karma's file
    os.symlink("shared/km.json", ws / "km.json")
    (ws / "shared/km.json").write_text("{}")  # changed since: no longer what karma wrote
    code, _, err = run_cli([*argv, "km.json", "-S", "similarity.tau=0.2"], ws)
    assert code == 1 and "output file exists and was not written by karma" in err
    assert (ws / "shared/km.json").read_text() == "{}"
    (ws / "shared/km.json").unlink()
    assert run_cli([*argv, "shared/km.json"], ws)[0] == 0
    first = (ws / "shared/km.json").read_text()
    assert run_cli([*argv, "km.json", "--metric", "pearson"], ws)[0] == 0
    assert os.readlink(ws / "km.json") == "shared/km.json"  # still the link
    assert (ws / "shared/km.json").read_text() != first  # written through it


def test_a_directory_of_another_stage_is_refused(tmp_path: Path) -> None:
    from karma.core.errors import KarmaError
    from karma.core.stage import Stage, execute, input_path, output_path
    from karma.params import Params

    @dataclass(frozen=True, kw_only=True)
    class Paths:
        src: Path = input_path("input")
        out: Path = output_path("out dir", is_dir=True)

    def run(params: Params, paths: Any) -> dict[str, Any]:
        Path(paths.out, "data.txt").write_text("new")
        return {}

    (tmp_path / "in.txt").write_text("x")
    paths = Paths(src=tmp_path / "in.txt", out=tmp_path / "out")
    execute(Stage(name="one", settings=(), paths=Paths, run=run), Params(), paths)
    before = tree(tmp_path)
    with pytest.raises(KarmaError, match=r"output directory was written by karma stage 'one', "
                       r"not 'two'"):  # fmt: skip
        execute(Stage(name="two", settings=(), paths=Paths, run=run), Params(), paths)
    assert tree(tmp_path) == before


def test_a_full_disk_names_the_output(tmp_path: Path) -> None:
    from karma.core.errors import KarmaError
    from karma.core.stage import Stage, execute, input_path, output_path
    from karma.params import Params

    @dataclass(frozen=True, kw_only=True)
    class Paths:
        src: Path = input_path("input")
        out: Path = output_path("out dir", is_dir=True)

    def run(params: Params, paths: Any) -> dict[str, Any]:
        Path(paths.out, "part").write_text("half")
        raise OSError(errno.EFBIG, "File too large")  # as a library writer raises it: no name

    (tmp_path / "in.txt").write_text("x")
    paths = Paths(src=tmp_path / "in.txt", out=tmp_path / "out")
    with pytest.raises(KarmaError, match=r"out: cannot write or read: File too large \(free "
                       r"space on that disk, or raise the file-size limit"):  # fmt: skip
        execute(Stage(name="demo", settings=(), paths=Paths, run=run), Params(), paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


# --------------------------------------------------------------------------- signals


def test_sigterm_behaves_as_ctrl_c(tmp_path: Path) -> None:
    from tests.fixtures import synthetic_records

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    e = env(tmp_path / "cache")
    cmd = [sys.executable, "-m", "karma.cli"]
    subprocess.run([*cmd, "kinship", "--scores", "scores.csv", "--out", "kin"], cwd=ws, env=e,
                   check=True, capture_output=True)  # fmt: skip
    synthetic_records(20_000, ws / "big.parquet", seed=1)
    argv = ["preferences", "--kinship-dir", "kin", "--dataset", "big.parquet", "--out", "prefs",
            "--metrics", "pm.json"]  # fmt: skip
    subprocess.run([*cmd, *argv, "--seed", "1"], cwd=ws, env=e, check=True, capture_output=True)
    before = tree(ws)
    proc = subprocess.Popen([*cmd, *argv, "--seed", "2"], cwd=ws, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(ws.glob(".prefs.karma-tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["karma: aborted (SIGTERM); temporary outputs removed"], err
    assert tree(ws) == before  # the earlier outputs whole; no temporary, no lock left


# --------------------------------------------------------------------------- settings


def test_a_bad_training_setting_leaves_every_checkpoint(tmp_path: Path, monkeypatch: Any):
    """Checkpoints of an earlier run (another fingerprint) stay byte-identical when the next
    run's setting is bad: every TRL value is checked before the checkpoint directory is touched
    (before: "removing stale checkpoints", then a TypeError 10 s later)."""
    from tests.fixtures import synthetic_pairs

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    (ws / "base").mkdir(parents=True)
    (ws / "base/config.json").write_text("{}")
    synthetic_pairs(8).write_parquet(ws / "pairs.parquet")
    for step in (1, 2):  # what `karma train --keep-checkpoints` leaves
        ck = ws / f"ck/0123456789abcdef/checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (ck / "model.safetensors").write_bytes(os.urandom(4096))
    before = tree(ws)
    argv = ["train", "--data", "pairs.parquet", "--base", "base", "--out", "pol",
            "--checkpoints", "ck", "--keep-checkpoints", "-S"]  # fmt: skip
    for bad, says in [
        ("train.trl.max_steps=many", "-S train.trl.max_steps: wrong type (got 'many'; expected "
         "int)"),
        ("train.trl.learning_rate=-1", "-S train.trl.learning_rate: out of range"),
        ("train.trl.num_train_epochs=lots", "-S train.trl.num_train_epochs: wrong type"),
    ]:  # fmt: skip
        code, _, err = run_cli([*argv, bad], ws)
        assert code == 1 and len(err.strip().splitlines()) == 1 and says in err, err
        assert tree(ws) == before, bad


# --------------------------------------------------------------------------- no shell from params


def _interpolations(node: Any) -> list[str]:
    return re.findall(r"\$\{([^}]*)\}", node if isinstance(node, str) else "")


def test_no_params_value_is_shell_text_in_dvc_yaml() -> None:
    """Every ``${...}`` in a command is a fixed path of ``vars``: a params.yaml from a pull
    request cannot run code (``measured: {x: "a; touch FILE #"}`` once could)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    fixed = {f"path.{k}" for v in spec["vars"] for k in v.get("path", {})}
    commands = {}
    tables = {k for v in spec["vars"] for k in v if k != "path"}  # the registry's own tables
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        cmds = body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]
        commands[name] = cmds
        # ${item.*} only in a foreach over a table of vars (self-play rounds), never over params
        over_table = str(stage.get("foreach", "")).strip("${}") in tables
        for cmd in cmds:
            used = {u for u in _interpolations(cmd) if not (over_table and u.startswith("item."))}
            assert used <= fixed, (name, cmd)
    assert commands["benchmark"] == [
        "python -m stages.benchmark --measured-dir ${path.measured} "
        "--samples-dir ${path.benchmark_samples}"
    ]
    assert "scores.measured.${key}" in spec["stages"]["benchmark"]["do"]["params"]


def test_a_measured_name_comes_from_dvc_and_is_checked(tmp_path: Path) -> None:
    from karma.command import measured_argv
    from karma.core.errors import KarmaError
    from karma.params import build_params
    from karma.registry import PIPELINE, Wiring

    dirs = ["--measured-dir", "m", "--samples-dir", "s"]
    assert measured_argv(dirs, {"DVC_STAGE": "benchmark@tiny-1"}) == [
        "--name", "tiny-1", "--out", "m/tiny-1.json", "--samples", "s/tiny-1.parquet",
    ]  # fmt: skip
    for stage in ("benchmark@x; touch FILE #", "benchmark@$(id)", "benchmark", ""):
        with pytest.raises(KarmaError, match=r"DVC_STAGE'?: not a measured model's name"):
            measured_argv(dirs, {"DVC_STAGE": stage})
    for bad in ("x; touch FILE #", "a.b", "-x", "$(id)"):
        with pytest.raises(KarmaError, match=r"scores\.measured"):
            build_params(None, [("scores.measured", {bad: "m"}, "-S scores.measured")])
    # the generator refuses a wiring that would put a params value in a command
    from karma.dvcyaml import stage_entry

    bench = next(w for w in PIPELINE if w.name == "benchmark")
    unsafe = Wiring(**{**bench.__dict__, "cmd_args": None})
    with pytest.raises(ValueError, match="a params value in the command"):
        stage_entry(unsafe)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--race-driver"]:
        print(json.dumps(race_driver(Path(sys.argv[2]), int(sys.argv[3]))))


# --------------------------------------------------------------------------- queued experiments

QUEUED_DVC_YAML = """\
stages:
  kin:
    cmd: python -m karma.cli kinship --scores scores.csv --out kin --params params.yaml
    deps: [scores.csv]
    params: [similarity.metric]
    outs: [kin]
"""


def test_queued_experiments_run_in_separate_workspaces(tmp_path: Path) -> None:
    """Two queued ``dvc exp`` runs of one stage with one ``--out`` and different params, run
    together (``-j 2``): DVC gives each its own workspace, so each experiment's output is whole
    and exactly what its own params give alone, and the user's workspace is untouched."""
    proj = tmp_path / "proj"
    proj.mkdir()
    run_env = {**env(tmp_path / "cache"), "PATH": f"{Path(sys.executable).parent}:"
               f"{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.com"}  # fmt: skip

    def sh(*cmd: str, cwd: Path = proj) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc.stdout

    dvc = (sys.executable, "-m", "dvc")
    shutil.copy(REPO / "data/origin/scores.csv", proj / "scores.csv")
    (proj / "params.yaml").write_text("similarity:\n  metric: cosine\n")
    (proj / "dvc.yaml").write_text(QUEUED_DVC_YAML)
    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    sh(*dvc, "config", "core.analytics", "false")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    metrics = ("pearson", "euclidean")
    for metric in metrics:
        sh(*dvc, "exp", "run", "--queue", "-S", f"similarity.metric={metric}")
    sh(*dvc, "exp", "run", "--run-all", "-j", "2")
    assert not (proj / "kin").exists()  # the experiments ran elsewhere
    names = sh(*dvc, "exp", "list", "--name-only").split()
    assert len(names) == 2, names
    for name in names:
        sh(*dvc, "exp", "apply", name)
        metric = yaml.safe_load((proj / "params.yaml").read_text())["similarity"]["metric"]
        alone = tmp_path / f"alone-{metric}"
        sh(sys.executable, "-m", "karma.cli", "kinship", "--scores", "scores.csv", "--out",
           str(alone), "--metric", metric)  # fmt: skip
        got = {p.name: p.read_bytes() for p in sorted((proj / "kin").iterdir())}
        want = {p.name: p.read_bytes() for p in sorted(alone.iterdir())}
        assert got == want, (name, metric)
        metrics = tuple(m for m in metrics if m != metric)
    assert metrics == ()  # one experiment per queued value
