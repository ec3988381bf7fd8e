"""One entry point per stage, shared by the DVC stage script and the ``karma`` command.

A :class:`Stage` names the params it reads, its paths (inputs, outputs, persisted state) and its
``run(params, paths) -> metrics`` function in the library. From it come

* the DVC entry point (``stages/<name>.py`` calls :func:`stage_main`): paths from the command
  line that ``dvc.yaml`` writes, every setting from ``params.yaml``;
* the ``karma <name>`` command (:func:`make_command`): the same paths, plus ``--params FILE``,
  one generated option per setting and ``-S key=value``;

and both go through :func:`execute`, so the two cannot behave differently. :func:`execute`
checks the paths (an output may not be an input, nor lie inside one, nor overlap another
output; file outputs have the suffix of what is written; a directory output replaces only an
empty directory or one karma wrote: :func:`check_destination`), runs the stage into temporary
siblings of its outputs and then commits them all together through a journal
(:func:`commit`), so a failed or killed run never leaves a half-written or half-committed
result and never removes a file it did not write. The next run of a killed one finishes its
commit and removes its temporaries (:func:`recover`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from karma.core.errors import KarmaError
from karma.core.io import MARKER, atomic_file, clean_stale, short_reason, use_limits
from karma.core.settings import Section, field_at, is_operational, iter_fields, section_type

log = logging.getLogger(__name__)

LAUNCHED_ENV = "KARMA_LAUNCHED"
ROLE_NAMES = {"in": "input", "arg": "input", "out": "output", "state": "persisted state"}
TMP_SUFFIX = ".karma-tmp"
OLD_SUFFIX = ".karma-old"
JOURNAL_SUFFIX = ".karma-journal"


# --------------------------------------------------------------------------- paths


def _path(role: str, help: str, *, is_dir: bool, required: bool, suffixes: tuple[str, ...]) -> Any:
    meta = {"role": role, "help": help, "is_dir": is_dir, "suffixes": suffixes}
    if required:
        return field(metadata=meta)
    return field(default=None, metadata=meta)


def input_path(help: str, *, is_dir: bool = False, required: bool = True) -> Any:
    """An input file or directory (must exist)."""
    return _path("in", help, is_dir=is_dir, required=required, suffixes=())


def output_path(help: str, *suffixes: str, is_dir: bool = False, required: bool = True) -> Any:
    """An output, staged in a temporary sibling and moved into place after success."""
    return _path("out", help, is_dir=is_dir, required=required, suffixes=suffixes)


def state_path(help: str) -> Any:
    """A persisted working directory (checkpoints), written in place."""
    return _path("state", help, is_dir=True, required=True, suffixes=())


def argument(help: str, *, required: bool = True) -> Any:
    """A plain text input that is not a path (a model name or hub id)."""
    return _path("arg", help, is_dir=False, required=required, suffixes=())


def path_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a paths class."""
    return list(dataclasses.fields(cls))


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its params, its paths class and its library entry point."""

    name: str
    settings: tuple[str, ...]  # params keys it reads: sections ("select") or keys ("seed")
    paths: type
    run: Callable[[Any, Any], dict[str, Any]]
    help: str = ""
    inputs: tuple[str, ...] = ()  # params keys that name input files (preferences.dataset)
    # re-run under a launcher: (params, paths) -> command prefix, or None to run in-process
    launcher: Callable[[Any, Any], list[str] | None] | None = None

    def setting_keys(self, root: type[Section]) -> list[str]:
        """Every leaf params key (of the root model ``root``) the stage reads, sections expanded."""
        out: list[str] = []
        for entry in self.settings:
            found = field_at(root, entry)
            if found is None:
                raise KarmaError("not a params key", field=entry)
            sub = section_type(found[0].model_fields[found[1]].annotation)
            if sub is not None:
                out += [k for k, _ in iter_fields(sub, f"{entry}.")]
            else:
                out.append(entry)
        return out

    def tracked_keys(self, root: type[Section]) -> list[str]:
        """The keys that change the stage's outputs: what ``dvc.yaml`` lists under params."""
        out = []
        for key in self.setting_keys(root):
            found = field_at(root, key)
            assert found is not None, key
            if not is_operational(found[0].model_fields[found[1]]):
                out.append(key)
        return out


class SettingsView:
    """The settings a stage declared, and nothing else.

    ``view.select.ratio`` works when the stage declares ``select`` (or ``select.ratio``);
    reading an undeclared key raises: DVC tracks only declared keys, so an undeclared read
    would be a result that goes stale. ``limits`` (operational) is always readable.
    """

    def __init__(self, obj: Any, declared: frozenset[str], stage: str, prefix: str = "") -> None:
        self._obj, self._declared, self._stage, self._prefix = obj, declared, stage, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        fields = getattr(type(self._obj), "model_fields", {})
        if key in self._declared or key == "limits" or name not in fields:
            return getattr(self._obj, name)  # a declared key, or a method of the section
        if any(d.startswith(key + ".") for d in self._declared):
            return SettingsView(getattr(self._obj, name), self._declared, self._stage, key + ".")
        raise KarmaError(
            f"stage {self._stage!r} reads a setting it does not declare (add it to its "
            "Stage settings, so that DVC tracks it)", field=key,
        )  # fmt: skip


