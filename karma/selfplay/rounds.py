"""Self-play rounds, part 1: the plan markers and the round's samples and judgments.

Round k (``sp_<step>@r<k>`` in ``dvc.yaml``) depends on its own marker (``sp_plan@r<k>``:
``{"round": k, "active": k <= rounds}``), never on ``rounds`` itself, so ``-S rounds=2`` ->
``rounds=3`` reruns only round 3: the markers of rounds 1-2 keep their bytes. An inactive round's
stages write constant placeholders without loading a model (cheap no-ops that DVC caches).

* ``sp_generate@r<k>``: policy k-1 (round 1: the base model) samples ``selfplay.n`` completions
  for each of the first ``selfplay.prompt_limit`` prompts of the ``prompts`` stage, through the
  generation engines of :mod:`karma.generation` (``generate.engine``: hf on CPU, vllm on GPU);
  each row records the model that wrote it (``base`` or ``policy_<k-1>``) and its weights hash,
  and the summed and mean token log-probabilities MAP's implicit margin needs.
* ``sp_judge@r<k>``: the judge of :mod:`karma.judging` (``judge`` section: reward model or LLM
  judge) scores every sample; ``score`` is the mean of its valid ratings (null: none valid).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import read_parquet
from karma.core.stage import Stage, argument, input_path, output_path
from karma.selfplay.markers import policy_name, read_marker, round_number, weights_digest

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

#: what each round's samples add to the generation rows
SAMPLE_EXTRA = {"round": pl.Int64, "weights": pl.String}
JUDGED_EXTRA = {"score": pl.Float64, "ratings": pl.Int64}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, kw_only=True)
class PlanPaths:
    """Paths of ``sp_plan@r<k>``."""

    round: str = argument("the round k (1..max rounds)")
    out: Path = output_path('the marker {"round": k, "active": k <= rounds}', ".json")


def run_plan(params: Params, paths: PlanPaths) -> dict[str, Any]:
    """Stage ``sp_plan@r<k>``: the round's marker (its bytes change only with its activity)."""
    k = round_number(paths.round)
    marker = {"round": k, "active": k <= params.rounds}
    Path(paths.out).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return marker


# --------------------------------------------------------------------------- generate


def generation_settings(params: Params, k: int) -> Any:
    """The ``generate`` section with the self-play sampling settings of round ``k``."""
    from karma.generation.settings import GenerateConfig

    sp = params.selfplay
    return GenerateConfig.model_validate({
        **params.generate.model_dump(), "n": sp.n, "temperature": sp.temperature,
        "top_p": sp.top_p, "max_new_tokens": sp.max_new_tokens, "seed": sp.seed + k,
    })  # fmt: skip


def sample_schema() -> dict[str, Any]:
    """Columns of ``sp_generate``'s output: the generation rows plus round and weights hash."""
    from karma.generation.generate import SCHEMA

    return {**SCHEMA, **SAMPLE_EXTRA}


@dataclass(frozen=True, kw_only=True)
class GeneratePaths:
    """Paths of ``sp_generate@r<k>``."""

    round: str = argument("the round k")
    marker: Path = input_path("the round's marker (sp_plan@r<k>)")
    model: Path = input_path("policy k-1 (round 1: the base model)", is_dir=True)
    prompts: Path = input_path("the prompts stage's Parquet")
    out: Path = output_path("the round's samples, one row each", ".parquet")


def run_generate(params: Params, paths: GeneratePaths) -> dict[str, Any]:
    """Stage ``sp_generate@r<k>``."""
    from karma.generation.generate import PROMPT_SCHEMA, generate_all, resume_dir
    from karma.generation.settings import PoolModel

    k = round_number(paths.round)
    if not read_marker(paths.marker, k):
        pl.DataFrame(schema=sample_schema()).write_parquet(paths.out, statistics=False)
        return {"round": k, "active": False}
    prompts = read_parquet(paths.prompts, "prompt set").select(list(PROMPT_SCHEMA))
    if params.selfplay.prompt_limit is not None:
        prompts = prompts.head(params.selfplay.prompt_limit)
    if prompts.height == 0:
        raise KarmaError("empty prompt set", file=paths.prompts, expected="prompts")
    cfg = generation_settings(params, k)
    entry = PoolModel(model=str(paths.model))
    name = policy_name(k)
    resume = resume_dir(entry, cfg, paths.prompts) / f"first-{prompts.height}"
    frame = generate_all(entry, cfg, prompts, name, resume)
    frame = frame.with_columns(pl.lit(k, pl.Int64).alias("round"),
                               pl.lit(weights_digest(paths.model)).alias("weights"))  # fmt: skip
    frame.write_parquet(paths.out, statistics=False)
    ok = frame.filter(pl.col("status") == "ok")
    return {"round": k, "active": True, "model": name, "samples": frame.height,
            "failed": frame.height - ok.height,
            "mean_tokens": round(float(ok["tokens"].mean() or 0), 3)}  # fmt: skip


