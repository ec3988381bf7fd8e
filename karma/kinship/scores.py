"""Benchmark score tables: read wide or long tables (CSV, Parquet, JSON) into one canonical frame.

The canonical frame has a ``model`` column (lower-case canonical ids) and one ``Float64`` column
per benchmark (lower-case names); a missing score is null.

>>> df = read_scores("data/origin/scores.csv", {"Gemini-1.5-Flash": "bard"})  # doctest: +SKIP
>>> df.columns  # doctest: +SKIP
['model', 'ifeval', 'mmlu_stem', 'mmlu_pro', 'hellaswag', 'arc_easy', 'arc_challenge']

Accepted layouts:

* wide: a ``model`` column plus one column per benchmark;
* long: exactly the columns ``model``, ``benchmark``, ``score`` (any order, any case).

Accepted files: ``.csv``/``.tsv``, ``.parquet``/``.pq``, ``.json`` (a list of records, or a mapping
``{model: {benchmark: score}}``) and ``.jsonl``/``.ndjson`` (one record per line).
Missing values: an empty cell, ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``-`` or a JSON null.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import (
    check_size,
    limit_error,
    limits,
    parse_json,
    read_json,
    read_parquet,
    short_reason,
    text_lines,
    write_json,
)
from karma.core.stage import Stage, input_path, output_path
from karma.generation.settings import as_pool_model

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

MODEL = "model"
LONG_COLUMNS = ("model", "benchmark", "score")
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "-"})
SUFFIXES = ".csv, .tsv, .parquet, .pq, .json, .jsonl, .ndjson"


def canonical_id(name: str) -> str:
    """Canonical spelling of a model or benchmark id: stripped, lower-case."""
    return str(name).strip().lower()


def _read_raw(path: Path) -> tuple[list[str], list[list[Any]]]:
    """Return (column names, rows) exactly as stored; values untouched (strings or numbers).

    Every format is bounded by ``params.limits`` (line length, columns, file size) before it
    is parsed, and parser errors name the line.
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".parquet", ".pq", ".json", ".jsonl", ".ndjson"):
        raise KarmaError(
            "unsupported score table format", file=path, value=suffix, expected=SUFFIXES
        )
    if path.is_dir():
        raise KarmaError("score table is a directory", file=path, expected="a file")
    if not path.is_file():
        what = "is a dangling symlink" if path.is_symlink() else "not found"
        raise KarmaError(f"score table {what}", file=path)
    if path.stat().st_size == 0:
        raise KarmaError("empty file", file=path, expected="a header line (model, benchmarks)")
    try:
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
        if suffix in (".parquet", ".pq"):
            return _read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            records = []
            for lineno, line in text_lines(path):
                if line.strip():
                    records.append(_json(line, path, lineno))
            return _records(records, path)
        check_size(path)
        return _records(_json(path.read_text(encoding="utf-8"), path, None), path)
    except KarmaError:
        raise
    except UnicodeDecodeError:
        raise KarmaError("not UTF-8 text", file=path) from None
    except OSError as err:
        raise KarmaError(f"cannot read score table: {short_reason(err)}", file=path) from None


def _json(text: str, path: Path, lineno: int | None) -> Any:
    try:
        return parse_json(text, path, "" if lineno is None else f"line {lineno}: ")
    except json.JSONDecodeError as err:
        line = lineno if lineno is not None else err.lineno
        raise KarmaError(
            f"line {line}, column {err.colno}: not valid JSON: {err.msg}", file=path
        ) from None


