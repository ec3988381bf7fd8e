"""The written layouts of preference pairs, shared by every stage that reads pairs.

A batch of pairs travels as a *flat* Arrow table (``prompt``, ``chosen``, ``rejected`` as
texts, ``prompt_id`` and the metadata columns); :func:`layout_of` turns it into a written
layout with its exact Arrow schema: ``trl`` (TRL's conversational format: ``prompt`` = list of
messages, ``chosen`` / ``rejected`` = one assistant message each) or ``h4``
(``HuggingFaceH4/ultrafeedback_binarized``'s columns and types). :func:`to_trl` reads either
back as TRL's (the selection and training stages use it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

LAYOUTS = ("trl", "h4")
#: The written splits, in the order of their codes (:func:`karma.pairing.split.split_codes`).
SPLITS = ("train_prefs", "test_prefs", "dev_prefs")
OUTPUT_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "prompt_id",
    "chosen_model",
    "rejected_model",
    "kinship",
    "s_pref_chosen",
    "s_pref_rejected",
    "chosen_rating",
    "rejected_rating",
    "source",
)
#: Our metadata columns (both layouts carry them after the layout's own columns).
META_COLUMNS = OUTPUT_COLUMNS[4:]
#: The columns of ``HuggingFaceH4/ultrafeedback_binarized``, in its order.
H4_COLUMNS = (
    "prompt",
    "prompt_id",
    "chosen",
    "rejected",
    "messages",
    "score_chosen",
    "score_rejected",
)


def arrow_schema(layout: str) -> Any:
    """The Arrow schema written for ``layout`` (string, not large_string: concatenates with
    datasets written by ``datasets``, such as H4's)."""
    import pyarrow as pa

    text = pa.string()
    meta = [
        ("chosen_model", text),
        ("rejected_model", text),
        ("kinship", pa.float64()),
        ("s_pref_chosen", pa.float64()),
        ("s_pref_rejected", pa.float64()),
        ("chosen_rating", pa.float64()),
        ("rejected_rating", pa.float64()),
        ("source", text),
    ]
    if layout == "h4":
        conv = pa.list_(pa.struct([("content", text), ("role", text)]))
        head = [("prompt", text), ("prompt_id", text), ("chosen", conv), ("rejected", conv),
                ("messages", conv), ("score_chosen", pa.float64()),
                ("score_rejected", pa.float64())]  # fmt: skip
    else:
        msgs = pa.list_(pa.struct([("role", text), ("content", text)]))
        head = [("prompt", msgs), ("chosen", msgs), ("rejected", msgs), ("prompt_id", text)]
    return pa.schema(head + meta)


def sha256_ids(prompts: pl.Series) -> pl.Series:
    """H4's ``prompt_id``: the sha256 hex digest of the prompt's UTF-8 bytes."""
    ids = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in prompts.to_list()]
    return pl.Series("prompt_id", ids, dtype=pl.String)


def arrow_text(series: pl.Series) -> Any:
    """A polars string Series as an Arrow ``string`` array."""
    import pyarrow as pa

    arr = series.to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.string())


def arrow_float(values: np.ndarray) -> Any:
    """Float64 values as an Arrow array, NaN as null (built from buffers: ``pa.array`` would
    import pandas to check its argument, a third of a second)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float64)
    missing = np.isnan(values)
    nulls = int(missing.sum())
    if not nulls:
        return pa.Array.from_buffers(pa.float64(), len(values), [None, pa.py_buffer(values)])
    valid = pa.py_buffer(np.packbits(~missing, bitorder="little"))
    data = pa.py_buffer(np.where(missing, 0.0, values))
    return pa.Array.from_buffers(pa.float64(), len(values), [valid, data], nulls)


def arrow_bool(values: np.ndarray) -> Any:
    """A boolean numpy array as an Arrow array (from buffers: no pandas import)."""
    import pyarrow as pa

    bits = pa.py_buffer(np.packbits(np.asarray(values, dtype=np.bool_), bitorder="little"))
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, bits])


def arrow_ints(values: np.ndarray) -> Any:
    """An int32/int64 numpy array as an Arrow array (from buffers: no pandas import)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    kind = pa.int32() if values.dtype == np.int32 else pa.int64()
    data = pa.py_buffer(values.astype(np.int64, copy=False) if kind == pa.int64() else values)
    return pa.Array.from_buffers(kind, len(values), [None, data])


def repeated_text(text: str, n: int) -> Any:
    """An Arrow ``string`` array of ``n`` times ``text`` (``pa.repeat`` without ``pa.scalar``,
    which imports pandas)."""
    import pyarrow as pa

    raw = text.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(raw))
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(raw * n)]
    return pa.Array.from_buffers(pa.string(), n, buffers)


