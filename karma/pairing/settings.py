"""Settings of the stages fetch, preferences and tau_sweep (and the root ``kinship`` choice)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from karma.core.settings import TAU_GRID, BaselinePool, Layout, Rating, Section, setting
from karma.pairing.strategies import STRATEGIES, strategy_help

#: The ``kinship`` setting's choices: the names of the strategy table
#: (:data:`karma.pairing.strategies.SPECS`).
Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]
#: The ``kinship`` setting's help, from the same table.
STRATEGY_HELP = strategy_help()


class FetchConfig(Section):
    """Stage ``fetch``: the completions as a local Parquet that DVC tracks."""

    dataset: str = setting(
        "data/demo/ultrafeedback_demo.jsonl",
        "UltraFeedback-schema source: a hub id (openbmb/UltraFeedback), a local dataset "
        "directory (read by datasets.load_dataset) or a .jsonl/.json/.parquet file",
        min_length=1,
    )
    revision: str | None = setting(
        None, "hub revision: a commit sha pins the data (required for a hub id)"
    )
    split: str = setting("train", "split to fetch", min_length=1)


class PreferencesConfig(Section):
    """Stage ``preferences`` (also reads ``kinship``, ``seed`` and ``similarity.tau``)."""

    dataset: str = setting(
        "data/completions.parquet",
        "UltraFeedback-schema completions: the fetch stage's output, another local "
        ".jsonl/.json/.parquet file, or a hub id",
        min_length=1,
    )
    split: str = setting("train", "split of a hub dataset", min_length=1)
    rating: Rating = setting(
        "overall_score", "instance rating of the rlaif baseline and the agreement metric"
    )
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = setting(
        {}, "{completion model name: score-table model id}, case-insensitive"
    )
    baseline_pool: BaselinePool = setting(
        "scored", "responses rlaif may pair: scored (models with an S_pref, KARMA's pool; "
        "random always uses it) | all (every rated response, as H4 did)"
    )  # fmt: skip
    layout: Layout = setting(
        "trl", "trl (prompt/chosen/rejected as messages) | h4 (HuggingFaceH4/"
        "ultrafeedback_binarized's columns and Arrow types, + our metadata)"
    )  # fmt: skip
    test_fraction: float = setting(
        0.2, "share of prompts in test_prefs (seeded hash of the prompt): the held-out pairs "
        "results are reported on", ge=0, lt=1
    )  # fmt: skip
    dev_fraction: float = setting(
        0.15, "share of prompts in dev_prefs, carved from the train side of the same hash (the "
        "test prompts do not change): the held-out pairs recipes are chosen on; 0: none",
        ge=0, lt=1,
    )  # fmt: skip
    diagnostics_sample: int | None = setting(
        50_000, "instructions the diag.* searches run on: an even sample of blocks of 1,024 "
        "when a Parquet input has more (the pairs do not change); null: all", ge=1024,
    )  # fmt: skip
    batch_records: int = setting(
        100_000, "records read and paired at a time (bounds memory; the outputs are the same)",
        ge=1, operational=True,
    )  # fmt: skip

    @model_validator(mode="after")
    def _splits_fit(self) -> PreferencesConfig:
        if self.test_fraction + self.dev_fraction >= 1:
            raise ValueError(
                f"test_fraction + dev_fraction must be < 1 (got {self.test_fraction} + "
                f"{self.dev_fraction}): the rest is train_prefs"
            )
        return self


class SweepConfig(Section):
    """Stage ``tau_sweep``: the pairing diagnostics over a grid of tau (also reads ``seed``)."""

    taus: Annotated[list[Annotated[float, Field(ge=-1, le=1)]], Field(min_length=1)] = setting(
        TAU_GRID, "the tau grid (each -1 <= tau <= 1)"
    )
    draws: int | None = setting(
        None, "null: sweep preferences.dataset; K: every K-model draw of the scored models "
        "(+ extra_models) instead, one instruction each (the paper's table: 4)", ge=2
    )  # fmt: skip
    extra_models: list[Annotated[str, Field(min_length=1)]] = setting(
        [], "unscored models added to the draws (the paper's pool: [ultralm-65b])"
    )
