"""Training data: preference pairs read into the shape a training method's trainer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError
from karma.training.objectives import Shape

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def has_rows(path: str | Path) -> bool:
    """False only for a readable Parquet file without rows (an empty split: no metrics); a
    missing or unreadable file is True, so that :func:`load_pairs` reports it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows > 0
    except (OSError, ValueError):
        return True


def load_pairs(path: str | Path, shape: Shape = "paired") -> Any:
    """Read preference pairs (TRL or H4 layout) into a ``datasets.Dataset`` in TRL's
    conversational format, in the registry's data ``shape``.

    ``paired``: ``prompt`` / ``chosen`` / ``rejected``; ``sft``: ``prompt`` / ``completion``
    (the chosen answer); ``unpaired``: ``prompt`` / ``completion`` / ``label`` by TRL's
    ``unpair_preference_dataset``, the rows of pair i at 2i (chosen) and 2i + 1 (rejected).
    Metadata columns are dropped.
    """
    import datasets
    import polars as pl

    p = Path(path)
    if not p.is_file():
        raise KarmaError(
            "training data file not found (run the select stage first)",
            file=p,
            expected="a parquet file of preference pairs",
        )
    from karma.core.io import check_record_bytes, read_parquet
    from karma.pairing.layouts import to_trl

    frame = to_trl(read_parquet(p, "parquet file"))  # either layout (TRL's or H4's)
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise KarmaError(
            f"missing columns {missing}",
            file=p,
            value=sorted(frame.columns),
            expected="prompt, chosen, rejected (TRL conversational preference format)",
        )
    if frame.height == 0:
        raise KarmaError("dataset is empty: nothing to train on", file=p)
    check_record_bytes(frame.select(PAIR_COLUMNS), p, "pair")
    for col in PAIR_COLUMNS:
        dtype = frame.schema[col]
        if not isinstance(dtype, pl.List):
            raise KarmaError(
                "must be a list of messages",
                file=p,
                field=col,
                value=str(dtype),
                expected='[{"role": ..., "content": ...}]',
            )
    frame = frame.select(PAIR_COLUMNS)
    if shape == "sft":
        frame = frame.select("prompt", pl.col("chosen").alias("completion"))
    dataset = datasets.Dataset(frame.to_arrow())
    if shape == "unpaired":
        dataset = unpaired(dataset)
    return dataset


def unpaired(pairs: Any) -> Any:
    """TRL's ``unpair_preference_dataset`` of ``pairs`` (one batch: every chosen row, then
    every rejected row), reordered so that pair i is rows 2i (chosen) and 2i + 1 (rejected).

    >>> import datasets
    >>> d = datasets.Dataset.from_dict({"prompt": ["p", "q"], "chosen": ["a", "b"],
    ...                                 "rejected": ["x", "y"]})
    >>> [(r["completion"], r["label"]) for r in unpaired(d)]
    [('a', True), ('x', False), ('b', True), ('y', False)]
    """
    from trl import unpair_preference_dataset

    n = len(pairs)
    rows = unpair_preference_dataset(pairs, batch_size=None)
    if len(rows) != 2 * n or not all(rows["label"][:n]) or any(rows["label"][n:]):
        raise KarmaError("TRL's unpair_preference_dataset changed its row order",
                         expected="n chosen rows then n rejected rows")  # fmt: skip
    return rows.select([j for i in range(n) for j in (i, n + i)])