def _read_csv(path: Path, separator: str) -> tuple[list[str], list[list[Any]]]:
    """CSV/TSV cells as text (Python's csv, strict quoting), bounded by ``params.limits``."""
    lim = limits()
    csv.field_size_limit(max(lim.max_record_bytes, 1))
    numbered = text_lines(path)
    where = {"line": 1}

    def lines() -> Iterator[str]:
        for lineno, line in numbered:
            where["line"] = lineno
            yield line

    reader = csv.reader(lines(), delimiter=separator, strict=True)
    rows: list[list[Any]] = []
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            if header is None:
                header = row
                if len(header) > lim.max_columns:
                    raise limit_error(path, f"line 1: {len(header)} columns, more than",
                                      "max_columns")  # fmt: skip
            elif row:
                if len(row) > len(header):
                    raise KarmaError(
                        f"line {start}: {len(row)} fields, more than the header's {len(header)}",
                        file=path,
                        expected="one field per column (quote a value that holds the separator)",
                    )
                rows.append(row + [None] * (len(header) - len(row)))
            start = where["line"] + 1
    except csv.Error as err:
        reason = str(err)
        if "unexpected end of data" in reason:
            reason = 'unterminated quoted field (expected a closing ")'
        elif "field larger than field limit" in reason:
            raise limit_error(path, f"line {start}: a field longer than",
                              "max_record_bytes") from None  # fmt: skip
        raise KarmaError(f"line {start}: malformed {path.suffix[1:].upper()}: {reason}",
                         file=path) from None  # fmt: skip
    if header is None:
        raise KarmaError("no header line", file=path, expected="model, benchmarks...")
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], list[list[Any]]]:
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as err:  # polars raises several error types for broken files
        raise KarmaError(f"not a readable Parquet file: {short_reason(err)}", file=path) from None
    if len(schema) > limits().max_columns:
        raise limit_error(path, f"{len(schema)} columns, more than", "max_columns")
    df = read_parquet(path, "Parquet score table")
    return df.columns, [list(r) for r in df.iter_rows()]


def _records(data: Any, path: Path) -> tuple[list[str], list[list[Any]]]:
    """JSON payload -> (columns, rows). Records keep first-seen key order."""
    if isinstance(data, dict):  # {model: {benchmark: score}}
        recs = []
        for model, row in data.items():
            if not isinstance(row, dict):
                raise KarmaError(
                    "JSON mapping values must be objects {benchmark: score}",
                    file=path,
                    field=str(model),
                    value=row,
                )
            recs.append({MODEL: model, **row})
        data = recs
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise KarmaError(
            "JSON score table must be a list of records or {model: {benchmark: score}}", file=path
        )
    seen: dict[str, None] = {}
    cap = limits().max_columns
    for i, rec in enumerate(data):
        seen.update(dict.fromkeys(rec))
        if len(seen) > cap:
            raise limit_error(path, f"record {i + 1}: {len(seen)} columns, more than",
                              "max_columns")  # fmt: skip
    columns = list(seen)
    return columns, [[rec.get(c) for c in columns] for rec in data]