# --------------------------------------------------------------------------- judge


@dataclass(frozen=True, kw_only=True)
class JudgePaths:
    """Paths of ``sp_judge@r<k>``."""

    round: str = argument("the round k")
    marker: Path = input_path("the round's marker (sp_plan@r<k>)")
    samples: Path = input_path("sp_generate@r<k>'s samples")
    out: Path = output_path("the samples with their judge score", ".parquet")
    scores: Path = output_path("every raw judge score (one row per sample and aspect)",
                               ".parquet")  # fmt: skip


def judged_scores(params: Params, comps: pl.DataFrame) -> pl.DataFrame:
    """Raw judge scores of ``comps`` (the judge section: reward model or LLM judge)."""
    from karma.judging.judge import judge_llm, judge_reward

    return (judge_reward if params.judge.kind == "reward" else judge_llm)(params, comps)


def run_judge(params: Params, paths: JudgePaths) -> dict[str, Any]:
    """Stage ``sp_judge@r<k>``."""
    from karma.judging.judge import SCORE_SCHEMA

    k = round_number(paths.round)
    samples = read_parquet(paths.samples, "self-play samples")
    if not read_marker(paths.marker, k):
        pl.DataFrame(schema={**sample_schema(), **JUDGED_EXTRA}).write_parquet(paths.out)
        pl.DataFrame(schema=SCORE_SCHEMA).write_parquet(paths.scores)
        return {"round": k, "active": False}
    comps = samples.filter(pl.col("status") == "ok")
    if comps.height == 0:
        raise KarmaError("no sample to judge", file=paths.samples, expected="ok samples")
    scores = judged_scores(params, comps)
    key = ["prompt_id", "model", "sample"]
    per = (
        scores.filter(pl.col("status") == "ok")
        .group_by(key)
        .agg(pl.col("score").mean().alias("score"), pl.len().cast(pl.Int64).alias("ratings"))
    )
    judged = samples.join(per, on=key, how="left", maintain_order="left").with_columns(
        pl.col("ratings").fill_null(0)
    )
    judged.write_parquet(paths.out, statistics=False)
    scores.write_parquet(paths.scores, statistics=False)
    valid = judged["score"].drop_nulls()
    return {"round": k, "active": True, "judged": comps.height,
            "unscored": judged.height - valid.len(),
            "mean_score": None if valid.len() == 0 else round(float(valid.mean()), 6),
            "meta.judge": params.judge.model, "meta.kind": params.judge.kind}  # fmt: skip


PLAN = Stage(
    name="sp_plan",
    settings=("rounds",),
    paths=PlanPaths,
    run=run_plan,
    help="Self-play: round k's marker (active when k <= rounds).",
)
GENERATE = Stage(
    name="sp_generate",
    settings=(
        "selfplay.n",
        "selfplay.prompt_limit",
        "selfplay.temperature",
        "selfplay.top_p",
        "selfplay.max_new_tokens",
        "selfplay.seed",
        "generate.engine",
        "generate.stop",
        "generate.batch_size",
        "generate.dtype",
        "generate.max_failed",
        "generate.device",
        "generate.threads",
    ),
    paths=GeneratePaths,
    run=run_generate,
    help="Self-play round k: policy k-1 samples selfplay.n completions per prompt.",
)
JUDGE = Stage(
    name="sp_judge",
    settings=("judge",),
    paths=JudgePaths,
    run=run_judge,
    help="Self-play round k: the judge scores every sample.",
)
