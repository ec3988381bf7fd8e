"""How a stage's outputs are written: one writer at a time, staged, committed all or none.

* :func:`output_locks`: an OS lock (``flock``) per output, ``.<name>.karma-lock`` beside it, taken
  before anything is recovered, checked or staged. A second run on the same output fails at once
  in one line naming the pid that holds it. The kernel drops the lock of a killed run; the lock
  file is removed by whoever holds it last.
* :class:`Staged`: an output and its temporary and set-aside siblings, named uniquely per run
  (``.<stem>.karma-tmp-<token><suffix>``), so two runs never share a temporary.
* :func:`check_destination`: an existing output is replaced only when this stage wrote it (the
  directory marker, karma's record of the files it wrote, or ``dvc.lock`` naming this stage).
* :func:`recover`, :func:`prepare`, :func:`commit`: roll a killed commit forward, make the
  temporaries, move them all into place through a journal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from karma.core.errors import KarmaError
from karma.core.io import (
    MARKER,
    atomic_file,
    clean_stale,
    record_written,
    short_reason,
    was_written,
)

log = logging.getLogger(__name__)

TMP_SUFFIX = ".karma-tmp"
OLD_SUFFIX = ".karma-old"
JOURNAL_SUFFIX = ".karma-journal"
LOCK_SUFFIX = ".karma-lock"
#: The run token shared by the processes of one launched run (set by the launching process).
TOKEN_ENV = "KARMA_STAGING_TOKEN"
#: Any name karma uses for its temporaries: an input may not look like one.
TEMP_NAME = re.compile(r"\.karma-(tmp|old|journal|lock)")


def run_token() -> str:
    """This run's staging token: inherited by launched processes, else new (pid + random)."""
    token = os.environ.get(TOKEN_ENV)
    if token and re.fullmatch(r"[0-9a-z-]{1,40}", token):
        return token
    if "RANK" in os.environ:  # ranks started by someone else: one name they all derive
        seed = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT") or "0"
        return "rank-" + re.sub(r"[^0-9a-z]", "", seed.lower())[:16]
    return f"{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Staged:
    """An output with its temporary and set-aside siblings, named by the run's ``token``."""

    final: Path
    is_dir: bool
    label: str = ""  # the flag that named it, for errors
    token: str = ""

    def _sibling(self, kind: str) -> Path:
        tag = f"-{self.token}" if self.token else ""
        return self.final.with_name(f".{self.final.stem}{kind}{tag}{self.final.suffix}")

    @property
    def tmp(self) -> Path:
        """``.<stem>.karma-tmp-<token><suffix>``: the suffix stays last (writers choose by it)."""
        return self._sibling(TMP_SUFFIX)

    @property
    def old(self) -> Path:
        return self._sibling(OLD_SUFFIX)

    @property
    def journal(self) -> Path:
        """Commit journal: while it exists, a commit is under way (the next run finishes it)."""
        return self.final.with_name(f".{self.final.name}{JOURNAL_SUFFIX}")

    @property
    def lock(self) -> Path:
        return self.final.with_name(f".{self.final.name}{LOCK_SUFFIX}")

    def leftovers(self) -> list[Path]:
        """Temporaries and set-aside copies of this output left by any run (none is running)."""
        pattern = re.compile(
            rf"^\.{re.escape(self.final.stem)}\.karma-(tmp|old)(-[0-9a-z-]+)?"
            rf"{re.escape(self.final.suffix)}$"
        )
        with contextlib.suppress(OSError), os.scandir(self.final.parent) as it:
            return sorted(self.final.parent / e.name for e in it if pattern.match(e.name))
        return []


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def remove(path: Path) -> None:
    """Remove a file, a link or a directory tree (a link is never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


# --------------------------------------------------------------------------- locks


def mkdirs(path: Path, created: list[Path]) -> None:
    """Create ``path`` and its missing parents, outermost first, each appended to ``created``."""
    missing = []
    p = path
    while not _exists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid right after locking
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.005)
    return "?"


def _acquire(s: Staged) -> int:
    """Lock ``s`` (a descriptor of its lock file), or one line naming the pid that holds it."""
    while True:
        fd = os.open(s.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise KarmaError(
                f"another karma run (pid {pid}) is writing this output; wait for it to finish "
                "or choose another path",
                file=s.final,
                field=s.label or None,
            ) from None
        try:  # the holder before us may have removed the file: lock the one on disk
            same = os.path.samestat(os.fstat(fd), os.stat(s.lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_locks(staged: list[Staged], created: list[Path]) -> Iterator[None]:
    """Hold the lock of every output (sorted, so two runs never wait on each other)."""
    held: list[tuple[Staged, int]] = []
    try:
        for s in sorted(staged, key=lambda s: str(s.final)):
            try:
                mkdirs(s.final.parent, created)
                held.append((s, _acquire(s)))
            except OSError as err:
                raise KarmaError(f"cannot write the output here: {err.strerror or err}",
                                 file=s.final, field=s.label or None) from None  # fmt: skip
        yield
    finally:
        for s, fd in reversed(held):
            with contextlib.suppress(OSError):
                s.lock.unlink()  # while still held: a waiting run retries on the new file
            os.close(fd)


# --------------------------------------------------------------------------- ownership


def check_destination(s: Staged, stage: str) -> None:
    """Refuse to replace an existing output that this stage did not write.

    A directory: empty, or its marker ``.written-by-karma`` names this stage and lists every file
    in it, or ``dvc.lock`` records it (or every file in it) as an output of this stage. A file:
    karma's record says it wrote these very bytes, or ``dvc.lock`` assigns it to this stage.
    """
    final = s.final
    if not _exists(final):
        return
    if not s.is_dir:
        if not final.is_file():
            raise KarmaError("output exists and is not a regular file", file=final,
                             field=s.label or None, expected="a file path")  # fmt: skip
        if was_written(final) or dvc_owner(final, stage) == "this":
            return
        raise KarmaError(
            f"output file exists and was not written by karma (no record of it, and dvc.lock "
            f"does not assign it to stage {stage!r}); move it away or choose another path",
            file=final,
            field=s.label or None,
        )
    with os.scandir(final) as it:
        top = sorted(e.name for e in it)
    if not top:
        return
    marker = read_marker(final / MARKER) if MARKER in top else None
    if marker is not None:
        written, by = marker
        if by not in (None, stage):
            raise KarmaError(
                f"output directory was written by karma stage {by!r}, not {stage!r}; "
                "choose another directory",
                file=final,
                field=s.label or None,
            )
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
    owner = dvc_owner(final, stage)
    if owner == "this":
        return
    if owner:
        raise KarmaError(
            f"output directory holds the outputs of DVC stage {owner!r} (dvc.lock), not of "
            f"{stage!r}; choose another directory",
            file=final,
            field=s.label or None,
        )
    shown = ", ".join(top[:3]) + (", ..." if len(top) > 3 else "")
    raise KarmaError(
        f"output directory exists and was not written by karma (no {MARKER}; holds {shown}); "
        "choose a new or empty directory, or remove this one",
        file=final,
        field=s.label or None,
    )


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()]


def read_marker(path: Path) -> tuple[set[str], str | None] | None:
    """``(files, stage)`` of a directory marker, or None when it is not karma's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("by") != "karma":
            return None
        return {str(f) for f in data["files"]}, data.get("stage")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _same_stage(lock_name: str, stage: str) -> bool:
    """Whether the dvc.lock stage ``lock_name`` is a run of ``stage`` (``DVC_STAGE`` when set)."""
    running = os.environ.get("DVC_STAGE")
    if running:
        return lock_name == running
    base = lock_name.partition("@")[0]
    return base == stage or base.startswith(stage + "_")  # evaluate_base: the evaluate stage