def _to_float(value: Any) -> float | None:
    """Parse one cell; None for missing; raise ValueError for anything non-numeric."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        if text.lower() in MISSING:
            return None
        out = float(text)
    if math.isnan(out):
        return None
    if math.isinf(out):
        raise ValueError(value)
    return out


def _row_label(path: Path, index: int) -> str:
    """Human row reference: the line number for text tables, else the 1-based record number."""
    if path.suffix.lower() in (".csv", ".tsv"):
        return f"line {index + 2}"
    return f"record {index + 1}"


def read_scores(
    path: str | os.PathLike[str], aliases: dict[str, str] | None = None
) -> pl.DataFrame:
    """Read a benchmark table (wide or long; CSV, Parquet or JSON) into the canonical frame.

    Model ids are matched case-insensitively; ``aliases`` maps an alias (any case) to the
    canonical id. Raises :class:`KarmaError` for a duplicate model (or model/benchmark pair),
    a non-numeric score, no benchmark columns or fewer than two models.
    """
    path = Path(path)
    columns, rows = _read_raw(path)
    alias_map = {canonical_id(k): canonical_id(v) for k, v in (aliases or {}).items()}
    lower = _check_header(path, columns)
    if MODEL not in lower:
        raise KarmaError(
            "no model column",
            file=path,
            value=columns,
            expected="a 'model' column (wide table) or columns model, benchmark, score (long)",
        )
    if sorted(lower) == sorted(LONG_COLUMNS):
        models, bench_names, values = _from_long(path, lower, rows, alias_map)
    else:
        models, bench_names, values = _from_wide(path, columns, lower, rows, alias_map)
    if not bench_names:
        raise KarmaError(
            "no benchmark columns", file=path, value=columns, expected="model + >= 1 benchmark"
        )
    if len(models) < 2:
        raise KarmaError(
            "fewer than two models", file=path, value=len(models), expected=">= 2 models"
        )
    data: dict[str, Any] = {MODEL: models}
    for j, name in enumerate(bench_names):
        data[name] = [v[j] for v in values]
    schema = {MODEL: pl.String, **{b: pl.Float64 for b in bench_names}}
    df = pl.DataFrame(data, schema=schema)
    log.debug("read %d models x %d benchmarks from %s", len(models), len(bench_names), path)
    return df


def _check_header(path: Path, columns: list[Any]) -> list[str]:
    """Column names checked before any value is read: text, none blank, none repeated, and
    one layout (wide, or exactly model, benchmark, score). Returns their canonical spelling."""
    lower: list[str] = []
    for i, name in enumerate(columns):
        if not isinstance(name, str):
            raise KarmaError(f"column {i + 1}: name is not text", file=path, value=name)
        canon = canonical_id(name)
        if canon == "":
            raise KarmaError(
                f"column {i + 1}: blank column name", file=path, value=name,
                expected="a model column and named benchmark columns",
            )  # fmt: skip
        if canon in lower:
            kind = "model" if canon == MODEL else "benchmark"
            raise KarmaError(
                f"duplicate {kind} column {name!r} (columns {lower.index(canon) + 1} and {i + 1}; "
                "names are case-insensitive)",
                file=path,
                expected="each column once",
            )
        lower.append(canon)
    if "benchmark" in lower and sorted(lower) != sorted(LONG_COLUMNS):
        raise KarmaError(
            "mixed wide and long layout: a 'benchmark' column next to other columns",
            file=path,
            value=columns,
            expected="wide (model + one column per benchmark) or long (model, benchmark, score)",
        )
    return lower


def _canonical_model(path: Path, raw: Any, index: int, alias_map: dict[str, str]) -> str:
    """Canonical id of one row's model (aliases applied); error for an empty id or not text."""
    if raw is None or (isinstance(raw, str) and canonical_id(raw) == ""):
        raise KarmaError(f"{_row_label(path, index)}: empty model id", file=path, field=MODEL)
    if not isinstance(raw, str):
        raise KarmaError(f"{_row_label(path, index)}: model id is not text", file=path,
                         field=MODEL, value=raw, expected="a model name")  # fmt: skip
    model = canonical_id(raw)
    return alias_map.get(model, model)


def _from_wide(
    path: Path,
    columns: list[str],
    lower: list[str],
    rows: list[list[Any]],
    alias_map: dict[str, str],
) -> tuple[list[str], list[str], list[list[float | None]]]:
    m_idx = lower.index(MODEL)
    bench_idx = [i for i in range(len(columns)) if i != m_idx]
    bench_names: list[str] = []
    for i in bench_idx:
        name = lower[i]
        if name == "":
            raise KarmaError("empty benchmark column name", file=path, value=columns)
        if name in bench_names or name == MODEL:
            raise KarmaError(
                "duplicate benchmark column (names are case-insensitive)",
                file=path,
                field=columns[i],
            )
        bench_names.append(name)
    models: list[str] = []
    first_raw: dict[str, str] = {}
    values: list[list[float | None]] = []
    for r, row in enumerate(rows):
        model = _canonical_model(path, row[m_idx], r, alias_map)
        if model in first_raw:
            raise KarmaError(
                f"{_row_label(path, r)}: duplicate model {model!r} "
                f"(also {first_raw[model]!r}; ids are case-insensitive, aliases applied)",
                file=path,
                field=MODEL,
                value=row[m_idx],
            )
        first_raw[model] = str(row[m_idx])
        parsed: list[float | None] = []
        for i, name in zip(bench_idx, bench_names, strict=True):
            try:
                parsed.append(_to_float(row[i]))
            except (TypeError, ValueError):
                raise KarmaError(
                    f"{_row_label(path, r)} (model {model!r}): non-numeric score",
                    file=path,
                    field=name,
                    value=row[i],
                    expected="a finite number or an empty cell / NA for missing",
                ) from None
        models.append(model)
        values.append(parsed)
    return models, bench_names, values


