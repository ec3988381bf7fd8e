"""Read multi-model completions in the UltraFeedback schema into flat polars frames.

A record is ``{"instruction": str, "source"?: str, "completions": [{"model": str,
"response": str, "overall_score"?: float | str, "fine-grained_score"?: float | str,
"annotations"?: {...}}, ...]}`` (the layout of ``openbmb/UltraFeedback``; extra keys such as
``models``, ``correct_answers``, ``principle`` or ``critique`` are ignored). Ratings may be
numbers, numeric strings or ``"N/A"`` (read as missing).

Sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a hub dataset id read with
``datasets.load_dataset`` (e.g. ``openbmb/UltraFeedback``).

>>> data = read_ultrafeedback("data/demo/ultrafeedback_demo.jsonl")  # doctest: +SKIP
>>> data.prompts.columns, data.completions.columns  # doctest: +SKIP
(['row', 'instruction', 'source'], ['row', 'pos', 'model', 'response', 'overall_score', ...])
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import (
    check_record_bytes,
    check_size,
    limit_error,
    limits,
    parse_json,
    text_lines,
)
from karma.pairing.batching import parquet_frames, prefetch

log = logging.getLogger(__name__)

#: Rating fields read from every completion (output column name -> UltraFeedback key).
RATING_FIELDS: dict[str, str] = {
    "overall_score": "overall_score",
    "fine_grained_score": "fine-grained_score",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MISSING = {"n/a", "na", "none", ""}


@dataclass(frozen=True)
class UltraFeedback:
    """Flat view of a dataset.

    ``prompts``: one row per instruction (``row`` u32 0..n-1, ``instruction``, ``source``).
    ``completions``: one row per completion in record order (``row``, ``pos`` within the
    record, ``model``, ``response``, ``overall_score``, ``fine_grained_score``; ratings are
    Float64, null when absent or "N/A").
    """

    prompts: pl.DataFrame
    completions: pl.DataFrame
    source: str

    def __len__(self) -> int:
        return self.prompts.height


PROMPT_SCHEMA = {"row": pl.UInt32, "instruction": pl.String, "source": pl.String}
COMPLETION_SCHEMA = {
    "row": pl.UInt32,
    "pos": pl.UInt32,
    "model": pl.String,
    "response": pl.String,
    "overall_score": pl.Float64,
    "fine_grained_score": pl.Float64,
}


def parse_rating(value: Any, *, file: object, field: str) -> float | None:
    """A rating as float; ``None`` for absent / "N/A"; KarmaError for anything else."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return None if math.isnan(v) else v
    if isinstance(value, str):
        s = value.strip()
        if s.lower() in _MISSING:
            return None
        try:
            v = float(s)
        except ValueError:
            pass
        else:
            if math.isfinite(v):
                return v
    raise KarmaError(
        "rating is not a number",
        file=file,
        field=field,
        value=value,
        expected='a number, a numeric string or "N/A"',
    )


def _model_response(comp: Any, loc: str, cloc: str) -> tuple[str, str]:
    """A completion's model name and response, checked (``cloc``: its place in the record)."""
    if not isinstance(comp, dict):
        raise KarmaError(
            "completion is not an object",
            file=loc,
            field=cloc,
            value=type(comp).__name__,
            expected="{model, response, ...}",
        )
    model, resp = comp.get("model"), comp.get("response")
    if not isinstance(model, str) or not model.strip():
        raise KarmaError(
            "completion without a model name",
            file=loc,
            field=f"{cloc}.model",
            value=model,
            expected="a model name",
        )
    if not isinstance(resp, str):
        raise KarmaError(
            "completion without a response",
            file=loc,
            field=f"{cloc}.response",
            value=resp,
            expected="a string",
        )
    return model, resp


