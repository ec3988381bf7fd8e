"""Stage ``judge``: every pool completion scored, written as UltraFeedback records.

Reads the ``generate@<name>`` outputs of the pool models active under ``completions: pool`` and
writes

* ``--out``: UltraFeedback-schema JSONL (``instruction``, ``models``, ``completions[].model /
  response / overall_score / fine-grained_score / annotations``, plus ``raw`` scores), which the
  fetch stage turns into the completions the ``preferences`` stage reads unchanged;
* ``--scores``: every raw score, one row per completion and aspect (``status`` ok | missing |
  malformed | out_of_range | failed_generation);
* ``--metrics``: counts (malformed, missing, out of range: excluded, never guessed) and each
  model's mean score.

A completion's ``fine-grained_score`` is the mean of its valid aspect ratings (1-5; null when
none is valid) and ``overall_score`` the same value; a reward model gives its reward to both.
Under ``completions: dataset`` the stage writes empty outputs without loading a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import read_parquet, write_json
from karma.core.stage import Stage, input_path, output_path

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

SCORE_SCHEMA = {
    "prompt_id": pl.String,
    "model": pl.String,
    "sample": pl.Int64,
    "aspect": pl.String,
    "score": pl.Float64,
    "mass": pl.Float64,
    "reply": pl.String,
    "status": pl.String,
}


def read_generations(gen_dir: Path, names: list[str]) -> pl.DataFrame:
    """The pool models' completions (``<dir>/<name>.parquet`` each)."""
    frames = []
    for name in names:
        f = gen_dir / f"{name}.parquet"
        if not f.is_file():
            raise KarmaError("completions not found (run generate@<name>)", file=f)
        frames.append(read_parquet(f, "completions"))
    if not frames:
        raise KarmaError(
            "no pool model generates under completions: pool",
            field="scores.measured",
            expected="entries whose modes include pool",
        )
    return pl.concat(frames, how="vertical")


def judge_llm(params: Params, comps: pl.DataFrame) -> pl.DataFrame:
    """One score row per completion and aspect from the LLM judge."""
    from karma.judging.llm_judge import GenerateJudge, WeightedJudge, judge_message, parse_rating

    cfg = params.judge
    keys = comps.select("prompt_id", "model", "sample", "prompt", "text").rows()
    jobs = [(k, a) for k in keys for a in cfg.aspects]
    rows: list[dict[str, Any]] = []
    if cfg.method == "weighted":
        judge = WeightedJudge(cfg)
        scores = judge.score([judge.prompt(k[3], k[4], a) for k, a in jobs])
        for (k, a), (value, mass) in zip(jobs, scores, strict=True):
            rows.append(
                {
                    "prompt_id": k[0],
                    "model": k[1],
                    "sample": k[2],
                    "aspect": a,
                    "score": value,
                    "mass": mass,
                    "reply": None,
                    "status": "ok",
                }
            )
    else:
        gjudge = GenerateJudge(cfg)
        replies = gjudge.replies([judge_message(k[3], k[4], a) for k, a in jobs])
        for (k, a), reply in zip(jobs, replies, strict=True):
            value, status = parse_rating(reply)
            rows.append(
                {
                    "prompt_id": k[0],
                    "model": k[1],
                    "sample": k[2],
                    "aspect": a,
                    "score": None if value is None else float(value),
                    "mass": None,
                    "reply": reply,
                    "status": status,
                }
            )
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def judge_reward(params: Params, comps: pl.DataFrame) -> pl.DataFrame:
    """One score row per completion from the reward model."""
    from karma.judging.llm_judge import load_reward_model, reward_scores, reward_texts

    cfg = params.judge
    model, tok = load_reward_model(cfg)
    texts = reward_texts(tok, list(zip(comps["prompt"], comps["text"], strict=True)))
    values = reward_scores(model, tok, texts, cfg.batch_size, cfg.max_length)
    return comps.select("prompt_id", "model", "sample").with_columns(
        pl.lit("reward").alias("aspect"),
        pl.Series("score", values, pl.Float64),
        pl.lit(None, pl.Float64).alias("mass"),
        pl.lit(None, pl.String).alias("reply"),
        pl.lit("ok").alias("status"),
    )