def _lock_outs(root: Path) -> list[tuple[str, Path]] | None:
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load((root / "dvc.lock").read_text(), Loader=loader)
        stages = data.get("stages") or {}
        return [
            (str(name), (root / str(o["path"])).resolve())
            for name, spec in stages.items()
            for o in (spec.get("outs") or [])
        ]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None


def dvc_owner(path: Path, stage: str) -> str | None:
    """``"this"`` when the nearest ``dvc.lock`` records ``path`` (or every file in it) as an
    output of ``stage``; the other stage's name when it records it for another; else None.

    The second case is a log directory such as ``dvclive/train`` whose ``plots/metrics`` the lock
    records (``cache: false`` plots, committed to git without a marker).
    """
    target = path.resolve()
    for root in target.parents:
        if not (root / "dvc.lock").is_file():
            continue
        outs = _lock_outs(root)
        if outs is None:
            return None
        owners = {name for name, out in outs if out == target}
        if not owners and target.is_dir():
            inside = [(n, o) for n, o in outs if target in o.parents]
            files = [p for p in target.rglob("*") if not p.is_dir()]
            covered = inside and all(any(o == f or o in f.parents for _, o in inside)
                                     for f in files)  # fmt: skip
            owners = {n for n, _ in inside} if covered else set()
        if not owners:
            return None
        mine = all(_same_stage(n, stage) for n in owners)
        return "this" if mine else sorted(n for n in owners if not _same_stage(n, stage))[0]
    return None


# --------------------------------------------------------------------------- commit


def recover(staged: list[Staged]) -> None:
    """Finish what a killed run left: roll its commit forward, drop its temporaries.

    Called with every output locked: any temporary of these outputs is a dead run's.
    """
    for s in staged:
        clean_stale(s.journal)
        if s.journal.exists():
            try:
                data = json.loads(s.journal.read_text(encoding="utf-8"))
                base = s.journal.parent
                entries = [Staged(base / e["final"], bool(e["is_dir"]), token=e.get("token", ""))
                           for e in data["entries"]]  # fmt: skip
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise KarmaError(
                    f"unreadable commit journal of a killed run ({short_reason(err)})",
                    file=s.journal,
                    expected="remove it and rerun",
                ) from None
            log.warning("finishing the commit of a killed run (%s)", s.journal)
            _roll_forward(entries)
            s.journal.unlink()
    for s in staged:
        for p in s.leftovers():
            if OLD_SUFFIX in p.name and not _exists(s.final):
                p.rename(s.final)  # killed between two renames: restore the old output
            else:
                remove(p)


def prepare(staged: list[Staged], created: list[Path]) -> None:
    """Make the empty temporary outputs (checked writable); ``created``: directories made."""
    for s in staged:
        try:
            mkdirs(s.final.parent, created)
            remove(s.tmp)
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
    entries = [{"final": os.path.relpath(s.final, base), "is_dir": s.is_dir, "token": s.token}
               for s in staged]  # fmt: skip
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
            record_written(s.final)
            continue
        if _exists(s.final):
            remove(s.old)
            s.final.rename(s.old)
        s.tmp.rename(s.final)
    for s in staged:
        if _exists(s.old):
            if _exists(s.final):
                remove(s.old)
            else:  # its new output vanished: never lose the old one
                s.old.rename(s.final)


def disk_reason(err: OSError) -> str:
    """The reason of an OS error, with what to do for a full disk or a file-size limit."""
    reason = err.strerror or short_reason(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free space on that disk, or raise the file-size limit: ulimit -f)"
    return reason
