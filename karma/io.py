"""Shared file mechanics: one cache root, one content digest, atomic single-file writes.

Stage outputs as a whole are staged and committed by :mod:`karma.pipeline`; the helpers here
are for the small files written outside a stage (caches) and for deterministic JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from karma.errors import KarmaError

#: The one environment variable that moves every karma cache (wheels, NLTK data, lm-eval
#: responses, MAP margins).
CACHE_ENV = "KARMA_CACHE_DIR"


def cache_root(*parts: str) -> Path:
    """``$KARMA_CACHE_DIR`` (else ``$XDG_CACHE_HOME/karma``, else ``~/.cache/karma``) / parts."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "karma"
    )
    return Path(root, *parts)


def tree_digest(path: str | os.PathLike[str], *, memo: bool = False) -> str:
    """SHA-256 of a file, or of a directory's files (relative names + contents, sorted).

    With ``memo`` the digest is remembered under the files' stat signature (names, sizes,
    mtimes, inodes) in the cache, as DVC's state database does: a model directory is read once
    per change, not on every run.
    """
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    entry = None
    if memo:
        stats = [(f.relative_to(p).as_posix() if p.is_dir() else "", *_stat(f)) for f in files]
        sig = hashlib.sha256(json.dumps([str(p.resolve()), stats]).encode()).hexdigest()
        entry = cache_root("digests", sig[:2], sig)
        with contextlib.suppress(OSError):
            return entry.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if entry is not None:
        with contextlib.suppress(OSError), atomic_file(entry) as tmp:
            tmp.write_text(digest)
    return digest


def _stat(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it into place, else remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def dumps_json(data: Any) -> str:
    """Stable, sorted, indented JSON (byte-identical for equal data)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as stable JSON, creating the parent directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps_json(data))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text, creating the parent directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``, with one-line errors naming the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KarmaError("file not found", file=p) from None
    except (OSError, UnicodeDecodeError) as err:
        raise KarmaError(f"cannot read: {type(err).__name__}", file=p) from None
    except json.JSONDecodeError as err:
        raise KarmaError(f"not valid JSON: {err.msg} (line {err.lineno})", file=p) from None
    if not isinstance(data, dict):
        raise KarmaError("not a JSON object", file=p, value=type(data).__name__)
    return data
