"""Stage ``reference``: the reference model's log-probs of the training and held-out pairs,
computed once with TRL's own precompute (``DPOTrainer(precompute_ref_log_probs=True)``) and
stored as a DVC output.

The stage does not depend on the objective, so every reference-model objective of the DPO
family (``dpo``, ``ipo``) reuses it, and a rerun that changes only the objective, the learning
rate schedule or the seed's training order does not score the pairs again (DVC keeps it).
``train.reference: stored`` makes the train stage read them (``--reference-logps``): its TRL
trainer then takes them as precomputed reference log-probs and no reference model is loaded.

Each row is keyed by a hash of its pair's text (:func:`pair_keys`), so stored log-probs can
only be attached to the very pairs they were computed on (a missing key fails in one line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karma.core.errors import KarmaError
from karma.core.io import tree_digest, write_json
from karma.core.lm import load_causal_lm
from karma.core.stage import Stage, input_path, output_path
from karma.training.data import has_rows, load_pairs
from karma.training.settings import TrainConfig
from karma.training.trl_config import apply_recipe, build_trl_config

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

KEY = "pair_sha"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: File of each split in the stage's output directory (TRL's names of the datasets; ``dev``:
#: the dev pairs, which the train stage scores in one held-out set with the test pairs).
SPLITS = {"train": "train.parquet", "eval": "test.parquet", "dev": "dev.parquet"}


def pair_keys(dataset: Any) -> list[str]:
    """A hash of each pair's prompt, chosen and rejected messages (row order kept)."""
    keys = []
    for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True):
        blob = json.dumps([p, c, r], sort_keys=True, ensure_ascii=False).encode()
        keys.append(hashlib.sha256(blob).hexdigest()[:32])
    return keys


def with_keys(dataset: Any) -> Any:
    """``dataset`` (paired) with the :data:`KEY` column."""
    return dataset.add_column(KEY, pair_keys(dataset))


def read_stored(directory: str | Path) -> dict[str, dict[str, tuple[float, float]]]:
    """``{split: {pair key: (ref chosen, ref rejected)}}`` of a reference stage output."""
    import polars as pl

    out: dict[str, dict[str, tuple[float, float]]] = {}
    for split, name in SPLITS.items():
        path = Path(directory) / name
        if not path.is_file():
            continue
        frame = pl.read_parquet(path)
        rows = zip(frame[KEY], frame[REF_COLUMNS[0]], frame[REF_COLUMNS[1]], strict=True)
        out[split] = {k: (c, r) for k, c, r in rows}
    if "train" not in out:
        raise KarmaError("no stored reference log-probs", file=Path(directory) / SPLITS["train"],
                         expected="the reference stage's output directory")  # fmt: skip
    return out


def attach(dataset: Any, stored: dict[str, tuple[float, float]], where: object) -> Any:
    """``dataset`` (with :data:`KEY`) plus the stored reference columns, row by row."""
    missing = [k for k in dataset[KEY] if k not in stored]
    if missing:
        raise KarmaError(
            f"no stored reference log-probs for {len(missing)} of {len(dataset)} pairs",
            file=where,
            expected="the reference stage run on these pairs (dvc repro reference)",
        )
    values = [stored[k] for k in dataset[KEY]]
    dataset = dataset.add_column(REF_COLUMNS[0], [v[0] for v in values])
    return dataset.add_column(REF_COLUMNS[1], [v[1] for v in values])


def stored_trainer(cls: type, stored: dict[str, dict[str, tuple[float, float]]], where: object
                   ) -> type:  # fmt: skip
    """``cls`` (a TRL trainer with ``_precompute_ref_logps``) whose precompute attaches the
    stored log-probs instead of running the reference model."""

    class StoredReference(cls):  # type: ignore[misc, valid-type]
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            # the held-out set holds the test and the dev pairs (keys are content hashes)
            parts = [name] if name != "eval" else ["eval", "dev"]
            if not any(p in stored for p in parts):
                raise KarmaError(f"no stored reference log-probs of the {name} pairs", file=where)
            table = {k: v for p in parts for k, v in stored.get(p, {}).items()}
            return attach(dataset, table, where)

    StoredReference.__name__ = cls.__name__
    return StoredReference


