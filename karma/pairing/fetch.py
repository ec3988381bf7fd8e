"""Stage ``fetch``: the completions as a local Parquet that DVC tracks.

A hub dataset id (``openbmb/UltraFeedback`` at a pinned ``revision``) cannot be a DVC
dependency; its fetched copy can. The stage reads ``fetch.dataset`` (a hub id, a local dataset
directory, both through ``datasets.load_dataset``, or a local .jsonl/.json/.parquet file through
:func:`karma.pairing.ultrafeedback.read_ultrafeedback`), validates it as UltraFeedback records and
writes the columns the preferences stage reads (``source``, ``instruction``, ``completions`` =
``[{model, response, overall_score, fine-grained_score}]``, ratings parsed to numbers: "N/A" is
null). Parquet key-value metadata ``karma.fetch`` records the source (dataset, revision,
split, license), which the preferences stage's dataset card states.

The default source is the embedded demo set, so the default pipeline needs no hub.

>>> license_of("openbmb/UltraFeedback"), license_of("data/demo/ultrafeedback_demo.jsonl")
('mit', 'apache-2.0')
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import cache_root
from karma.core.stage import Stage, input_path, output_path
from karma.pairing.source import META_KEY, license_of
from karma.pairing.ultrafeedback import HUB_ID, UltraFeedback, from_frame, read_ultrafeedback
from karma.pairing.writers import write_table

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{40}$")


def records_frame(data: UltraFeedback) -> pl.DataFrame:
    """UltraFeedback records with only the columns the preferences stage reads."""
    comps = (
        data.completions.sort("row", "pos")
        .group_by("row", maintain_order=True)
        .agg(
            pl.struct(
                "model",
                "response",
                "overall_score",
                pl.col("fine_grained_score").alias("fine-grained_score"),
            ).alias("completions")
        )
    )
    frame = data.prompts.join(comps, on="row", how="left", maintain_order="left")
    empty = pl.lit([], dtype=frame.schema["completions"])
    return frame.select(
        "source", "instruction", pl.col("completions").fill_null(empty).alias("completions")
    )


def write_records(data: UltraFeedback, info: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as Parquet with the ``karma.fetch`` record (byte-deterministic)."""
    import pyarrow as pa

    table = records_frame(data).to_arrow(compat_level=pl.CompatLevel.oldest())
    schema = pa.schema(
        [
            ("source", pa.string()),
            ("instruction", pa.string()),
            ("completions", pa.list_(pa.struct([
                ("model", pa.string()), ("response", pa.string()),
                ("overall_score", pa.float64()), ("fine-grained_score", pa.float64()),
            ]))),
        ],
        metadata={META_KEY: json.dumps(info, sort_keys=True).encode()},
    )  # fmt: skip
    write_table(table.cast(schema).replace_schema_metadata(schema.metadata), path)


#: What ``datasets.load_dataset`` reads from a local directory.
DATA_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv"}


def _load(dataset: str, revision: str | None, split: str) -> tuple[UltraFeedback, str | None]:
    """Read through ``datasets.load_dataset``: (records, license of its card or None)."""
    import datasets

    log.debug("loading %s (revision %s, split %s) with datasets", dataset, revision, split)
    local = Path(dataset).is_dir()
    try:  # its cache under KARMA_CACHE_DIR, as every karma cache
        ds = datasets.load_dataset(dataset, revision=revision, split=split,
                                   cache_dir=str(cache_root("datasets")))  # fmt: skip
    except Exception as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise KarmaError(
            f"cannot {'read' if local else 'fetch'} the dataset: {type(err).__name__}: {reason}",
            file=dataset,
            expected=f"the split {split!r} in its data files"
            if local
            else "the hub reachable "
            "(offline? no network, or HF_HUB_OFFLINE set) and the id, revision and split to exist",
        ) from None
    keep = [c for c in ("source", "instruction", "completions") if c in ds.column_names]
    frame = pl.from_arrow(ds.select_columns(keep).data.table)
    assert isinstance(frame, pl.DataFrame)
    return from_frame(frame, file=dataset), (ds.info.license or None)


def fetch(dataset: str, *, revision: str | None = None, split: str = "train") -> tuple[
    UltraFeedback, dict[str, Any]
]:  # fmt: skip
    """Read ``dataset`` (hub id, local dataset directory or file): (records, source record)."""
    path = Path(dataset)
    if path.is_file():
        data, found = read_ultrafeedback(path), None
    elif path.is_dir():
        if not any(f.suffix in DATA_SUFFIXES for f in path.rglob("*") if f.is_file()):
            raise KarmaError("local dataset directory holds no data files", file=path,
                             field="fetch.dataset",
                             expected=" / ".join(sorted(DATA_SUFFIXES)) + " files")  # fmt: skip
        data, found = _load(str(path), revision, split)
    elif HUB_ID.match(dataset) and not path.suffix:
        if revision is None:
            raise KarmaError(
                "a hub dataset needs a pinned revision",
                field="fetch.revision",
                expected=f"the commit sha of {dataset} to fetch (its page: Files and versions)",
            )
        if not _SHA.match(revision):
            log.warning("fetch.revision %r is not a commit sha: the data may change under it",
                        revision)  # fmt: skip
        data, found = _load(dataset, revision, split)
    else:
        raise KarmaError(
            "dataset not found",
            file=dataset,
            field="fetch.dataset",
            expected="a hub id (owner/name), a local dataset directory or a "
            ".jsonl/.json/.parquet file",
        )
    info = {
        "dataset": dataset,
        "revision": revision,
        "split": split,
        "license": license_of(dataset, found),
        "records": len(data),
        "completions": data.completions.height,
    }
    return data, info


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, kw_only=True)
class FetchPaths:
    """Paths of the ``fetch`` stage (the source is ``fetch.dataset``, or with
    ``completions: pool`` the judge stage's records)."""

    out: Path = output_path("the completions as Parquet (UltraFeedback records)", ".parquet")
    pool: Path | None = input_path(
        "the judge stage's records, read instead of fetch.dataset when completions: pool",
        required=False,
    )


def run_fetch(params: Params, paths: FetchPaths) -> dict[str, Any]:
    """Stage ``fetch``: read the source, write the local Parquet."""
    cfg = params.fetch
    if params.completions == "pool":
        if paths.pool is None:
            raise KarmaError("completions: pool needs the judge's records", field="--pool")
        data, info = fetch(str(paths.pool))
        info["license"] = "the pool models' licenses"
    else:
        data, info = fetch(cfg.dataset, revision=cfg.revision, split=cfg.split)
    write_records(data, info, paths.out)
    log.info("fetched %d records (%d completions) from %s", info["records"],
             info["completions"], info["dataset"])  # fmt: skip
    return info


STAGE = Stage(
    name="fetch",
    settings=("fetch", "completions"),
    paths=FetchPaths,
    run=run_fetch,
    inputs=("fetch.dataset",),
    help="Fetch UltraFeedback-schema completions (a hub id at a pinned revision, a local "
    "dataset directory or file; default: the embedded demo set) into a local Parquet that DVC "
    "tracks and the preferences stage reads.",
)