def settings_view(stage: Stage, params: Any) -> SettingsView:
    """``params`` as ``stage`` may read it: its declared sections and keys only."""
    return SettingsView(params, frozenset(stage.settings), stage.name)


def load_stage(ref: str) -> Stage:
    """``"karma.kinship.kinship:STAGE"`` -> the Stage object."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr or "STAGE")


# --------------------------------------------------------------------------- execution


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_paths(stage: Stage, params: Any, paths: Any, flag: Callable[[str], str]) -> None:
    """Inputs exist; outputs are apart from every input and from each other; kinds, suffixes."""
    values = {f.name: getattr(paths, f.name) for f in path_fields(stage.paths)}
    roles = {f.name: f.metadata for f in path_fields(stage.paths)}
    inputs = []
    for key in stage.inputs:  # params that name input files: only local paths are checked
        value: Any = params
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and Path(value).exists():
            inputs.append((key, Path(value).resolve()))
    for name, value in values.items():
        meta = roles[name]
        if value is None:
            if meta["role"] != "arg" and name in required_fields(stage.paths):
                raise KarmaError("missing path", field=flag(name))
            continue
        if meta["role"] == "in":
            p = Path(value)
            if p.is_symlink() and not p.exists():
                raise KarmaError("input is a dangling symlink", file=p, field=flag(name),
                                 value=os.readlink(p), expected="an existing target")  # fmt: skip
            if not p.exists():
                raise KarmaError("input not found", file=p, field=flag(name))
            if meta["is_dir"] != p.is_dir():
                kind = "a directory" if meta["is_dir"] else "a file"
                raise KarmaError(f"input is not {kind}", file=p, field=flag(name))
            inputs.append((name, p.resolve()))
    outputs: list[tuple[str, Path]] = []
    for name, value in values.items():
        meta = roles[name]
        if value is None or meta["role"] not in ("out", "state"):
            continue
        p = Path(value)
        out = p.resolve()
        for kind, taken, expected in (
            ("input", inputs, "an output path apart from every input"),
            ("output", outputs, "outputs apart from each other"),
        ):
            for other, path in taken:
                if _inside(out, path) or _inside(path, out):
                    raise KarmaError(
                        f"output path is (or holds, or lies inside) the {kind} {flag(other)}",
                        file=value,
                        field=flag(name),
                        expected=expected,
                    )
        outputs.append((name, out))
        suffixes = meta["suffixes"]
        if suffixes and p.suffix.lower() not in suffixes:
            raise KarmaError(
                "wrong output suffix",
                file=value,
                field=flag(name),
                value=p.suffix or "(none)",
                expected=" or ".join(suffixes),
            )
        if p.is_symlink() and (not p.exists() or meta["is_dir"]):
            what = "a dangling symlink" if not p.exists() else "a symlink to a directory"
            raise KarmaError(f"output is {what}", file=value, field=flag(name),
                             value=os.readlink(p), expected="a real path")  # fmt: skip
        if not meta["is_dir"] and p.is_dir():
            raise KarmaError("output is a directory", file=value, field=flag(name),
                             expected="a file path")  # fmt: skip
        if meta["is_dir"] and p.exists() and not p.is_dir():
            raise KarmaError("output is a file", file=value, field=flag(name),
                             expected="a directory path")  # fmt: skip


def required_fields(cls: type) -> set[str]:
    return {
        f.name
        for f in path_fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def relaunch_argv() -> list[str]:
    """This process's program and arguments, to run again under a launcher (``-m module`` when
    it was started as ``python -m module``: run as a script, a package module would put its
    own directory first on ``sys.path``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    return list(sys.argv)


def _die_with_parent() -> None:
    """In a launched child (Linux): receive SIGKILL when the stage process dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def die_with_launcher() -> None:
    """In a process torchrun started (Linux): die with the launcher. torchrun starts each worker
    in a session of its own, so a killed launcher would leave its workers running."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    _die_with_parent()
    if os.getppid() == 1:  # the launcher is already gone
        os._exit(1)


