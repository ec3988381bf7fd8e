"""Self-play rounds, part 2: best-vs-worst pairs of the round's samples, MAP-selected.

For each prompt the sample with the highest judge score is chosen and the one with the lowest
rejected (ties: the lower sample index; a gap <= ``selfplay.min_margin`` or identical texts make
no pair). MAP then ranks the pairs by ``z(judge-score gap) - select.weight * z(|implicit|)``,
where the implicit margin is the sampling policy's *reference-free, length-normalised* log-prob
gap ``logprob_mean(chosen) - logprob_mean(rejected)``, read from the generation rows (no forward
pass), and keeps ``floor(select.ratio * pairs)`` (:func:`karma.selection.select.select`).
Every sample comes from one model (policy k-1), so the pairs are best-vs-worst; KARMA's
kinship pairs need several models and are the ``preferences`` stage's job.

>>> judged = pl.DataFrame({"prompt_id": ["a"] * 3, "prompt": ["q"] * 3, "model": ["base"] * 3,
...     "sample": [0, 1, 2], "text": ["x", "y", "z"], "score": [2.0, 4.5, 1.0],
...     "logprob_mean": [-1.0, -0.5, -2.0], "status": ["ok"] * 3, "round": [1] * 3})
>>> best_worst(judged).select("chosen_sample", "rejected_sample", "margin_logp").row(0)
(1, 2, 1.5)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import read_parquet, write_json
from karma.core.stage import Stage, argument, input_path, output_path
from karma.selfplay.markers import read_marker, round_number

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"  # the kept pairs, what sp_train reads
SCORED_FILE = "scored.parquet"  # every pair with its margins, z-scores, rank and kept flag
METRICS_FILE = "metrics.json"


def _message(role: str, text: pl.Expr) -> pl.Expr:
    return pl.concat_list(pl.struct(pl.lit(role).alias("role"), text.alias("content")))


def best_worst(judged: pl.DataFrame, min_margin: float = 0.0) -> pl.DataFrame:
    """One pair per prompt: the best-scored sample vs the worst (TRL conversational columns)."""
    valid = judged.filter((pl.col("status") == "ok") & pl.col("score").is_not_null())
    cols = ["sample", "text", "score", "logprob_mean"]
    best = valid.sort("score", "sample", descending=[True, False]).group_by(
        "prompt_id", maintain_order=True).first()  # fmt: skip
    worst = valid.sort("score", "sample").group_by("prompt_id", maintain_order=True).first()
    both = best.select("prompt_id", "prompt", "model", "round", *cols).join(
        worst.select("prompt_id", *cols), on="prompt_id", suffix="_r"
    )
    return (
        both.filter(pl.col("score") - pl.col("score_r") > min_margin)
        .filter(pl.col("text") != pl.col("text_r"))
        .sort("prompt_id")
        .select(
            "prompt_id",
            _message("user", pl.col("prompt")).alias("prompt"),
            _message("assistant", pl.col("text")).alias("chosen"),
            _message("assistant", pl.col("text_r")).alias("rejected"),
            pl.col("score").alias("chosen_rating"),
            pl.col("score_r").alias("rejected_rating"),
            pl.col("logprob_mean").alias("chosen_logp_mean"),
            pl.col("logprob_mean_r").alias("rejected_logp_mean"),
            (pl.col("logprob_mean") - pl.col("logprob_mean_r")).alias("margin_logp"),
            pl.col("sample").alias("chosen_sample"),
            pl.col("sample_r").alias("rejected_sample"),
            "model",
            "round",
        )
    )


def map_select(pairs: pl.DataFrame, params: Params, file: object) -> pl.DataFrame:
    """Every pair with MAP's scores and ``kept`` (``selfplay.method``; select's ratio, weight)."""
    from karma.selection.select import select

    config = params.select.model_copy(
        update={"method": params.selfplay.method, "explicit": "rating_gap"}
    )
    implicit = pl.DataFrame({"margin_implicit": pairs["margin_logp"]})
    return select(pairs.drop("margin_logp"), config, seed=params.seed, implicit=implicit,
                  file=file)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SelectPaths:
    """Paths of ``sp_select@r<k>``."""

    round: str = argument("the round k")
    marker: Path = input_path("the round's marker (sp_plan@r<k>)")
    judged: Path = input_path("sp_judge@r<k>'s scored samples")
    out: Path = output_path(f"{PAIRS_FILE} (kept pairs), {SCORED_FILE}, {METRICS_FILE}",
                            is_dir=True)  # fmt: skip


def run_select(params: Params, paths: SelectPaths) -> dict[str, Any]:
    """Stage ``sp_select@r<k>``."""
    k = round_number(paths.round)
    out = Path(paths.out)
    judged = read_parquet(paths.judged, "judged samples")
    if not read_marker(paths.marker, k):
        empty = best_worst(judged.clear())
        empty.write_parquet(out / PAIRS_FILE)
        empty.write_parquet(out / SCORED_FILE)
        metrics: dict[str, Any] = {"round": k, "active": False}
        write_json(out / METRICS_FILE, metrics)
        return metrics
    pairs = best_worst(judged, params.selfplay.min_margin)
    prompts = judged["prompt_id"].n_unique()
    if pairs.height < 2:
        raise KarmaError(f"{pairs.height} pairs from {prompts} prompts: too few to select from",
                         file=paths.judged, field="selfplay.prompt_limit",
                         expected="more prompts, or a larger selfplay.n")  # fmt: skip
    scored = map_select(pairs, params, paths.judged)
    kept = scored.filter(pl.col("kept")).sort("rank")
    kept.write_parquet(out / PAIRS_FILE, statistics=False)
    scored.write_parquet(out / SCORED_FILE, statistics=False)
    metrics = {
        "round": k, "active": True, "prompts": prompts, "pairs_made": pairs.height,
        "pairs_kept": kept.height, "method": params.selfplay.method,
        "judge_gap_mean_kept": round(float(kept["margin_explicit"].mean()), 6),
        "logp_gap_abs_mean_kept": round(float(kept["margin_implicit"].abs().mean() or 0), 6)
        if params.selfplay.method != "none" else None,
    }  # fmt: skip
    write_json(out / METRICS_FILE, metrics)
    return metrics


STAGE = Stage(
    name="sp_select",
    settings=("selfplay.method", "selfplay.min_margin", "select.ratio", "select.weight", "seed"),
    paths=SelectPaths,
    run=run_select,
    help="Self-play round k: best-vs-worst pairs per prompt, MAP-selected with the sampling "
    "policy's reference-free mean log-prob margin.",
)
