"""Parquet writers whose bytes depend only on the rows: fixed row groups, snappy, no statistics.

:func:`write_table` is the one way this package writes a Parquet table (the fetch stage's
records too); :class:`SplitWriter` writes ``train_prefs`` / ``test_prefs`` / ``dev_prefs`` batch
by batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from karma.pairing.layouts import (
    SPLITS,
    arrow_bool,
    arrow_schema,
    flat_from_trl,
    layout_of,
    layout_table,
)

if TYPE_CHECKING:
    from karma.pairing.stream import PreferenceResult

#: Codec of the pairs files: fast to write and read, what ``datasets`` itself writes.
PARQUET_COMPRESSION = "snappy"
#: Rows per Parquet row group (fixed, so that the bytes do not depend on how data was batched).
ROW_GROUP = 65_536


class RowGroupWriter:
    """A Parquet file written table by table in row groups of exactly :data:`ROW_GROUP` rows
    (the last one shorter), each from one contiguous array: the bytes depend only on the rows,
    not on how they were batched (the streaming and the in-memory path write the same file)."""

    def __init__(self, path: str | Path, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.writer = pq.ParquetWriter(
            str(path), schema, compression=PARQUET_COMPRESSION, write_statistics=False
        )
        self.pending: list[Any] = []
        self.rows = 0

    def write(self, table: Any) -> None:
        if table.num_rows:
            self.pending.append(table.cast(self.schema))
            self.rows += table.num_rows
        while self.rows >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.writer.write_table(table.slice(0, n).combine_chunks(), row_group_size=ROW_GROUP)
        rest = table.slice(n)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
        self.writer.close()


def write_table(table: Any, path: str | Path) -> None:
    """Write an Arrow table as Parquet (:class:`RowGroupWriter`: fixed row groups, snappy,
    no statistics)."""
    writer = RowGroupWriter(path, table.schema)
    writer.write(table)
    writer.close()


class SplitWriter:
    """``train_prefs``, ``test_prefs`` and ``dev_prefs`` (``.parquet``) in ``layout``, written
    batch by batch (a split without pairs is an empty file with the layout's schema)."""

    def __init__(self, out_dir: str | Path, layout: str = "trl", *, background: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        schema = arrow_schema(layout)
        self.files = {s: RowGroupWriter(out / f"{s}.parquet", schema) for s in SPLITS}
        # one background thread converts and writes (pyarrow releases the GIL), one batch at a
        # time, in order: the caller pairs the next batch meanwhile
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: Any = None

    def _write(self, flat: Any, codes: np.ndarray) -> None:
        for code, name in enumerate(SPLITS):
            part = flat.filter(arrow_bool(codes == code))
            if part.num_rows:
                self.files[name].write(layout_of(part, self.layout))

    def write(self, flat: Any, codes: np.ndarray) -> None:
        """Write a flat pairs table (``stream.flat_pairs``), each pair to its split (``codes``:
        :func:`~karma.pairing.split.split_codes`)."""
        if self.pool is None:
            self._write(flat, codes)
            return
        if self.pending is not None:
            self.pending.result()  # at most one batch in flight; its errors surface here
        self.pending = self.pool.submit(self._write, flat, codes)

    def close(self) -> None:
        try:
            if self.pending is not None:
                self.pending.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            for f in self.files.values():
                f.close()


def write_splits(result: PreferenceResult, out_dir: str | Path, layout: str = "trl") -> None:
    """Write ``train_prefs``, ``test_prefs`` and ``dev_prefs`` (``.parquet``) into ``out_dir``."""
    writer = SplitWriter(out_dir, layout)
    codes = np.zeros(result.pairs.height, np.uint8) if result.codes is None else result.codes
    writer.write(flat_from_trl(result.pairs), codes)
    writer.close()


def write_pairs(result: PreferenceResult, path: str | Path, layout: str = "trl") -> None:
    """Write every pair (no split) as one Parquet file."""
    write_table(layout_table(result.pairs, layout), path)