def from_records(
    records: Iterable[tuple[str, Any]], *, file: object, row0: int = 0
) -> UltraFeedback:
    """Validate and flatten ``(where, record)`` items (``where`` e.g. "line 3"); ``row0``: the
    row number of the first record (a batch of a larger file)."""
    p_instr: list[str] = []
    p_source: list[str | None] = []
    c_row: list[int] = []
    c_pos: list[int] = []
    c_model: list[str] = []
    c_resp: list[str] = []
    ratings: dict[str, list[float | None]] = {k: [] for k in RATING_FIELDS}
    cap = limits().max_record_bytes
    for row, (where, rec) in enumerate(records, start=row0):
        loc = f"{file}: {where}"
        if not isinstance(rec, dict):
            raise KarmaError(
                "record is not a JSON object",
                file=loc,
                value=type(rec).__name__,
                expected="an object with 'instruction' and 'completions'",
            )
        instr = rec.get("instruction")
        if not isinstance(instr, str):
            raise KarmaError(
                "missing or not a string" if instr is not None else "missing",
                file=loc,
                field="instruction",
                value=instr,
                expected="the instruction text",
            )
        comps = rec.get("completions")
        if not isinstance(comps, list):
            raise KarmaError(
                "missing or not a list",
                file=loc,
                field="completions",
                value=None if comps is None else type(comps).__name__,
                expected="a list of {model, response, ...}",
            )
        src = rec.get("source")
        p_instr.append(instr)
        p_source.append(None if src is None else str(src))
        size = len(instr.encode())
        for pos, comp in enumerate(comps):
            model, resp = _model_response(comp, loc, f"completions[{pos}]")
            size += len(resp.encode())
            if size > cap:
                raise limit_error(loc, f"record of {size}+ bytes of text, more than",
                                  "max_record_bytes")  # fmt: skip
            c_row.append(row)
            c_pos.append(pos)
            c_model.append(model)
            c_resp.append(resp)
            for col, key in RATING_FIELDS.items():
                field = f"completions[{pos}].{key}"
                ratings[col].append(parse_rating(comp.get(key), file=loc, field=field))
    if not p_instr:
        raise KarmaError(
            "no records (empty file)", file=file, expected="at least one UltraFeedback record"
        )
    prompts = pl.DataFrame(
        {"row": range(row0, row0 + len(p_instr)), "instruction": p_instr, "source": p_source},
        schema=PROMPT_SCHEMA,
    )
    completions = pl.DataFrame(
        {"row": c_row, "pos": c_pos, "model": c_model, "response": c_resp, **ratings},
        schema=COMPLETION_SCHEMA,
    )
    return UltraFeedback(prompts, completions, str(file))


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in text_lines(path):  # bounded by limits.max_line_bytes
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", parse_json(line, path, f"line {lineno}: ")
        except json.JSONDecodeError as err:
            raise KarmaError(
                f"malformed JSON on line {lineno}: {err.msg} at column {err.colno}", file=path
            ) from None


