"""Settings of the stage select (MAP)."""

from __future__ import annotations

from typing import Literal

from karma.core.settings import ExplicitMargin, Section, SelectMethod, setting

#: The implicit margin of MAP: the policy's reference-free length-normalised log-prob gap (the
#: authors' form) or the DPO form with a reference model.
ImplicitForm = Literal["logp_mean", "dpo"]


class SelectConfig(Section):
    """Stage ``select``: MAP data selection (also reads ``seed``)."""

    method: SelectMethod = setting(
        "none", "none (keep every pair, load no model) | map | explicit | implicit | random"
    )
    ratio: float = setting(0.4, "fraction of pairs kept: floor(ratio * pairs)", gt=0, le=1)
    weight: float = setting(
        1.0, "the MAP authors' w: map = z(explicit margin) - w * z(|implicit margin|)", ge=0,
        allow_inf_nan=False,
    )  # fmt: skip
    explicit: ExplicitMargin = setting("s_pref_gap", "explicit margin: S_pref gap or rating gap")
    implicit_form: ImplicitForm = setting(
        "logp_mean", "logp_mean (the policy's mean log-prob of chosen - of rejected, no "
        "reference; stored chosen_logp_mean / rejected_logp_mean columns are used when the "
        "pairs have them) | dpo (dpo_beta * log-ratio gap against --reference)",
    )  # fmt: skip
    dpo_beta: float = setting(0.1, "beta of the DPO-form implicit margin (implicit_form dpo)", gt=0)
    batch_size: int = setting(8, "sequences per forward pass of the scorer", ge=1)
    max_tokens: int = setting(8192, "padded tokens per forward pass", ge=16)
    max_length: int = setting(2048, "longest scored prompt + response (tokens)", ge=8)
    cache: bool = setting(
        True, "reuse implicit margins cached by model + data + settings", operational=True
    )


#: TRL fields karma sets itself (the user's ``trl``/``dpo``/``sft`` blocks may not).
