"""Settings of MAP's self-play rounds (stages ``sp_<step>@r<k>``).

``rounds`` itself is a top-level param (``dvc exp run -S rounds=2``); this section holds what a
round does. :data:`MAX_ROUNDS` is how many rounds ``dvc.yaml`` unrolls (DVC templates cannot
count): rounds above ``rounds`` are cheap no-ops that write placeholders.
"""

from __future__ import annotations

from typing import Literal

from karma.core.settings import Section, SelectMethod, setting

#: Rounds unrolled in dvc.yaml; ``rounds`` may not exceed it.
MAX_ROUNDS = 3

Reference = Literal["base", "previous"]


class SelfplayConfig(Section):
    """Stages ``sp_*_<k>``: round k samples with policy k-1, judges, pairs, selects, trains."""

    n: int = setting(4, "samples per prompt drawn by the round's policy", ge=2)
    prompt_limit: int | None = setting(
        16, "prompts of the prompts stage used per round (its first N; null: all)", ge=1
    )
    temperature: float = setting(0.8, "sampling temperature (> 0: the n samples differ)", gt=0)
    top_p: float = setting(0.95, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = setting(48, "tokens generated at most per sample", ge=1)
    seed: int = setting(0, "sampling seed (round k samples with seed + k)", ge=0, lt=2**62)
    method: SelectMethod = setting(
        "map", "selection of the best-vs-worst pairs: map (z(judge margin) - select.weight * "
        "z(|mean log-prob margin| of the sampling policy), keep select.ratio) | explicit | "
        "implicit | random | none (keep all)",
    )  # fmt: skip
    min_margin: float = setting(
        0.0, "pairs whose judge-score gap is <= this are not made (ties tell nothing)", ge=0
    )
    reference_model: Reference = setting(
        "previous", "reference model of round k's objective: base | previous (policy k-1, the "
        "model round k starts from)",
    )  # fmt: skip
    max_steps: int | None = setting(
        8, "optimizer steps per round (overrides train.trl.max_steps; null: keep it)", ge=1
    )
    evaluate: bool = setting(True, "benchmark each round's policy against the base (lm-eval)")
