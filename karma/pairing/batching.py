"""Reading a large input in bounded batches: Parquet in slices of whole row groups, decoded
by polars, and a read-ahead thread (:func:`prefetch`) so that decoding overlaps the caller's
work."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl

#: Columns read from a Parquet file (others, such as annotations, are never loaded).
COLUMNS = ("source", "instruction", "completions")


def count_records(source: str | Path) -> int | None:
    """The number of records of a local Parquet file (from its footer), else None."""
    path = Path(source)
    if not (path.is_file() and path.suffix.lower() in (".parquet", ".pq")):
        return None
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # the reader reports a broken file
        return None


def prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """The items of ``items``, produced ``depth`` ahead in a background thread (so that reading
    and decoding, which release the GIL, overlap the caller's work); order and errors are
    those of ``items``."""
    import contextvars
    import queue
    import threading

    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((False, None))
        except BaseException as err:  # handed to the consumer, raised there
            q.put((False, err))

    context = (
        contextvars.copy_context()
    )  # the stage's limits (karma.core.io.use_limits) apply there
    thread = threading.Thread(target=context.run, args=(produce,), name="karma-prefetch",
                              daemon=True)  # fmt: skip
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()


def row_group_batches(sizes: Sequence[int], batch_records: int) -> list[tuple[int, int]] | None:
    """``(offset, rows)`` slices of whole consecutive row groups of at most ``batch_records``
    rows each; None when a row group alone is larger (then it would not bound memory)."""
    if any(n > batch_records for n in sizes):
        return None
    out: list[tuple[int, int]] = []
    start = rows = 0
    for n in sizes:
        if rows and rows + n > batch_records:
            out.append((start, rows))
            start, rows = start + rows, 0
        rows += n
    if rows:
        out.append((start, rows))
    return out


def parquet_frames(pf: Any, path: Path, batch_records: int) -> Iterator[pl.DataFrame]:
    """The :data:`COLUMNS` of an open ``pyarrow.parquet.ParquetFile`` in frames of at most
    ``batch_records`` rows: decoded by polars in slices of whole row groups (a quarter of the
    CPU of pyarrow's record batches for nested columns), or as pyarrow's record batches when a
    row group alone is larger than a batch."""
    columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
    meta = pf.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    slices = row_group_batches(sizes, batch_records)
    if slices is None:
        for batch in pf.iter_batches(batch_size=batch_records, columns=columns):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            yield frame
        return
    lazy = pl.scan_parquet(path).select(columns)
    for offset, rows in slices:
        yield lazy.slice(offset, rows).collect()