def _from_long(
    path: Path, lower: list[str], rows: list[list[Any]], alias_map: dict[str, str]
) -> tuple[list[str], list[str], list[list[float | None]]]:
    mi, bi, si = (lower.index(c) for c in LONG_COLUMNS)
    models: list[str] = []
    bench_names: list[str] = []
    cells: dict[tuple[str, str], float | None] = {}
    for r, row in enumerate(rows):
        model = _canonical_model(path, row[mi], r, alias_map)
        if row[bi] is None or canonical_id(row[bi]) == "":
            raise KarmaError(f"{_row_label(path, r)}: empty benchmark name", file=path)
        bench = canonical_id(row[bi])
        if (model, bench) in cells:
            raise KarmaError(
                f"{_row_label(path, r)}: duplicate model {model!r} for benchmark {bench!r} "
                "(ids are case-insensitive, aliases applied)",
                file=path,
                field=MODEL,
                value=row[mi],
            )
        try:
            cells[(model, bench)] = _to_float(row[si])
        except (TypeError, ValueError):
            raise KarmaError(
                f"{_row_label(path, r)} (model {model!r}, benchmark {bench!r}): non-numeric score",
                file=path,
                field="score",
                value=row[si],
                expected="a finite number or an empty cell / NA for missing",
            ) from None
        if model not in models:
            models.append(model)
        if bench not in bench_names:
            bench_names.append(bench)
    values = [[cells.get((m, b)) for b in bench_names] for m in models]
    return models, bench_names, values


# --------------------------------------------------------------------------- merging


def read_measured(path: str | Path) -> dict[str, Any]:
    """Read one measured score row written by the benchmark stage."""
    if not Path(path).is_file():
        raise KarmaError("measured score row not found (run its benchmark stage)", file=path)
    row = read_json(path)
    if "model" not in row:
        raise KarmaError("not a score row", file=path, field="model", expected="{model, scores...}")
    return row


