"""Self-play rounds, part 3: train policy k on the round's pairs, evaluate it, report the round.

* ``sp_train@r<k>``: the ``train`` stage's objective (``train.method``: dpo, ipo, simpo, orpo,
  kto, sft ...) starting from policy k-1 (round 1: the base), ``selfplay.max_steps`` steps. The
  reference model of a reference objective is ``selfplay.reference_model``: ``previous``
  (policy k-1,
  the model the round starts from) or ``base``; for ``base`` after round 1 the base model's
  log-probs of the round's pairs are precomputed with the ``reference`` stage's code (TRL's
  precompute) and the trainer loads no reference model. Held-out pairs are the
  ``preferences`` stage's test pairs, the same every round, so rounds compare.
* ``sp_evaluate@r<k>``: lm-eval on policy k against the base model's evaluation (paired deltas
  with intervals, ``selfplay.evaluate``), and the round's headline metrics
  (``metrics/selfplay/round_<k>.json``: judge score of the round's samples with its interval,
  pairs made and kept, the objective's held-out metrics, benchmark deltas, weight hashes).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import read_json, read_parquet, write_json
from karma.core.stage import Stage, argument, input_path, output_path, state_path
from karma.selfplay.markers import policy_name, read_marker, round_number, weights_digest
from karma.selfplay.pairs import METRICS_FILE, PAIRS_FILE

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

INACTIVE = "inactive.json"  # the placeholder an inactive round writes in a directory output


def round_params(params: Params, reference: str | None = None) -> Params:
    """``params`` with the round's step budget (``selfplay.max_steps``) and reference mode."""
    train = params.train
    update: dict[str, Any] = {}
    if params.selfplay.max_steps is not None:
        update["trl"] = {**train.trl, "max_steps": params.selfplay.max_steps}
    if reference is not None:
        update["reference"] = reference
    return params.model_copy(update={"train": train.model_copy(update=update)})


@dataclass(frozen=True, kw_only=True)
class TrainPaths:
    """Paths of ``sp_train@r<k>``."""

    round: str = argument("the round k")
    marker: Path = input_path("the round's marker (sp_plan@r<k>)")
    pairs: Path = input_path("sp_select@r<k>'s output directory", is_dir=True)
    previous: Path = input_path("policy k-1 (round 1: the base model)", is_dir=True)
    base: Path = input_path("the base model (reference with selfplay.reference_model: base)",
                            is_dir=True)  # fmt: skip
    eval_data: Path | None = input_path("held-out pairs (the preferences stage's test pairs)",
                                        required=False)  # fmt: skip
    out: Path = output_path("policy k", is_dir=True)
    checkpoints: Path = state_path("resumable checkpoints of the round's training")
    metrics: Path = output_path("the round's training metrics", ".json")


def needs_base_reference(params: Params, k: int) -> bool:
    """Whether round ``k`` trains against the base while starting from policy k-1."""
    from karma.training.objectives import objective

    obj = objective(params.train.method)
    if params.selfplay.reference_model != "base" or k == 1 or not obj.reference:
        return False
    if obj.heldout is None or obj.heldout.tokens != "dpo":  # the precompute is DPO's
        raise KarmaError(
            "a base reference after round 1 is precomputed with TRL's DPO precompute",
            field="selfplay.reference_model", value="base",
            expected=f"previous for train.method {params.train.method} (base: dpo, ipo)",
        )  # fmt: skip
    return True


def run_train(params: Params, paths: TrainPaths) -> dict[str, Any]:
    """Stage ``sp_train@r<k>``."""
    from karma.training import train

    k = round_number(paths.round)
    if not read_marker(paths.marker, k):
        write_json(Path(paths.out) / INACTIVE, {"round": k, "active": False})
        Path(paths.checkpoints).mkdir(parents=True, exist_ok=True)  # DVC needs the output
        metrics: dict[str, Any] = {"round": k, "active": False}
        write_json(paths.metrics, metrics)
        return metrics
    pairs = Path(paths.pairs) / PAIRS_FILE
    with tempfile.TemporaryDirectory(prefix="karma-sp-reference-") as scratch:
        stored = None
        if needs_base_reference(params, k):  # TRL's precompute with the base, then no ref model
            from karma.training.reference import ReferencePaths, run_reference

            stored = Path(scratch) / "reference"
            run_reference(round_params(params), ReferencePaths(
                data=pairs, base=paths.base, eval_data=paths.eval_data, out=stored))  # fmt: skip
        rp = round_params(params, "stored" if stored is not None else None)
        metrics = train.run_train(rp, train.TrainPaths(
            data=pairs, base=paths.previous, out=paths.out, checkpoints=paths.checkpoints,
            eval_data=paths.eval_data, reference_logps=stored, metrics=paths.metrics,
        ))  # fmt: skip
    extra = {"round": k, "active": True, "meta.reference": "base" if k == 1 else
             ("base" if params.selfplay.reference_model == "base" else policy_name(k)),
             "meta.start": policy_name(k)}  # fmt: skip
    metrics.update(extra)
    write_json(paths.metrics, metrics)
    return metrics


