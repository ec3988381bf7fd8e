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
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karma.core import distributed
from karma.core.errors import KarmaError
from karma.core.io import use_limits
from karma.core.settings import Section, field_at, is_operational, iter_fields, section_type
from karma.core.staging import (
    TEMP_NAME,
    TOKEN_ENV,
    Staged,
    check_destination,
    commit,
    disk_reason,
    output_locks,
    prepare,
    recover,
    remove,
    run_token,
)

log = logging.getLogger(__name__)

LAUNCHED_ENV = "KARMA_LAUNCHED"
ROLE_NAMES = {"in": "input", "arg": "input", "out": "output", "state": "persisted state"}


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
    # a process that ran only this stage may end without the interpreter's teardown (closing
    # Numba's, polars' and pyarrow's state: ~0.4 s) once its outputs are in place
    exit_fast: bool = False

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
    """Rank 0 of a launched stage, or no launcher (:func:`karma.core.distributed.is_main`)."""
    return distributed.is_main()


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
        if value is not None and TEMP_NAME.search(Path(str(value)).name):
            _check_name(str(value), key, "in")
        if value is not None and Path(value).exists():
            inputs.append((key, Path(value).resolve()))
    for name, value in values.items():
        meta = roles[name]
        if value is None:
            if meta["role"] != "arg" and name in required_fields(stage.paths):
                raise KarmaError("missing path", field=flag(name))
            continue
        _check_name(str(value), flag(name), meta["role"])
        if meta["role"] == "in":
            p = Path(value)
            if p.is_symlink() and not p.exists():
                raise KarmaError("input is a dangling symlink", file=p, field=flag(name),
                                 value=os.readlink(p), expected="an existing target")  # fmt: skip
            if not p.exists():
                raise KarmaError("input not found", file=p, field=flag(name))
            _check_kind(p, flag(name))
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


def _check_name(value: str, label: str, role: str) -> None:
    """A path that is not empty, whose parts fit the file system, not named like a temporary."""
    if role == "arg":
        return
    if not value.strip():
        raise KarmaError("empty path", field=label, expected="a file or directory path")
    for part in Path(value).parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > 255:
            raise KarmaError(f"a path component of {size} bytes, longer than the file system "
                             "allows (255)", file=value[:60] + "...", field=label)  # fmt: skip
    if len(value.encode("utf-8", "surrogateescape")) > 4000:
        raise KarmaError("path longer than the file system allows (4096 bytes)",
                         file=value[:60] + "...", field=label)  # fmt: skip
    if role == "in" and any(TEMP_NAME.search(part) for part in Path(value).parts):
        raise KarmaError("input is named like a karma temporary (.karma-tmp, .karma-old, "
                         ".karma-journal, .karma-lock), which a run may remove; rename it",
                         file=value, field=label)  # fmt: skip


def _check_kind(p: Path, label: str) -> None:
    """An input is a regular file or a directory (not a FIFO, socket or device)."""
    mode = p.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device")  # fmt: skip
    raise KarmaError(f"input is {kind}, not a regular file", file=p, field=label)


def required_fields(cls: type) -> set[str]:
    return {
        f.name
        for f in path_fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


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
    launched = bool(os.environ.get(LAUNCHED_ENV))
    if launched:
        die_with_launcher()
    check_paths(stage, params, paths, flag)
    token = run_token()
    staged: dict[str, Staged] = {}
    locked: list[Staged] = []  # outputs and persisted state: one writer at a time
    for f in path_fields(stage.paths):
        value = getattr(paths, f.name)
        if f.metadata["role"] in ("out", "state") and value is not None:
            s = Staged(_followed(Path(value), f.metadata), bool(f.metadata["is_dir"]),
                       flag(f.name), token)  # fmt: skip
            locked.append(s)
            if f.metadata["role"] == "out":
                staged[f.name] = s
    main = is_main_process()
    created: list[Path] = []
    done = False
    # the launching process holds the locks for the processes it launches
    locks = output_locks(locked, created) if main and not launched else contextlib.nullcontext()
    try:
        with locks:
            if main:
                _os_errors(recover, list(staged.values()))
                for s in staged.values():
                    _os_errors(check_destination, s, stage.name)
            if stage.launcher is not None and not launched:
                prefix = stage.launcher(params, paths)
                if prefix:
                    cmd = [*prefix, *relaunch_argv()]
                    log.info("launching: %s", " ".join(cmd))
                    rc = run_launched(cmd, {**os.environ, LAUNCHED_ENV: "1", TOKEN_ENV: token})
                    if rc != 0:
                        raise KarmaError(f"launched command exited with code {rc}", value=cmd[0])
                    done = True
                    return None
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
                    remove(s.tmp)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        # a commit that failed half-way (journal written) is rolled forward by the next run
    return metrics


def _followed(p: Path, meta: Any) -> Path:
    """An output path, a symlink to a file followed (a link is never replaced by a file)."""
    if not meta["is_dir"] and p.is_symlink() and p.is_file():
        target = p.resolve()
        if ".dvc" in target.parts and "cache" in target.parts:
            raise KarmaError("output is a link into the DVC cache", file=p,
                             expected="`dvc unprotect` it or remove it first")  # fmt: skip
        return target
    return p


def _os_errors(fn: Callable[..., Any], *args: Any, staged: Any = ()) -> Any:
    """``fn(*args)``, an operating-system error (permissions, disk full) as one line.

    The file named is the output's own path, not its temporary sibling; an error that names no
    file (a full disk while a library writes) names the outputs being written.
    """
    try:
        return fn(*args)
    except OSError as err:
        log.debug("operating-system error", exc_info=True)
        staged = list(staged)
        name = None if err.filename is None else str(err.filename)
        for s in staged:
            if name is not None and name.startswith(str(s.tmp)):
                name = str(s.final) + name[len(str(s.tmp)) :]
        if name is None and staged:
            name = ", ".join(str(s.final) for s in staged)
        raise KarmaError(f"cannot write or read: {disk_reason(err)}", file=name) from None
