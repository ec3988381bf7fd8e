"""Shared file mechanics: one cache root, one content digest, atomic single-file writes, and
the input limits every reader applies.

Stage outputs as a whole are staged and committed by :mod:`karma.core.stage`; the helpers here
are for the small files written outside a stage (caches) and for deterministic JSON.

Limits (``params.limits``, :class:`karma.params.LimitsConfig`) are set for the duration of a
stage by :func:`karma.core.stage.execute` (:func:`use_limits`); readers ask :func:`limits`
(the defaults outside a stage) and fail with :func:`limit_error`, one line that names the file,
the limit and how to raise it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from karma.core.errors import MAX_INT_DIGITS, KarmaError, shorten
from karma.core.settings import limits, use_limits  # noqa: F401  (re-exported)

#: The one environment variable that moves every karma cache (wheels, NLTK data, lm-eval
#: responses, MAP margins).
CACHE_ENV = "KARMA_CACHE_DIR"
#: The file a directory output carries: it was written by karma (see karma.core.stage). Kept out
#: of content digests here and out of DVC's directory hashes by ``.dvcignore``.
MARKER = ".written-by-karma"
#: ``atomic_file``'s temporaries: ``.<name>.<pid>.karma-tmp`` (a later write removes dead ones)
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.karma-tmp$")


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
    files = [f for f in files if f == p or f.relative_to(p).as_posix() != MARKER]
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


def _record(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return cache_root("written", key[:2], key)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def record_written(path: str | os.PathLike[str]) -> None:
    """Remember that karma wrote this file with these bytes (in the cache; best effort).

    The record keeps the digests of the last 100 versions written there, so that a restored
    earlier output (a backup, a ``git checkout``) is still recognised.
    """
    p = Path(path)
    with contextlib.suppress(OSError, ValueError):
        digests = [d for d in _digests(p) if isinstance(d, str)]
        digest = _file_digest(p)
        digests = [*(d for d in digests if d != digest), digest][-100:]
        with atomic_file(_record(p)) as tmp:
            tmp.write_text(json.dumps({"path": str(p.resolve()), "sha256": digests}))


def _digests(p: Path) -> list[Any]:
    try:
        data = json.loads(_record(p).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("path") != str(p.resolve()):
        return []
    digests = data.get("sha256") or []
    return [digests] if isinstance(digests, str) else list(digests)


def was_written(path: str | os.PathLike[str]) -> bool:
    """Whether karma wrote this file as it is now (a file the user changed since: no)."""
    p = Path(path)
    try:
        return _file_digest(p) in _digests(p)
    except (OSError, TypeError):
        return False


def _stat(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it into place, else remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.karma-tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` that killed processes left (their pid is gone)."""
    removed = []
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            m = _TMP.match(p.name)
            if m and m["name"] == target.name and not _alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BoundError(ValueError):
    """An input past a parsing bound (duplicate key, huge integer, lone surrogate)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BoundError(f"duplicate key {shorten(key)}")
    return data


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BoundError(f"an integer of {len(text)} digits, more than {MAX_INT_DIGITS}")
    return int(text)


def lone_surrogate(data: Any, depth: int = 0) -> str | None:
    """The first string (or key) of ``data`` holding a lone UTF-16 surrogate, or None."""
    if isinstance(data, str):
        return data if any("\ud800" <= c <= "\udfff" for c in data) else None
    if isinstance(data, dict):
        items: Any = [*data.keys(), *data.values()]
    elif isinstance(data, (list, tuple)):
        items = data
    else:
        return None
    return next((bad for x in items if (bad := lone_surrogate(x, depth + 1)) is not None), None)


def parse_json(text: str, file: object, where: str = "") -> Any:
    """``json.loads`` within bounds: a duplicate key, an integer of more than 40 digits, nesting
    past Python's recursion limit or a lone surrogate (``"\\ud800"``) is one line naming
    ``file`` and ``where`` (``"line 3: "``). A syntax error is raised as ``JSONDecodeError``."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except RecursionError:
        raise KarmaError(f"{where}JSON nested too deeply (more than about 1000 levels)",
                         file=file) from None  # fmt: skip
    except BoundError as err:
        raise KarmaError(f"{where}not accepted JSON: {err}", file=file) from None
    if _SURROGATE_ESCAPE.search(text):
        bad = lone_surrogate(data)
        if bad is not None:
            raise KarmaError(f"{where}a string holds a lone surrogate (not valid Unicode)",
                             file=file, value=bad[:40])  # fmt: skip
    return data


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``, with one-line errors naming the file."""
    p = Path(path)
    try:
        data = parse_json(p.read_text(encoding="utf-8"), p)
    except FileNotFoundError:
        raise KarmaError("file not found", file=p) from None
    except (OSError, UnicodeDecodeError) as err:
        raise KarmaError(f"cannot read: {type(err).__name__}", file=p) from None
    except json.JSONDecodeError as err:
        raise KarmaError(f"not valid JSON: {err.msg} (line {err.lineno})", file=p) from None
    if not isinstance(data, dict):
        raise KarmaError("not a JSON object", file=p, value=type(data).__name__)
    return data


# --------------------------------------------------------------------------- input limits


def limit_error(file: object, text: str, key: str) -> KarmaError:
    """``file: <text> limits.<key> = N (raise it with -S limits.<key>=N or in params.yaml)``.

    >>> str(limit_error("t.csv", "line 1 is longer than", "max_line_bytes"))  # doctest: +ELLIPSIS
    't.csv: line 1 is longer than limits.max_line_bytes = 16777216 (raise it with -S ...)'
    """
    limit = getattr(limits(), key)
    return KarmaError(
        f"{text} limits.{key} = {limit} (raise it with -S limits.{key}=N or in params.yaml)",
        file=file,
    )


def check_size(path: Path, key: str = "max_file_bytes", what: str = "file") -> None:
    """Refuse a file larger than ``limits.<key>`` before reading it whole."""
    size = path.stat().st_size
    if size > getattr(limits(), key):
        raise limit_error(path, f"{what} is {size} bytes, more than", key)


def text_lines(path: Path, *, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file, each line at most ``limits.max_line_bytes``.

    Reads with bounded memory (a file that is one 50 MB line is refused after reading the cap),
    and names the line of a byte that is not ``encoding``. A UTF-8 byte-order mark is dropped.
    """
    cap = limits().max_line_bytes
    with path.open("rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(cap + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > cap and not (len(raw) == cap + 1 and raw.endswith(b"\n")):
                raise limit_error(path, f"line {lineno} is longer than", "max_line_bytes")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise KarmaError(
                    f"line {lineno}: not {encoding.upper()} text (byte {raw[err.start]:#04x} at "
                    f"column {len(raw[: err.start].decode(encoding, 'replace')) + 1})",
                    file=path,
                ) from None


def read_parquet(path: str | os.PathLike[str], what: str = "Parquet file") -> Any:
    """A polars frame from a Parquet file; one line naming the file for a broken one."""
    import polars as pl

    p = Path(path)
    try:
        return pl.read_parquet(p)
    except FileNotFoundError:
        raise KarmaError(f"{what} not found", file=p) from None
    except IsADirectoryError:
        raise KarmaError(f"{what} is a directory", file=p, expected="a .parquet file") from None
    except Exception as err:  # polars raises several error types for broken files
        raise KarmaError(f"not a readable {what}: {short_reason(err)}", file=p) from None


def short_reason(err: BaseException, width: int = 120) -> str:
    """The first line of an error message, at most ``width`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def check_record_bytes(frame: Any, file: object, what: str = "record") -> None:
    """Refuse a frame one of whose rows holds more text than ``limits.max_record_bytes``.

    Counts the UTF-8 bytes of every string in the row, nested lists and structs included
    (the messages of a preference pair, the responses of a completions record).
    """
    import polars as pl

    terms = [_text_bytes(pl.col(name), dtype) for name, dtype in frame.schema.items()]
    terms = [t for t in terms if t is not None]
    if not terms or frame.height == 0:
        return
    sizes = frame.select(pl.sum_horizontal(terms).alias("n")).to_series()
    cap = limits().max_record_bytes
    if sizes.max() > cap:
        index = int((sizes > cap).arg_max())  # the first one
        text = f"{what} {index} holds {sizes[index]} bytes of text, more than"
        raise limit_error(file, text, "max_record_bytes")


def _text_bytes(expr: Any, dtype: Any) -> Any:
    import polars as pl

    if dtype == pl.String:
        return expr.str.len_bytes().fill_null(0).cast(pl.Int64)
    if isinstance(dtype, pl.List):
        inner = _text_bytes(pl.element(), dtype.inner)
        return None if inner is None else expr.list.eval(inner).list.sum().fill_null(0)
    if isinstance(dtype, pl.Struct):
        parts = [_text_bytes(expr.struct.field(f.name), f.dtype) for f in dtype.fields]
        parts = [p for p in parts if p is not None]
        return pl.sum_horizontal(parts) if parts else None
    return None