# --------------------------------------------------------------------------- evaluate + report


@dataclass(frozen=True, kw_only=True)
class EvaluatePaths:
    """Paths of ``sp_evaluate@r<k>``."""

    round: str = argument("the round k")
    marker: Path = input_path("the round's marker (sp_plan@r<k>)")
    judged: Path = input_path("sp_judge@r<k>'s scored samples")
    pairs: Path = input_path("sp_select@r<k>'s output directory", is_dir=True)
    train_metrics: Path = input_path("sp_train@r<k>'s metrics")
    model: Path = input_path("policy k (sp_train@r<k>)", is_dir=True)
    baseline: Path = input_path("the base model's evaluation (evaluate_base)", is_dir=True)
    out: Path = output_path("lm-eval metrics and per-item scores of policy k", is_dir=True)
    metrics: Path = output_path("the round's headline metrics", ".json")


def judge_summary(judged: pl.DataFrame) -> dict[str, Any]:
    """Mean judge score of the round's samples with its t interval, and the sampler's hash."""
    from karma.core.stats import estimate

    scores = judged["score"].drop_nulls().to_numpy()
    out: dict[str, Any] = {"samples": judged.height, "samples_scored": int(scores.size)}
    if scores.size:
        est = estimate(scores)
        out.update({"judge.mean": est["score"], "judge.ci_low": est["ci_low"],
                    "judge.ci_high": est["ci_high"]})  # fmt: skip
    if judged.height:
        out["meta.sampled_by"] = judged["model"][0]
        out["meta.sampler_weights"] = judged["weights"][0]
    return out


def round_headline(k: int, judged: pl.DataFrame, select: dict[str, Any], train: dict[str, Any],
                   evaluation: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The round's flat headline metrics (what ``dvc exp show`` shows per round)."""
    out: dict[str, Any] = {"round": k, "active": 1, **judge_summary(judged)}
    out["pairs.made"] = select.get("pairs_made")
    out["pairs.kept"] = select.get("pairs_kept")
    for key in ("loss", "train_loss", "steps"):
        if key in train:
            out[f"train.{key}"] = round(float(train[key]), 6)
    for key, value in train.items():
        if key.startswith("heldout.after.") or key == "heldout.n":
            out[key.replace(".after", "")] = round(float(value), 6)
    for key, value in evaluation.items():
        parts = key.split(".")
        if parts[0] == "delta" and len(parts) == 3 and parts[2] in ("score", "ci_low", "ci_high"):
            out[key] = value
    out["meta.method"] = train.get("meta.train_method")
    out["meta.reference"] = train.get("meta.reference")
    return out


def run_evaluate(params: Params, paths: EvaluatePaths) -> dict[str, Any]:
    """Stage ``sp_evaluate@r<k>``."""
    k = round_number(paths.round)
    out = Path(paths.out)
    if not read_marker(paths.marker, k):
        write_json(out / INACTIVE, {"round": k, "active": False})
        metrics: dict[str, Any] = {"round": k, "active": 0}
        write_json(paths.metrics, metrics)
        return metrics
    evaluation: dict[str, Any] = {}
    if params.selfplay.evaluate:
        from karma.evaluation import evaluate

        evaluation = evaluate.run_evaluate(params, evaluate.EvaluatePaths(
            model=paths.model, baseline=paths.baseline, out=out))  # fmt: skip
    else:
        write_json(out / INACTIVE, {"round": k, "evaluated": False})
    judged = read_parquet(paths.judged, "judged samples")
    select = read_json(Path(paths.pairs) / METRICS_FILE)
    metrics = round_headline(k, judged, select, read_json(paths.train_metrics), evaluation)
    metrics["meta.policy_weights"] = weights_digest(paths.model)
    write_json(paths.metrics, metrics)
    return metrics


TRAIN = Stage(
    name="sp_train",
    settings=("train", "seed", "selfplay.reference_model", "selfplay.max_steps"),
    paths=TrainPaths,
    run=run_train,
    help="Self-play round k: train policy k from policy k-1 on the round's selected pairs.",
)
EVALUATE = Stage(
    name="sp_evaluate",
    settings=("evaluate", "selfplay.evaluate"),
    paths=EvaluatePaths,
    run=run_evaluate,
    help="Self-play round k: benchmark policy k against the base; the round's headline metrics.",
)
