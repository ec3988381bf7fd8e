"""The root of ``params.yaml``: one section per stage family, composed from their settings.

Each section is declared in its family's ``settings.py``; this module puts them together and
binds the generic machinery of :mod:`karma.core.settings` to the root.

>>> p = Params()
>>> p.kinship, p.select.ratio, p.similarity.tau
('score', 0.4, 0.1)
>>> Params.model_validate({"select": {"ratio": 0}})  # doctest: +ELLIPSIS
Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from karma.core import settings
from karma.core.errors import KarmaError
from karma.core.settings import PARAMS_FILE, LimitsConfig, Section, setting
from karma.evaluation.settings import BenchmarkConfig, EvaluateConfig
from karma.generation.settings import Completions, GenerateConfig, PromptsConfig
from karma.judging.settings import JudgeConfig
from karma.kinship.settings import ScoresConfig, SimilarityConfig
from karma.models.settings import BaseModelConfig
from karma.pairing.settings import (
    STRATEGY_HELP,
    FetchConfig,
    PreferencesConfig,
    Strategy,
    SweepConfig,
)
from karma.selection.settings import SelectConfig
from karma.training.settings import TrainConfig


class Params(Section):
    """The whole ``params.yaml``: two top-level keys and one section per stage."""

    kinship: Strategy = setting("score", STRATEGY_HELP)
    seed: int = setting(0, "one seed for every random choice in the pipeline", ge=0, lt=2**63)
    completions: Completions = setting(
        "dataset", "dataset (fetch: UltraFeedback-schema completions) | pool (the pool in "
        "scores.measured generates and the judge scores); dvc exp run -S completions=pool"
    )  # fmt: skip
    benchmark: BenchmarkConfig = setting(BenchmarkConfig, "stage benchmark@<name>")
    scores: ScoresConfig = setting(ScoresConfig, "stage scores")
    similarity: SimilarityConfig = setting(SimilarityConfig, "stage kinship")
    prompts: PromptsConfig = setting(PromptsConfig, "stage prompts")
    generate: GenerateConfig = setting(GenerateConfig, "stage generate@<name>")
    judge: JudgeConfig = setting(JudgeConfig, "stage judge")
    fetch: FetchConfig = setting(FetchConfig, "stage fetch")
    preferences: PreferencesConfig = setting(PreferencesConfig, "stage preferences")
    sweep: SweepConfig = setting(SweepConfig, "stage tau_sweep")
    base_model: BaseModelConfig = setting(BaseModelConfig, "stage base_model")
    select: SelectConfig = setting(SelectConfig, "stage select")
    train: TrainConfig = setting(TrainConfig, "stage train")
    evaluate: EvaluateConfig = setting(EvaluateConfig, "stages evaluate_base and evaluate")
    limits: LimitsConfig = setting(LimitsConfig, "input limits of every stage (operational)")


#: Keys of the earlier layout and where they live now (named in the error for an old file).
MOVED = {
    "benchmark.reported": "scores.reported",
    "benchmark.measured": "scores.measured",
    "benchmark.scale": "scores.scale",
    "similarity.aliases": "scores.aliases",
    "benchmark.cache_dir": "benchmark.cache",
    "evaluate.cache_dir": "evaluate.cache",
    "benchmark.embedded": "karma/evaluation/tasks/suites.yaml (benchmark.suite, benchmark.tasks)",
    "evaluate.embedded": "karma/evaluation/tasks/suites.yaml (evaluate.suite, evaluate.tasks)",
    "select.beta": "select.weight (the MAP authors' w)",
}

# --------------------------------------------------------------------------- field lookup


def field_at(key: str) -> tuple[type[Section], str] | None:
    """``(model, field name)`` of a dotted params key (``select.ratio``), or None."""
    return settings.field_at(Params, key)


def field_info(key: str) -> Any:
    """The pydantic FieldInfo of a dotted params key (which must exist)."""
    found = field_at(key)
    if found is None:
        raise KarmaError("not a params key", field=key)
    return found[0].model_fields[found[1]]


def build_params(
    file: str | Path | None = None,
    overrides: list[tuple[str, Any, str]] = (),  # type: ignore[assignment]
) -> Params:
    """Params from the defaults, then ``file`` (if given), then ``overrides`` (see core)."""
    return settings.build(Params, MOVED, file, overrides)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a whole params file."""
    return build_params(path)


def with_source(err: KarmaError, source: Any) -> KarmaError:
    """``err`` naming the flag or params file of its field, when that field is a params key."""
    return settings.with_source(err, source, Params)


def defaults_yaml() -> str:
    """The default ``params.yaml``, every key commented with its help text."""
    return settings.defaults_yaml(Params)