def conversation(parts: Sequence[tuple[str, Any]], order: tuple[str, str]) -> Any:
    """A list array of conversations: row i = the messages ``(role, texts[i])`` of ``parts``,
    struct fields in ``order``."""
    import pyarrow as pa

    n, k = len(parts[0][1]), len(parts)
    roles = [repeated_text(role, n) for role, _ in parts]
    texts = [text for _, text in parts]
    if k == 1:
        fields = {"role": roles[0], "content": texts[0]}
    else:  # interleave: message j of row i sits at k * i + j
        idx = arrow_ints((np.arange(n)[:, None] + n * np.arange(k)[None, :]).reshape(-1))
        fields = {"role": pa.concat_arrays(roles).take(idx),
                  "content": pa.concat_arrays(texts).take(idx)}  # fmt: skip
    struct = pa.StructArray.from_arrays([fields[f] for f in order], names=list(order))
    offsets = arrow_ints(np.arange(0, k * n + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, struct)


def layout_of(flat: Any, layout: str) -> Any:
    """A flat pairs table (``stream.flat_pairs``) in ``layout``, with its exact Arrow schema:
    ``trl`` (messages) or ``h4`` (``HuggingFaceH4/ultrafeedback_binarized``'s columns: the
    prompt text, ``prompt_id`` = sha256 of the prompt, the user + assistant conversations,
    ``messages`` = chosen, ``score_*`` = the instance ratings), then the metadata columns."""
    import pyarrow as pa

    col = {name: flat.column(name).combine_chunks() for name in flat.column_names}
    meta = [col[c] for c in META_COLUMNS]
    if layout == "h4":
        ids = arrow_text(sha256_ids(pl.from_arrow(col["prompt"])))  # type: ignore[arg-type]
        chosen = conversation([("user", col["prompt"]), ("assistant", col["chosen"])],
                               ("content", "role"))  # fmt: skip
        rejected = conversation([("user", col["prompt"]), ("assistant", col["rejected"])],
                                 ("content", "role"))  # fmt: skip
        arrays = [col["prompt"], ids, chosen, rejected, chosen, col["chosen_rating"],
                  col["rejected_rating"], *meta]  # fmt: skip
    else:
        order = ("role", "content")
        arrays = [conversation([("user", col["prompt"])], order),
                  conversation([("assistant", col["chosen"])], order),
                  conversation([("assistant", col["rejected"])], order),
                  col["prompt_id"], *meta]  # fmt: skip
    return pa.Table.from_arrays(arrays, schema=arrow_schema(layout))


def flat_from_trl(frame: pl.DataFrame) -> Any:
    """A TRL pairs frame (``PreferenceResult.pairs``) as the flat table of ``stream.flat_pairs``."""
    import pyarrow as pa

    def text(col: str) -> pl.Series:
        return frame[col].list.first().struct.field("content")

    columns = {c: arrow_text(text(c)) for c in ("prompt", "chosen", "rejected")}
    columns["prompt_id"] = arrow_text(frame["prompt_id"])
    for c in META_COLUMNS:
        s = frame[c]
        columns[c] = arrow_text(s) if s.dtype == pl.String else arrow_float(
            s.cast(pl.Float64).fill_null(np.nan).to_numpy()
        )  # fmt: skip
    return pa.table(columns)


MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
FRAME_SCHEMA = {
    "prompt": MESSAGES,
    "chosen": MESSAGES,
    "rejected": MESSAGES,
    "prompt_id": pl.String,
    "chosen_model": pl.String,
    "rejected_model": pl.String,
    "kinship": pl.Float64,
    "s_pref_chosen": pl.Float64,
    "s_pref_rejected": pl.Float64,
    "chosen_rating": pl.Float64,
    "rejected_rating": pl.Float64,
    "source": pl.String,
}


def trl_frame(flat: Any) -> pl.DataFrame:
    """A flat pairs table as the TRL polars frame of :attr:`PreferenceResult.pairs`."""
    frame = pl.from_arrow(layout_of(flat, "trl"))
    assert isinstance(frame, pl.DataFrame)
    return frame.cast(FRAME_SCHEMA)  # type: ignore[arg-type]


def h4_frame(pairs: pl.DataFrame) -> pl.DataFrame:
    """A TRL pairs frame in ``HuggingFaceH4/ultrafeedback_binarized``'s layout (see
    :func:`layout_of`)."""
    frame = pl.from_arrow(layout_table(pairs, "h4"))
    assert isinstance(frame, pl.DataFrame)
    return frame


def to_trl(frame: pl.DataFrame) -> pl.DataFrame:
    """Either layout -> TRL's conversational one: ``prompt`` (a list of messages) and
    ``chosen``/``rejected`` (one assistant message each), then the other columns unchanged.

    An H4-layout frame (``prompt`` as text, full conversations in ``chosen``/``rejected``)
    becomes the prompt as one user message and the last message of each conversation; a TRL
    frame is returned as it is (so is anything else: callers check the columns).
    """
    if "prompt" not in frame.columns or frame.schema["prompt"] != pl.String:
        return frame
    for col in ("chosen", "rejected"):
        dtype = frame.schema.get(col)
        if not isinstance(dtype, pl.List) or not isinstance(dtype.inner, pl.Struct):
            return frame

    def last(col: str) -> pl.Expr:
        m = pl.col(col).list.last()
        return pl.concat_list(pl.struct(m.struct.field("role"), m.struct.field("content"))).alias(
            col
        )

    prompt = pl.concat_list(
        pl.struct(pl.lit("user").alias("role"), pl.col("prompt").alias("content"))
    ).alias("prompt")
    rest = [c for c in frame.columns if c not in ("prompt", "chosen", "rejected")]
    return frame.select(prompt, last("chosen"), last("rejected"), *rest)


def layout_table(pairs: pl.DataFrame, layout: str) -> Any:
    """A TRL pairs frame as an Arrow table with the exact schema of ``layout``."""
    return layout_of(flat_from_trl(pairs), layout)