def records(comps: pl.DataFrame, scores: pl.DataFrame) -> list[dict[str, Any]]:
    """UltraFeedback records: one per prompt and sample index (one completion per model, as
    the schema requires), completions in pool order."""
    key = ["prompt_id", "model", "sample"]
    per = (
        scores.filter(pl.col("status") == "ok")
        .group_by(key)
        .agg(pl.col("score").mean().alias("mean"), pl.struct("aspect", "score").alias("raw"))
    )
    joined = comps.join(per, on=key, how="left", maintain_order="left")
    out = []
    joined = joined.sort("sample", maintain_order=True)  # sample 0 of every prompt first
    for (pid, sample), group in joined.group_by("prompt_id", "sample", maintain_order=True):
        comp = []
        for r in group.iter_rows(named=True):
            mean = None if r["mean"] is None else round(r["mean"], 6)
            raw = {d["aspect"]: d["score"] for d in (r["raw"] or [])}
            comp.append(
                {
                    "model": r["model"],
                    "response": r["text"],
                    "overall_score": mean,
                    "fine-grained_score": mean,
                    "raw": raw,
                    "logprob_mean": r["logprob_mean"],
                }
            )
        out.append(
            {
                "source": "pool",
                "prompt_id": pid,
                "sample": sample,
                "instruction": group["prompt"][0],
                "models": [c["model"] for c in comp],
                "completions": comp,
            }
        )
    return out


@dataclass(frozen=True, kw_only=True)
class JudgePaths:
    """Paths of the ``judge`` stage."""

    generations: Path = input_path("the generate@<name> outputs: <name>.parquet each", is_dir=True)
    out: Path = output_path("UltraFeedback-schema records (the fetch stage reads them)", ".jsonl")
    scores: Path | None = output_path("every raw score", ".parquet", required=False)
    metrics: Path | None = output_path("counts and per-model mean scores", ".json", required=False)


def run_judge(params: Params, paths: JudgePaths) -> dict[str, Any]:
    """Stage ``judge``."""
    from karma.generation.pool import active

    if params.completions != "pool":
        return _write(
            paths,
            [],
            pl.DataFrame(schema=SCORE_SCHEMA),
            {"skipped": f"completions: {params.completions}"},
        )
    if params.judge.threads is not None:
        import torch

        torch.set_num_threads(params.judge.threads)
    gens = read_generations(Path(paths.generations), active(params.scores.measured, "pool"))
    comps = gens.filter(pl.col("status") == "ok")
    scores = (judge_reward if params.judge.kind == "reward" else judge_llm)(params, comps)
    counts = scores["status"].value_counts()
    count = dict(zip(counts["status"], counts["count"], strict=True))
    recs = records(comps, scores)
    metrics: dict[str, Any] = {
        "judged": comps.height,
        "failed_generations": gens.height - comps.height,
        "scores": scores.height,
        "malformed": int(count.get("malformed", 0)),
        "missing": int(count.get("missing", 0)),
        "out_of_range": int(count.get("out_of_range", 0)),
        "unscored_completions": sum(
            c["overall_score"] is None for r in recs for c in r["completions"]
        ),
        "meta.kind": params.judge.kind,
        "meta.method": params.judge.method,
        "meta.judge": params.judge.model,
    }
    means = scores.filter(pl.col("status") == "ok").group_by("model").agg(pl.col("score").mean())
    for name, value in sorted(means.rows()):
        metrics[f"model.{name}.mean_score"] = round(float(value), 4)
    return _write(paths, recs, scores, metrics)


def _write(
    paths: JudgePaths, recs: list[dict[str, Any]], scores: pl.DataFrame, metrics: dict[str, Any]
) -> dict[str, Any]:
    with Path(paths.out).open("w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
    if paths.scores is not None:
        scores.write_parquet(paths.scores, statistics=False)
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    return metrics


STAGE = Stage(
    name="judge",
    settings=("completions", "judge", "scores.measured"),
    paths=JudgePaths,
    run=run_judge,
    help="Score every pool completion (reward model, or an LLM judge on UltraFeedback's four "
    "aspects: strict parsing or the probability-weighted rating) into UltraFeedback records.",
)
