"""The one list of pipeline stages: the ``karma`` commands, ``stages/*.py`` and dvc.yaml derive.

A :class:`Wiring` names a stage's :class:`~karma.core.stage.Stage` object (by reference, so this
module imports no stage code) and says how DVC runs it: which path each flag gets, extra data
dependencies, and how an output is declared (out, metric or plot). Everything else is derived
(:mod:`karma.dvcyaml`): the params each stage lists (its tracked settings), its code deps (the
import closure of its module) and its inputs and outputs (from the roles of its paths class).

Adding a stage: write its module with a ``STAGE`` (settings in its family's ``settings.py``), add
one :class:`Wiring` here, then ``karma dvc-yaml --write``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from karma.selfplay.settings import MAX_ROUNDS

#: Paths written once (dvc.yaml ``vars``); wiring refers to them as ``${path.NAME}``.
PATHS: dict[str, str] = {
    "reported_scores": "data/origin/scores.csv",
    "measured": "data/benchmark/measured",
    "benchmark_samples": "data/benchmark/samples",
    "scores": "data/benchmark/scores.csv",
    "protocols": "data/benchmark/protocols.json",
    "kinship": "data/kinship",
    "kinship_plots": "plots/kinship",
    "completions": "data/completions.parquet",
    "prompts": "data/pool/prompts.parquet",
    "generations": "data/pool/generations",
    "judged": "data/pool/completions.jsonl",
    "judge_scores": "data/pool/judge_scores.parquet",
    "preferences": "data/preferences",
    "tau_sweep": "plots/preferences/tau_sweep",
    "preferences_plot": "plots/preferences/pairs.png",
    "base": "models/base",
    "selected": "data/selected",
    "select_plot": "plots/select/margins.png",
    "reference": "data/reference",
    "policy": "models/policy",
    "checkpoints": "checkpoints/train",
    "live": "dvclive/train",
    "base_eval": "data/eval/base",
    "policy_eval": "data/eval/policy",
}


_SP = "data/selfplay/round_${item.round}"
#: The self-play round table (dvc.yaml ``vars``): round k samples with and starts from ``prev``.
SP_ROUNDS: dict[str, dict[str, Any]] = {
    f"r{k}": {"round": k, "prev": PATHS["base"] if k == 1 else f"models/selfplay/policy_{k - 1}"}
    for k in range(1, MAX_ROUNDS + 1)
}
#: Foreach tables written in dvc.yaml (their values are the registry's, never params).
TABLES: dict[str, dict[str, Any]] = {"sp_rounds": SP_ROUNDS}


@dataclass(frozen=True)
class Wiring:
    """How DVC runs one stage.

    ``args``: flag field -> value (``${path.x}``); inputs become deps, outputs outs.
    ``kinds``: output field -> ``(section, options)`` where section is outs | metrics | plots
    (default: ``metrics`` for a field named metrics, cache false; ``outs`` otherwise; persisted
    state is ``outs`` with ``persist: true``). A plot option ``subpath`` declares a path inside
    the output (dvclive's ``plots/metrics``).
    """

    name: str
    ref: str
    help: str
    args: Mapping[str, str]
    deps: tuple[str, ...] = ()
    kinds: Mapping[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    foreach: str | None = None
    param_deps: bool = True  # the stage's params that name input files are deps too
    params: tuple[str, ...] = ()  # extra params entries (per instance: ``scores.measured.${key}``)
    command: str | None = ""  # CLI command name ("" -> name with - for _; None: no command)
    # the command line's flags when not ``args`` (per instance: no params value in a command)
    cmd_args: Mapping[str, str] | None = None
    comment: str = ""

    @property
    def command_name(self) -> str | None:
        return self.name.replace("_", "-") if self.command == "" else self.command


NO_CACHE = {"cache": False}
#: A stage's full flat metrics: a git-tracked output the report reads, not a DVC metric (the
#: ``headline`` stage picks the few that are).
DIAGNOSTIC = ("outs", NO_CACHE)
#: Code lm-eval loads from the task YAML (``!function``), outside the stages' import closure.
TASK_DEPS = (
    "karma/evaluation/tasks",
    "karma/evaluation/ifeval.py",
    "karma/evaluation/extract.py",
    "karma/evaluation/mmlu.py",
)
#: what training reads besides its code: recipe files and TRL's field table
TRAIN_DEPS = ("params/recipes", "karma/training/trl_fields.json")

PIPELINE: tuple[Wiring, ...] = (
    Wiring(
        "benchmark", "karma.evaluation.evaluate:BENCHMARK",
        "Benchmark one model with lm-eval: a score row.",
        {"name": "${key}", "out": "${path.measured}/${key}.json",
         "samples": "${path.benchmark_samples}/${key}.parquet"},
        deps=(*TASK_DEPS, "${path.base}"), foreach="${scores.measured}",
        params=("scores.measured.${key}",),
        cmd_args={"measured_dir": "${path.measured}", "samples_dir": "${path.benchmark_samples}"},
        comment="One instance per model in `scores.measured`: adding a model runs just that model. "
        "No params value is shell text: the command holds fixed paths only; the stage takes its "
        "name from DVC (DVC_STAGE=benchmark@<name>, checked [A-Za-z0-9_-]) and its model from "
        "params. The row records its protocol; the per-item scores stay in the DVC cache.",
    ),
    Wiring(
        "scores", "karma.kinship.scores:STAGE",
        "Merge reported and measured scores into one table.",
        {"measured_dir": "${path.measured}", "out": "${path.scores}",
         "protocols": "${path.protocols}"},
        comment="Depends on the measured dir (kept in git by its .gitkeep): DVC links it to every "
        "benchmark instance whose output lies inside, so it runs after them, and also with none.",
    ),
    Wiring(
        "kinship", "karma.kinship.kinship:STAGE",
        "S_pref, kinship matrix and global kin pairs.",
        {"scores": "${path.scores}", "protocols": "${path.protocols}",
         "out": "${path.kinship}", "plots": "${path.kinship_plots}",
         "metrics": "diagnostics/kinship.json"},
        kinds={"metrics": DIAGNOSTIC},
    ),
    Wiring(
        "prompts", "karma.generation.generate:PROMPTS",
        "The pool's prompt set (a seeded sample).",
        {"out": "${path.prompts}"},
        deps=("data/demo/ultrafeedback_demo.jsonl",), param_deps=False,
        comment="The pool's prompt set (completions: pool): a seeded sample of UltraFeedback "
        "instructions (the embedded demo set, a local file or a hub id at a pinned revision).",
    ),
    Wiring(
        "generate", "karma.generation.generate:STAGE",
        "Completions of one pool model (hf | vllm | openai).",
        {"name": "${key}", "prompts": "${path.prompts}",
         "out": "${path.generations}/${key}.parquet"},
        deps=("${path.base}",), foreach="${scores.measured}",
        params=("scores.measured.${key}",),
        cmd_args={"prompts": "${path.prompts}", "generations_dir": "${path.generations}"},
        comment="One instance per pool model (scores.measured): adding a model runs just its "
        "benchmark and generation and what reads the whole pool. Under completions: dataset "
        "each writes an empty table without loading a model. Derived pool models are built from "
        "the base model. Scale-out: dvc exp run --queue, then dvc queue start -j N.",
    ),
    Wiring(
        "judge", "karma.judging.judge:STAGE",
        "Score pool completions into UltraFeedback records.",
        {"generations": "${path.generations}", "out": "${path.judged}",
         "scores": "${path.judge_scores}", "metrics": "diagnostics/judge.json"},
        deps=("${path.base}",), kinds={"metrics": DIAGNOSTIC},
        comment="Scores every pool completion (the default judge is the base model); depends on "
        "the generations dir (kept in git by its .gitkeep), so it runs after every generate "
        "instance.",
    ),
    Wiring(
        "fetch", "karma.pairing.fetch:STAGE",
        "Fetch completions (hub id, dir or file) into a Parquet.",
        {"out": "${path.completions}", "pool": "${path.judged}"},
        deps=("data/demo/ultrafeedback_demo.jsonl",), param_deps=False,
        comment="The completions as a local Parquet that DVC hashes. The default source is the "
        "embedded demo set (no hub); a real run pins a hub dataset: dvc exp run -S "
        "fetch.dataset=openbmb/UltraFeedback -S fetch.revision=<commit sha> (a pinned revision "
        "is a param, so the fetch re-runs exactly when dataset, revision or split change). With "
        "completions: pool it reads the judge stage's records instead.",
    ),
    Wiring(
        "preferences", "karma.pairing.preferences:STAGE",
        "Pair responses by kinship (or the baselines).",
        {"kinship_dir": "${path.kinship}", "out": "${path.preferences}",
         "metrics": "diagnostics/preferences.json", "plot": "${path.preferences_plot}"},
        kinds={"metrics": DIAGNOSTIC, "plot": ("outs", NO_CACHE)},
    ),
    Wiring(
        "tau_sweep", "karma.pairing.tau_sweep:STAGE",
        "What the kinship threshold does, over a tau grid.",
        {"kinship_dir": "${path.kinship}", "out": "${path.tau_sweep}.csv",
         "plot": "${path.tau_sweep}.png"},
        kinds={"out": ("outs", NO_CACHE), "plot": ("outs", NO_CACHE)},
        comment="What the kinship threshold does on these completions, over a grid of tau.",
    ),
    Wiring(
        "base_model", "karma.models.base_model:STAGE", "Build the base model directory.",
        {"out": "${path.base}"},
    ),
    Wiring(
        "select", "karma.selection.select:STAGE",
        "Select preference pairs by alignment potential (MAP).",
        {"pairs": "${path.preferences}/train_prefs.parquet", "model": "${path.base}",
         "out": "${path.selected}", "metrics": "diagnostics/select.json",
         "plot": "${path.select_plot}"},
        kinds={"metrics": DIAGNOSTIC},
    ),
    Wiring(
        "reference", "karma.training.reference:STAGE",
        "Reference log-probs of the pairs (TRL's precompute), stored once.",
        {"data": "${path.selected}/pairs.parquet", "base": "${path.base}",
         "eval_data": "${path.preferences}/test_prefs.parquet",
         "dev_data": "${path.preferences}/dev_prefs.parquet", "out": "${path.reference}"},
        deps=TRAIN_DEPS,
        comment="The base model's log-probs of the training and held-out pairs (TRL's "
        "precompute), computed once for every reference-model objective and rerun; train "
        "reads them with train.reference: stored (and then loads no reference model).",
    ),
    Wiring(
        "train", "karma.training.train:STAGE",
        "Train a policy with a TRL objective (dpo, ipo, simpo, cpo, orpo, kto, sft).",
        {"data": "${path.selected}/pairs.parquet", "base": "${path.base}",
         "eval_data": "${path.preferences}/test_prefs.parquet",
         "dev_data": "${path.preferences}/dev_prefs.parquet", "out": "${path.policy}",
         "checkpoints": "${path.checkpoints}", "live_dir": "${path.live}",
         "metrics": "diagnostics/train.json", "reference_logps": "${path.reference}"},
        deps=TRAIN_DEPS,
        kinds={"metrics": DIAGNOSTIC,
               "live_dir": ("outs", {"subpath": "plots/metrics", "cache": False})},
        comment="Held-out pairs (no prompt of them is trained on) give the method's own "
        "preference metrics before / after: heldout.* on the test pairs (reported), "
        "dev.heldout.* on the dev pairs (recipes are chosen on them); checkpoints persist, so a "
        "killed run resumes from the last one. The reference stage's log-probs are read only "
        "with train.reference: stored.",
    ),
    Wiring(
        "evaluate_base", "karma.evaluation.evaluate:EVALUATE_BASE",
        "Evaluate the base model with lm-eval.",
        {"model": "${path.base}", "out": "${path.base_eval}"},
        deps=TASK_DEPS, command=None,
        comment="Per-item scores (samples.parquet) stay in the DVC cache.",
    ),
    Wiring(
        "evaluate", "karma.evaluation.evaluate:EVALUATE",
        "Evaluate a model with lm-eval (vs a baseline).",
        {"model": "${path.policy}", "baseline": "${path.base_eval}",
         "out": "${path.policy_eval}", "metrics": "diagnostics/eval.json"},
        deps=TASK_DEPS, kinds={"metrics": DIAGNOSTIC},
        comment="diagnostics/eval.json: base.*, policy.*, delta.* (paired interval, exact test, "
        "Holm-adjusted p), the paper's Total, meta.*.",
    ),
    Wiring(
        "headline", "karma.report.headline:STAGE",
        "The headline metrics (dvc exp show) from the diagnostics.",
        {"diagnostics": "diagnostics", "out": "metrics/headline.json"},
        kinds={"out": ("metrics", NO_CACHE)},
        comment="What a reviewer compares (at most ~40 keys): per benchmark the policy score, its "
        "paired delta with interval and Holm-adjusted significance, the paper's Total, held-out "
        "metrics (test; dev: dev.reward_margin*), pairs. The only DVC metrics file; every "
        "stage's full metrics are diagnostics.",
    ),
    *(
        Wiring(
            f"sp_{step}", ref, help, args, deps=deps, foreach="${sp_rounds}", kinds=kinds,
            comment=comment,
        )
        for step, ref, help, args, deps, kinds, comment in (
            ("plan", "karma.selfplay.rounds:PLAN", "Self-play: round k's marker (k <= rounds).",
             {"round": "${item.round}", "out": f"{_SP}/plan.json"}, (), {},
             "MAP self-play (karma/selfplay), unrolled for MAX_ROUNDS rounds (vars sp_rounds): "
             "round k depends on its own marker, never on `rounds`, so rounds above `rounds` are "
             "cached no-ops writing placeholders and raising `rounds` runs only the new rounds."),
            ("generate", "karma.selfplay.rounds:GENERATE", "Self-play: policy k-1 samples.",
             {"round": "${item.round}", "marker": f"{_SP}/plan.json", "model": "${item.prev}",
              "prompts": "${path.prompts}", "out": f"{_SP}/samples.parquet"}, (), {}, ""),
            ("judge", "karma.selfplay.rounds:JUDGE", "Self-play: judge the round's samples.",
             {"round": "${item.round}", "marker": f"{_SP}/plan.json",
              "samples": f"{_SP}/samples.parquet", "out": f"{_SP}/judged.parquet",
              "scores": f"{_SP}/judge_scores.parquet"}, ("${path.base}",), {}, ""),
            ("select", "karma.selfplay.pairs:STAGE", "Self-play: best-vs-worst pairs, MAP.",
             {"round": "${item.round}", "marker": f"{_SP}/plan.json",
              "judged": f"{_SP}/judged.parquet", "out": f"{_SP}/select"}, (), {}, ""),
            ("train", "karma.selfplay.policy:TRAIN", "Self-play: train policy k from k-1.",
             {"round": "${item.round}", "marker": f"{_SP}/plan.json", "pairs": f"{_SP}/select",
              "previous": "${item.prev}", "base": "${path.base}",
              "eval_data": "${path.preferences}/test_prefs.parquet",
              "out": "models/selfplay/policy_${item.round}",
              "checkpoints": "checkpoints/selfplay/round_${item.round}",
              "metrics": f"{_SP}/train.json"}, TRAIN_DEPS,
             {"metrics": ("outs", {})}, ""),
            ("evaluate", "karma.selfplay.policy:EVALUATE", "Self-play: evaluate policy k.",
             {"round": "${item.round}", "marker": f"{_SP}/plan.json",
              "judged": f"{_SP}/judged.parquet", "pairs": f"{_SP}/select",
              "train_metrics": f"{_SP}/train.json",
              "model": "models/selfplay/policy_${item.round}",
              "baseline": "${path.base_eval}", "out": f"{_SP}/eval",
              "metrics": "metrics/selfplay/round_${item.round}.json"},
             TASK_DEPS, {},
             "metrics/selfplay/round_<k>.json: the round's judge score, pairs made and kept, "
             "held-out metrics, benchmark deltas with intervals, weight hashes."),
        )
    ),
)  # fmt: skip

#: Top-level ``plots:`` of dvc.yaml: only plottable files, each with its template and axes (the
#: PNGs are drawn as images). The MAP margin scatter is left out: the default run selects
#: nothing, and ``karma report`` shows it when a run does.
PLOTS: tuple[str | tuple[str, dict[str, Any]], ...] = (
    "plots/kinship/kinship_heatmap.png",
    "plots/kinship/pca.png",
    "plots/kinship/dendrogram_all.png",
    "plots/preferences/pairs.png",
    "plots/preferences/tau_sweep.png",
    ("training loss", {"template": "linear", "x": "step",
                       "y": {"dvclive/train/plots/metrics/loss.tsv": "loss"}}),
    ("reward accuracy (training batches)", {"template": "linear", "x": "step",
     "y": {"dvclive/train/plots/metrics/rewards/accuracies.tsv": "accuracies"}}),
    ("reward margin (training batches)", {"template": "linear", "x": "step",
     "y": {"dvclive/train/plots/metrics/rewards/margins.tsv": "margins"}}),
)  # fmt: skip


def wiring(name: str) -> Wiring:
    """The wiring of stage ``name``."""
    for w in PIPELINE:
        if w.name == name:
            return w
    raise KeyError(name)


def commands() -> dict[str, tuple[str, str]]:
    """CLI command name -> (stage ref, short help), in pipeline order."""
    return {w.command_name: (w.ref, w.help) for w in PIPELINE if w.command_name}