def merge_scores(
    reported: pl.DataFrame | None,
    measured: Sequence[Mapping[str, Any]],
    *,
    scale: float | Mapping[str, float] = 1.0,
    aliases: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Reported table (canonical polars frame: ``model`` + benchmark columns) + measured rows.

    Measured fractions are multiplied by ``scale`` (one number, or per benchmark; absent: 1) to
    match the reported table. Model ids are canonical (stripped, lower-case, ``aliases``
    applied), as :func:`karma.kinship.scores.read_scores` makes them. A measured model that is also
    reported replaces the reported row (logged). Benchmarks missing on either side are null.
    Rows: reported order, then measured; columns: model, reported benchmarks, then new ones.
    """
    alias_map = {canonical_id(k): canonical_id(v) for k, v in (aliases or {}).items()}
    if reported is None:
        reported = pl.DataFrame({MODEL: pl.Series([], dtype=pl.String)})
    if MODEL not in reported.columns:
        raise KarmaError(
            "reported table has no model column", field=MODEL, expected=", ".join(reported.columns)
        )
    benches = [c for c in reported.columns if c != MODEL]
    rows = []
    for row in measured:
        model = canonical_id(row["model"])
        model = alias_map.get(model, model)
        values = {}
        for key, value in row.items():
            if key == "model" or key.startswith("meta."):  # how it was measured, not a score
                continue
            bench = canonical_id(key)
            if bench not in benches:
                benches.append(bench)
            factor = scale.get(bench, 1.0) if isinstance(scale, Mapping) else scale
            values[bench] = None if value is None else float(value) * float(factor)
        rows.append({MODEL: model, **values})
    names = [r[MODEL] for r in rows]
    if len(set(names)) != len(names):
        raise KarmaError("duplicate measured model", field="measured", value=names)
    replaced = sorted(set(names) & set(reported[MODEL].to_list()))
    if replaced:
        log.warning("measured scores replace reported ones for %s", ", ".join(replaced))
    schema = {MODEL: pl.String, **{b: pl.Float64 for b in benches}}
    measured_df = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    kept = (
        reported.lazy()
        .filter(~pl.col(MODEL).is_in(names))
        .with_columns(
            [pl.lit(None, dtype=pl.Float64).alias(b) for b in benches if b not in reported.columns]
        )
        .select(pl.col(MODEL).cast(pl.String), *[pl.col(b).cast(pl.Float64) for b in benches])
    )
    return pl.concat([kept, measured_df.lazy()], how="vertical").collect()


def write_scores(df: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a canonical score frame (wide) as CSV or Parquet, by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        df.write_csv(path)
    elif path.suffix.lower() in (".parquet", ".pq"):
        df.write_parquet(path, statistics=False)
    else:
        raise KarmaError("unsupported output format", file=path, expected=".csv or .parquet")


# --------------------------------------------------------------------------- stage


def check_protocols(
    rows: Mapping[Path, Mapping[str, Any]], reported_protocol: str | None, *, mix: bool = False
) -> None:
    """Refuse a measured row (``{file: row}``) whose ``meta.protocol`` is not the reported
    table's (``reported_protocol``; None: no reported table), unless ``mix``.

    Min-max normalisation across protocols would compare log-likelihood accuracies with
    prompted ones (the paper's table) as if they were the same measurement.
    """
    if reported_protocol is None or mix:
        return
    for path, row in rows.items():
        protocol = row.get("meta.protocol", "unknown")
        if protocol != reported_protocol:
            raise KarmaError(
                f"scored with protocol {protocol!r}, the reported table with "
                f"{reported_protocol!r} (scores.reported_protocol): benchmark it with a "
                f"{reported_protocol} suite (benchmark.suite) or set scores.mix_protocols: true",
                file=path,
                field="meta.protocol",
            )


def row_protocols(
    reported: pl.DataFrame | None,
    rows: Sequence[Mapping[str, Any]],
    reported_protocol: str,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``{model: protocol}`` of the merged table's rows: measured rows' ``meta.protocol``
    (``unknown`` if absent), reported rows ``reported_protocol``."""
    alias_map = {canonical_id(k): canonical_id(v) for k, v in (aliases or {}).items()}
    out = {
        m: reported_protocol for m in (reported[MODEL].to_list() if reported is not None else [])
    }
    for row in rows:
        model = canonical_id(row["model"])
        out[alias_map.get(model, model)] = str(row.get("meta.protocol", "unknown"))
    return out


@dataclass(frozen=True, kw_only=True)
class ScoresPaths:
    """Paths of the ``scores`` stage."""

    measured_dir: Path = input_path("rows of the benchmark stage: <name>.json each", is_dir=True)
    out: Path = output_path("the merged score table", ".csv", ".parquet", ".pq")
    protocols: Path | None = output_path(
        "the protocol of each row of the table: {model: protocol}", ".json", required=False
    )


def run_scores(params: Params, paths: ScoresPaths) -> dict[str, Any]:
    """Stage ``scores``: the reported table + the measured rows -> one canonical table."""
    cfg = params.scores
    pool = params.completions == "pool"  # the pool's measured rows alone: no reported table
    reported = read_scores(cfg.reported, cfg.aliases) if cfg.reported and not pool else None
    names = [n for n, e in cfg.measured.items() if params.completions in as_pool_model(e).modes]
    files = [Path(paths.measured_dir) / f"{name}.json" for name in names]
    rows = [read_measured(f) for f in files]
    check_protocols(
        dict(zip(files, rows, strict=True)),
        cfg.reported_protocol if reported is not None else None,
        mix=cfg.mix_protocols,
    )
    table = merge_scores(reported, rows, scale=cfg.scale, aliases=cfg.aliases)
    write_scores(table, paths.out)
    protocols = row_protocols(reported, rows, cfg.reported_protocol, cfg.aliases)
    if paths.protocols is not None:
        write_json(paths.protocols, protocols)
    return {"models": table.height, "benchmarks": table.width - 1, "measured": len(rows)}


STAGE = Stage(
    name="scores",
    settings=("scores", "completions"),
    paths=ScoresPaths,
    run=run_scores,
    inputs=("scores.reported",),
    help="Measured rows (lm-eval fractions times scores.scale) replace reported rows of the "
    "same model; model ids are canonical (lower case, aliases applied). A measured row scored "
    "with another protocol than the reported table's is refused (scores.mix_protocols).",
)
