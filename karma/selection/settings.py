"""Settings of the stage select (MAP)."""

from __future__ import annotations

from karma.core.settings import ExplicitMargin, Section, SelectMethod, setting


class SelectConfig(Section):
    """Stage ``select``: MAP data selection (also reads ``seed``)."""

    method: SelectMethod = setting(
        "none", "none (keep every pair, load no model) | map | explicit | implicit | random"
    )
    ratio: float = setting(0.4, "fraction of pairs kept: floor(ratio * pairs)", gt=0, le=1)
    beta: float = setting(
        1.0, "map = z(explicit margin) - beta * z(|implicit margin|)", ge=0, allow_inf_nan=False
    )
    explicit: ExplicitMargin = setting("s_pref_gap", "explicit margin: S_pref gap or rating gap")
    dpo_beta: float = setting(
        0.1, "beta of the DPO-form implicit margin (with a reference model)", gt=0
    )
    batch_size: int = setting(8, "sequences per forward pass of the scorer", ge=1)
    max_tokens: int = setting(8192, "padded tokens per forward pass", ge=16)
    max_length: int = setting(2048, "longest scored prompt + response (tokens)", ge=8)
    cache: bool = setting(
        True, "reuse implicit margins cached by model + data + settings", operational=True
    )


#: TRL fields karma sets itself (the user's ``trl``/``dpo``/``sft`` blocks may not).