def run_launched(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher command; it dies with this process, and SIGTERM is passed on to it."""
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if linux else None)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, lambda sig, _f: proc.send_signal(sig))
    try:
        return proc.wait()
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:  # interrupted: let the launcher stop its workers
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def execute(stage: Stage, params: Any, paths: Any, *, flag: Callable[[str], str] = str) -> Any:
    """Check the paths, run the stage into temporary outputs, then commit them together.

    Returns the stage's metrics. Under a launcher (``train.launcher``), the same command is
    re-run under it instead (after the checks), its exit status is checked and None is returned
    (the launched main process reports the metrics). Launched processes all run the stage into
    the same temporary outputs; only the main process (``RANK`` 0) prepares and commits them
    (the stage synchronises its processes in between). Every reader applies ``params.limits``.
    """
    with use_limits(params.limits):
        return _execute(stage, params, paths, flag)


def _execute(stage: Stage, params: Any, paths: Any, flag: Callable[[str], str]) -> Any:
    params = settings_view(stage, params)
    if os.environ.get(LAUNCHED_ENV):
        die_with_launcher()
    check_paths(stage, params, paths, flag)
    staged: dict[str, Staged] = {}
    for f in path_fields(stage.paths):
        value = getattr(paths, f.name)
        if f.metadata["role"] == "out" and value is not None:
            staged[f.name] = Staged(Path(value), bool(f.metadata["is_dir"]), flag(f.name))
    main = is_main_process()
    if main:
        _os_errors(recover, list(staged.values()))
        for s in staged.values():
            _os_errors(check_destination, s)
    if stage.launcher is not None and not os.environ.get(LAUNCHED_ENV):
        prefix = stage.launcher(params, paths)
        if prefix:
            cmd = [*prefix, *relaunch_argv()]
            log.info("launching: %s", " ".join(cmd))
            rc = run_launched(cmd, {**os.environ, LAUNCHED_ENV: "1"})
            if rc != 0:
                raise KarmaError(f"launched command exited with code {rc}", value=cmd[0])
            return None
    created: list[Path] = []
    done = False
    try:
        if main:
            prepare(list(staged.values()), created)
        tmp_paths = dataclasses.replace(paths, **{k: s.tmp for k, s in staged.items()})
        metrics = _os_errors(stage.run, params, tmp_paths, staged=staged.values())
        if main:
            _os_errors(commit, list(staged.values()), stage.name)
        done = True
    finally:
        if main and not done and not any(s.journal.exists() for s in staged.values()):
            for s in staged.values():  # nothing committed: drop the temporaries
                with contextlib.suppress(OSError):
                    _remove(s.tmp)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        # a commit that failed half-way (journal written) is rolled forward by the next run
    return metrics


def _os_errors(fn: Callable[..., Any], *args: Any, staged: Any = ()) -> Any:
    """``fn(*args)``, an operating-system error (permissions, disk full) as one line.

    The file named is the output's own path, not its temporary sibling.
    """
    try:
        return fn(*args)
    except OSError as err:
        log.debug("operating-system error", exc_info=True)
        reason = err.strerror or short_reason(err)
        name = None if err.filename is None else str(err.filename)
        for s in staged:
            if name is not None and name.startswith(str(s.tmp)):
                name = str(s.final) + name[len(str(s.tmp)) :]
        raise KarmaError(f"cannot write or read: {reason}", file=name) from None


@dataclass(frozen=True)
class Staged:
    """An output with its temporary and set-aside siblings (fixed names: a rerun cleans up)."""

    final: Path
    is_dir: bool
    label: str = ""  # the flag that named it, for errors

    @property
    def tmp(self) -> Path:
        """``.<stem>.karma-tmp<suffix>``: the suffix stays last (writers choose by it)."""
        return self.final.with_name(f".{self.final.stem}{TMP_SUFFIX}{self.final.suffix}")

    @property
    def old(self) -> Path:
        return self.final.with_name(f".{self.final.stem}{OLD_SUFFIX}{self.final.suffix}")

    @property
    def journal(self) -> Path:
        """Commit journal: while it exists, a commit is under way (the next run finishes it)."""
        return self.final.with_name(f".{self.final.name}{JOURNAL_SUFFIX}")


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def check_destination(s: Staged) -> None:
    """A directory output may replace only what karma wrote there (or an empty directory).

    Recognised: the marker ``.written-by-karma`` (listing the files karma wrote: a directory that
    holds any other file is refused too), or an output that ``dvc.lock`` records (DVC replaces
    those itself on ``dvc repro``; its checkouts carry no marker since ``.dvcignore`` keeps the
    marker out of DVC's hashes).
    """
    final = s.final
    if not s.is_dir or not final.is_dir():
        return
    with os.scandir(final) as it:
        top = sorted(e.name for e in it)
    if not top:
        return
    written = _read_marker(final / MARKER) if MARKER in top else None
    if written is not None:
        extra = sorted(set(_files(final)) - written - {MARKER})
        if not extra:
            return
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise KarmaError(
            f"output directory holds {len(extra)} file(s) that karma did not write ({shown}); "
            "move them out or choose another directory",
            file=final,
            field=s.label or None,
        )
    if _dvc_owned(final):
        return
    shown = ", ".join(top[:3]) + (", ..." if len(top) > 3 else "")
    raise KarmaError(
        f"output directory exists and was not written by karma (no {MARKER}; holds {shown}); "
        "choose a new or empty directory, or remove this one",
        file=final,
        field=s.label or None,
    )


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()]


def _read_marker(path: Path) -> set[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(f) for f in data["files"]} if data.get("by") == "karma" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _dvc_owned(path: Path) -> bool:
    """Whether the nearest ``dvc.lock`` records ``path``, or every file in it, as stage outputs.

    The second case is a log directory such as ``dvclive/train`` whose ``plots/metrics`` the lock
    records (``cache: false`` plots, committed to git without a marker).
    """
    target = path.resolve()
    for root in target.parents:
        lock = root / "dvc.lock"
        if not lock.is_file():
            continue
        try:
            data = yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            stages = data.get("stages") or {}
            outs = {
                (root / str(o["path"])).resolve()
                for spec in stages.values()
                for o in (spec.get("outs") or [])
            }
        except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
            return False
        if target in outs:
            return True
        inside = [o for o in outs if target in o.parents]
        files = [p for p in target.rglob("*") if not p.is_dir()]
        return bool(inside) and all(any(o == f or o in f.parents for o in inside) for f in files)
    return False


def _mkdirs(path: Path, created: list[Path]) -> None:
    """Create ``path`` and its missing parents, outermost first, each appended to ``created``."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)


def recover(staged: list[Staged]) -> None:
    """Finish what a killed run left: roll its commit forward, drop its temporaries."""
    for s in staged:
        clean_stale(s.journal)
        if s.journal.exists():
            try:
                data = json.loads(s.journal.read_text(encoding="utf-8"))
                base = s.journal.parent
                entries = [Staged(base / e["final"], bool(e["is_dir"])) for e in data["entries"]]
            except (ValueError, KeyError, TypeError) as err:
                raise KarmaError(
                    f"unreadable commit journal of a killed run ({short_reason(err)})",
                    file=s.journal,
                    expected="remove it and rerun",
                ) from None
            log.warning("finishing the commit of a killed run (%s)", s.journal)
            _roll_forward(entries)
            s.journal.unlink()
    for s in staged:
        if _exists(s.old):
            if _exists(s.final):
                _remove(s.old)
            else:  # killed between two renames by an earlier version: restore the old output
                s.old.rename(s.final)
        _remove(s.tmp)


def prepare(staged: list[Staged], created: list[Path]) -> None:
    """Make the empty temporary outputs (checked writable); ``created``: directories made."""
    for s in staged:
        try:
            _mkdirs(s.final.parent, created)
            _remove(s.tmp)
            if s.is_dir:
                s.tmp.mkdir()
            else:  # probe: a read-only destination fails here, before the stage runs
                os.close(os.open(s.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                s.tmp.unlink()
        except OSError as err:
            reason = err.strerror or short_reason(err)
            raise KarmaError(f"cannot write the output here: {reason}", file=s.final,
                             field=s.label or None) from None  # fmt: skip


def commit(staged: list[Staged], name: str) -> None:
    """Move every staged output into place, all or none even when killed.

    A journal listing the outputs is written first; then each new output goes in (a directory:
    the old one renamed aside, the new one renamed in; a file: one atomic replace), the old
    ones are removed and the journal last. A run killed in between leaves the old or the new
    output whole; the next run finds the journal and rolls the commit forward (:func:`recover`).
    """
    for s in staged:
        if not s.tmp.exists():
            raise KarmaError(f"stage {name!r} did not write this output", file=s.final)
    if not staged:
        return
    for s in staged:
        if s.is_dir:
            marker = {"by": "karma", "stage": name, "files": sorted(_files(s.tmp))}
            (s.tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        os.chmod(s.tmp, 0o755 if s.is_dir else 0o644)
    journal = staged[0].journal
    base = journal.parent
    entries = [{"final": os.path.relpath(s.final, base), "is_dir": s.is_dir} for s in staged]
    with atomic_file(journal) as tmp:
        tmp.write_text(json.dumps({"stage": name, "entries": entries}, indent=1) + "\n")
    _roll_forward(staged)
    journal.unlink()


def _roll_forward(staged: list[Staged]) -> None:
    for s in staged:
        if not _exists(s.tmp):  # already in place
            continue
        if not s.is_dir:
            os.replace(s.tmp, s.final)
            continue
        if _exists(s.final):
            _remove(s.old)
            s.final.rename(s.old)
        s.tmp.rename(s.final)
    for s in staged:
        if _exists(s.old):
            if _exists(s.final):
                _remove(s.old)
            else:  # its new output vanished: never lose the old one
                s.old.rename(s.final)