def _read_json(path: Path) -> UltraFeedback:
    check_size(path)  # parsed whole: limits.max_file_bytes
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise KarmaError("empty file", file=path, expected="a JSON list of UltraFeedback records")
    try:
        data = parse_json(text, path)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file
            return from_records(_iter_jsonl(path), file=path)
        raise KarmaError(
            f"malformed JSON on line {err.lineno}: {err.msg} at column {err.colno}", file=path
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise KarmaError(
            "top level is not a list of records",
            file=path,
            value=type(data).__name__,
            expected="a JSON list of records",
        )
    return from_records(((f"record {i}", r) for i, r in enumerate(data)), file=path)


def _rating_expr(frame_dtype: pl.DataType, key: str) -> pl.Expr:
    """Expression turning the struct field ``key`` (numeric or string) into Float64."""
    field = pl.col("completions").struct.field(key)
    if frame_dtype.is_numeric():
        return field.cast(pl.Float64).fill_nan(None)
    if frame_dtype == pl.String:
        s = field.str.strip_chars()
        missing = s.str.to_lowercase().is_in(list(_MISSING)) | s.is_null()
        return pl.when(missing).then(None).otherwise(s.cast(pl.Float64, strict=False))
    if frame_dtype == pl.Null:
        return pl.lit(None, dtype=pl.Float64)
    raise KarmaError(
        "rating column has an unsupported type",
        field=key,
        value=str(frame_dtype),
        expected="numbers or numeric strings",
    )


def _completion_fields(df: pl.DataFrame, file: object) -> dict[str, pl.DataType]:
    """Check the frame's columns and types; the completions' struct fields and their types."""
    for col in ("instruction", "completions"):
        if col not in df.columns:
            raise KarmaError(
                "missing column",
                file=file,
                field=col,
                expected="columns 'instruction' and 'completions'",
            )
    if df.height == 0:
        raise KarmaError(
            "no records (empty file)", file=file, expected="at least one UltraFeedback record"
        )
    if df.schema["instruction"] != pl.String:
        raise KarmaError(
            "wrong type",
            file=file,
            field="instruction",
            value=str(df.schema["instruction"]),
            expected="strings",
        )
    ctype = df.schema["completions"]
    if not isinstance(ctype, pl.List) or not isinstance(ctype.inner, pl.Struct):
        raise KarmaError(
            "wrong type",
            file=file,
            field="completions",
            value=str(ctype),
            expected="a list of {model, response, ...} structs",
        )
    fields = {f.name: f.dtype for f in ctype.inner.fields}
    for key in ("model", "response"):
        if key not in fields:
            raise KarmaError(
                "completions have no such field",
                file=file,
                field=f"completions[].{key}",
                expected="model and response",
            )
        if fields[key] != pl.String:
            raise KarmaError(
                "wrong type",
                file=file,
                field=f"completions[].{key}",
                value=str(fields[key]),
                expected="strings",
            )
    return fields


def _check_sizes(df: pl.DataFrame, file: object, row0: int) -> None:
    """``limits.max_record_bytes``, naming a record of a batch by its global row."""
    try:
        check_record_bytes(df.select("instruction", "completions"), file)
    except KarmaError as err:  # a batch of a larger file: name the record by its global row
        if not row0:
            raise
        shift = lambda m: f"record {int(m.group(1)) + row0}"  # noqa: E731
        raise KarmaError(re.sub(r"\brecord (\d+)", shift, str(err), count=1)) from None


def _exploded(df: pl.DataFrame, fields: dict[str, pl.DataType]) -> pl.DataFrame:
    """One row per completion (``row``, ``pos``, ``model``, ``response``, the ratings as
    Float64 and, for the check, their raw values as ``_raw_<rating>``)."""
    exploded = (
        df.lazy()
        .select("row", "completions")
        .with_columns(pos=pl.int_ranges(pl.col("completions").list.len(), dtype=pl.UInt32))
        .explode("completions", "pos")
        .filter(pl.col("pos").is_not_null())
    )
    ratings = []
    for col, key in RATING_FIELDS.items():
        if key in fields:
            raw = pl.col("completions").struct.field(key)
            ratings += [_rating_expr(fields[key], key).alias(col), raw.alias(f"_raw_{col}")]
        else:
            ratings += [pl.lit(None, dtype=pl.Float64).alias(col)]
    return exploded.select(
        "row",
        "pos",
        pl.col("completions").struct.field("model").alias("model"),
        pl.col("completions").struct.field("response").alias("response"),
        *ratings,
    ).collect()


def _checked_ratings(
    comps: pl.DataFrame, fields: dict[str, pl.DataType], file: object
) -> pl.DataFrame:
    """Refuse a rating that is not a number ("N/A" is missing) or not finite; drop the raw
    columns."""
    for col, key in RATING_FIELDS.items():
        raw = f"_raw_{col}"
        if raw not in comps.columns:
            continue
        bad = comps.filter(pl.col(col).is_null() & pl.col(raw).is_not_null())
        if fields[key] == pl.String:
            bad = bad.filter(
                ~pl.col(raw).str.strip_chars().str.to_lowercase().is_in(list(_MISSING))
            )
        else:
            bad = bad.filter(~pl.col(raw).cast(pl.Float64).is_nan())
        if bad.height:
            r = bad.row(0, named=True)
            raise KarmaError(
                "rating is not a number",
                file=f"{file}: record {r['row']}",
                field=f"completions[{r['pos']}].{key}",
                value=r[raw],
                expected='a number, a numeric string or "N/A"',
            )
        comps = comps.drop(raw)
    inf = comps.filter(pl.any_horizontal(pl.col(list(RATING_FIELDS)).is_infinite()))
    if inf.height:
        r = inf.row(0, named=True)
        raise KarmaError(
            "rating is not finite",
            file=f"{file}: record {r['row']}",
            field=f"completions[{r['pos']}]",
            expected="a finite number",
        )
    return comps


def from_frame(df: pl.DataFrame, *, file: object, row0: int = 0) -> UltraFeedback:
    """Validate and flatten a frame with the UltraFeedback columns (vectorised); ``row0``: the
    row number of its first record (a batch of a larger file)."""
    fields = _completion_fields(df, file)
    _check_sizes(df, file, row0)
    df = df.with_row_index("row", offset=row0)
    bad = df.filter(pl.col("instruction").is_null() | pl.col("completions").is_null())
    if bad.height:
        r = bad.row(0, named=True)
        field = "instruction" if r["instruction"] is None else "completions"
        raise KarmaError(
            "missing",
            file=f"{file}: record {r['row']}",
            field=field,
            expected="the instruction text and a list of completions",
        )
    source = (
        pl.col("source").cast(pl.String)
        if "source" in df.columns
        else pl.lit(None, dtype=pl.String)
    )
    prompts = df.select(pl.col("row"), pl.col("instruction"), source.alias("source"))
    comps = _exploded(df, fields)
    miss = comps.filter(
        pl.col("model").is_null()
        | (pl.col("model").str.strip_chars() == "")
        | pl.col("response").is_null()
    )
    if miss.height:
        r = miss.row(0, named=True)
        key = "model" if not r["model"] or not r["model"].strip() else "response"
        raise KarmaError(
            f"completion without a {key}",
            file=f"{file}: record {r['row']}",
            field=f"completions[{r['pos']}].{key}",
            value=r[key],
            expected="a model name and a response string",
        )
    comps = _checked_ratings(comps, fields, file).cast(COMPLETION_SCHEMA)  # type: ignore[arg-type]
    return UltraFeedback(prompts.cast(PROMPT_SCHEMA), comps, str(file))  # type: ignore[arg-type]


def _read_parquet(path: Path) -> UltraFeedback:
    try:
        df = pl.read_parquet(path)
    except Exception as err:  # polars raises several error types for broken files
        raise KarmaError(
            f"cannot read Parquet: {' '.join(str(err).split())[:200]}", file=path
        ) from None
    return from_frame(df, file=path)


def _read_hub(name: str, split: str) -> UltraFeedback:
    import datasets

    log.info("loading %s (split %s) through datasets.load_dataset", name, split)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise KarmaError(
            f"cannot load hub dataset: {' '.join(str(err).split())[:200]}",
            file=name,
            expected="a dataset id reachable through datasets",
        ) from None
    df = pl.from_arrow(ds.data.table)
    assert isinstance(df, pl.DataFrame)
    return from_frame(df, file=name)


def iter_ultrafeedback(
    source: str | Path, *, split: str = "train", batch_records: int = 100_000
) -> Iterator[UltraFeedback]:
    """:func:`read_ultrafeedback` in batches of ``batch_records`` records, with global row
    numbers: Parquet by row groups (only :data:`~karma.pairing.batching.COLUMNS`), JSON lines
    by lines; other sources (a .json file, a hub id) in one batch. Concatenated, the batches
    are what :func:`read_ultrafeedback` returns, and they are checked as it checks
    (``limits``, one completion per model and instruction)."""
    for batch, checked in _batches(source, split, batch_records):
        if not checked:
            _no_repeated_model(batch)
        yield batch


def _parquet_batches(path: Path, batch_records: int) -> Iterator[tuple[UltraFeedback, bool]]:
    """A Parquet file's records in batches (:func:`parquet_frames`), read and checked ahead
    (``(batch, checked)``: the repeated-model check runs in the reading thread too)."""
    import pyarrow.parquet as pq

    try:  # pre_buffer would keep every row group read so far (memory grows with the file)
        pf = pq.ParquetFile(path, pre_buffer=False)
    except Exception as err:
        raise KarmaError(
            f"cannot read Parquet: {' '.join(str(err).split())[:200]}", file=path
        ) from None
    names = pf.schema_arrow.names
    if pf.metadata.num_rows == 0 or "completions" not in names:
        yield _read_parquet(path), False  # the in-memory reader names what is wrong
        return

    def batches() -> Iterator[tuple[UltraFeedback, bool]]:
        row0 = 0
        for frame in parquet_frames(pf, path, batch_records):
            batch = from_frame(frame, file=path, row0=row0)
            _no_repeated_model(batch)
            yield batch, True
            row0 += frame.height

    yield from prefetch(batches())


def _batches(
    source: str | Path, split: str, batch_records: int
) -> Iterator[tuple[UltraFeedback, bool]]:
    """``(batch, checked)``: the source in batches, and whether the repeated-model check ran."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size and suffix in (".parquet", ".pq"):
        yield from _parquet_batches(path, batch_records)
    elif path.is_file() and path.stat().st_size and suffix in (".jsonl", ".ndjson"):
        row0 = 0
        chunk: list[tuple[str, Any]] = []
        for item in _iter_jsonl(path):
            chunk.append(item)
            if len(chunk) == batch_records:
                yield from_records(chunk, file=path, row0=row0), False
                row0, chunk = row0 + len(chunk), []
        if chunk or row0 == 0:
            yield from_records(chunk, file=path, row0=row0), False
    else:
        yield _read_source(source, split), False


def read_ultrafeedback(source: str | Path, *, split: str = "train") -> UltraFeedback:
    """Read a local .jsonl/.json/.parquet file or a hub dataset id (``owner/name``).

    Input is bounded by ``params.limits`` and a model may answer an instruction only once.
    """
    data = _read_source(source, split)
    _no_repeated_model(data)
    return data


def model_keys(models: pl.Series) -> pl.Series:
    """Each model name's case-insensitive key as a small integer (names are stripped and
    lower-cased; the few distinct spellings are keyed once, then every row by one lookup)."""
    spellings = models.unique()
    canonical = spellings.str.strip_chars().str.to_lowercase()
    ids = {c: i for i, c in enumerate(canonical.unique().sort().to_list())}
    key = dict(zip(spellings.to_list(), [ids[c] for c in canonical.to_list()], strict=True))
    return models.replace_strict(key, return_dtype=pl.Int64)


def _no_repeated_model(data: UltraFeedback) -> None:
    """Refuse a record whose completions name one model twice (case-insensitive)."""
    comps = data.completions
    if comps.height < 2:
        return
    # fast check on integer keys; the error path below finds and names the first repeat
    key = model_keys(comps["model"])
    combined = comps["row"].cast(pl.Int64) * (int(key.max() or 0) + 1) + key  # type: ignore[operator]
    if combined.n_unique() == comps.height:
        return
    keyed = data.completions.select(
        "row", "pos", "model", key=pl.col("model").str.strip_chars().str.to_lowercase()
    )
    repeated = keyed.filter(pl.len().over("row", "key") > 1)
    if repeated.height:
        first = repeated.row(0, named=True)
        same = repeated.filter((pl.col("row") == first["row"]) & (pl.col("key") == first["key"]))
        r = same.row(1, named=True)
        raise KarmaError(
            f"model {r['model']!r} repeats within one instruction (completions[{first['pos']}] "
            f"and [{r['pos']}]; names are case-insensitive)",
            file=f"{data.source}: record {r['row']}",
            field=f"completions[{r['pos']}].model",
            expected="one completion per model and instruction",
        )


def _read_source(source: str | Path, split: str) -> UltraFeedback:
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if path.stat().st_size == 0:
            raise KarmaError("empty file", file=path, expected="UltraFeedback records")
        if suffix in (".jsonl", ".ndjson"):
            return from_records(_iter_jsonl(path), file=path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".parquet", ".pq"):
            return _read_parquet(path)
        raise KarmaError(
            "unsupported file type", file=path, value=suffix, expected=".jsonl, .json or .parquet"
        )
    if path.exists():
        raise KarmaError("not a file", file=path, expected="a .jsonl/.json/.parquet file")
    if path.is_symlink():
        raise KarmaError("dataset is a dangling symlink", file=path, expected="an existing file")
    if HUB_ID.match(str(source)) and not path.suffix:
        return _read_hub(str(source), split)
    raise KarmaError(
        "dataset not found",
        file=source,
        expected="a local .jsonl/.json/.parquet file or a hub id like openbmb/UltraFeedback",
    )