@dataclass(frozen=True, kw_only=True)
class ReferencePaths:
    """Paths of the ``reference`` stage."""

    data: Path = input_path("preference pairs to train on (the select stage's pairs.parquet)")
    base: Path = input_path("the reference model directory (the base model)", is_dir=True)
    eval_data: Path | None = input_path("held-out preference pairs (test_prefs.parquet)",
                                        required=False)  # fmt: skip
    dev_data: Path | None = input_path("dev preference pairs (dev_prefs.parquet)",
                                       required=False)  # fmt: skip
    out: Path = output_path(f"{', '.join(SPLITS.values())}: {KEY}, {', '.join(REF_COLUMNS)} per "
                            "pair; meta.json", is_dir=True)  # fmt: skip


def run_reference(params: Params, paths: ReferencePaths) -> dict[str, Any]:
    """Stage ``reference``: TRL's precompute of the reference log-probs, written per split."""
    import polars as pl
    from trl import DPOTrainer

    train = params.train  # the declared keys only: the objective and its schedule do not matter
    out = Path(paths.out)

    cfg = apply_recipe(TrainConfig(method="dpo", trl=train.trl, recipe=train.recipe,
                                   dtype=train.dtype, global_batch_size=None))  # fmt: skip
    scratch = tempfile.TemporaryDirectory(prefix="karma-reference-")
    args = build_trl_config(cfg, seed=params.seed, output_dir=scratch.name, world_size=1)
    args.precompute_ref_log_probs = True
    data = {"train": with_keys(load_pairs(paths.data, "paired"))}
    for split, f in (("eval", paths.eval_data), ("dev", paths.dev_data)):
        if f is not None and has_rows(f):
            data[split] = with_keys(load_pairs(f, "paired"))
    model, tok = load_causal_lm(paths.base, dtype=cfg.dtype)
    held = {k: v for k, v in data.items() if k != "train"}  # each precomputed by its name
    trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"],
                         eval_dataset=held or None, processing_class=tok)  # fmt: skip
    done = {"train": trainer.train_dataset, **(trainer.eval_dataset or {})}
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    for split in data:
        frame = pl.DataFrame(
            {c: done[split][c] for c in (KEY, *REF_COLUMNS)},
            schema={KEY: pl.String, **dict.fromkeys(REF_COLUMNS, pl.Float32)},
        )
        frame.write_parquet(out / SPLITS[split])
        metrics[f"{split}.pairs"] = frame.height
        metrics[f"{split}.dropped"] = len(data[split]) - frame.height  # prompt over max_length
    write_json(out / "meta.json", {
        "base": tree_digest(paths.base, memo=True), "max_length": args.max_length,
        "truncation_mode": args.truncation_mode, "dtype": cfg.dtype, **metrics,
    })  # fmt: skip
    scratch.cleanup()
    log.info("reference log-probs: %s", metrics)
    return metrics


def run_reference_stage(params: Params, paths: ReferencePaths) -> dict[str, Any]:
    """Stage ``reference``: :func:`run_reference`, or with ``train.reference: live`` (nothing
    reads them) empty tables, no model loaded."""
    import polars as pl

    if params.train.reference != "live":
        return run_reference(params, paths)
    out = Path(paths.out)
    out.mkdir(parents=True, exist_ok=True)
    schema = {KEY: pl.String, **dict.fromkeys(REF_COLUMNS, pl.Float32)}
    for name in SPLITS.values():
        pl.DataFrame(schema=schema).write_parquet(out / name)
    write_json(out / "meta.json", {"skipped": "train.reference is live"})
    return {"skipped": 1}


STAGE = Stage(
    name="reference",
    settings=("train.trl", "train.recipe", "train.dtype", "train.reference", "seed"),
    paths=ReferencePaths,
    run=run_reference_stage,
    help="The base model's log-probs of the training and held-out pairs (TRL's precompute), "
    "stored once for every reference-model objective (train.reference: stored; with live, "
    "empty tables: nothing reads them, no model is loaded).",
)
