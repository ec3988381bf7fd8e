"""The dataset card (``README.md`` with the hub's YAML header) and the one-line summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from karma.pairing.strategies import RATING_FIELDS, STRATEGIES, made_by, spec
from karma.pairing.stream import PreferenceResult


def size_category(n: int) -> str:
    """The hub's ``size_categories`` label of ``n`` rows."""
    for limit, label in ((1000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (10**6, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return label
    return "n>1M"


def pct(v: float | None) -> str:
    """A share as a percentage with one decimal (``n/a`` when undefined)."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


def diagnostics_text(result: PreferenceResult) -> str:
    """The card's paragraph on what the kinship threshold did (from ``diag.*``)."""
    m = result.metrics
    if "diag.changed_by_tau" not in m:
        return "(not computed)"
    n = m.get("diag.instructions", result.counts["instructions"])
    lines = []
    if n < result.counts["instructions"]:
        lines += [
            f"These diagnostics searched an even sample of {n} of the "
            f"{result.counts['instructions']} instructions (`preferences.diagnostics_sample`); "
            "the pairs themselves come from every instruction.",
            "",
        ]
    if spec(result.strategy).karma:
        ch, dr = m["diag.changed_by_tau_n"], m["diag.dropped_by_tau_n"]
        verdict = (
            f"**tau = {result.tau:g} changed no pair**: every instruction gets the pair it gets "
            "without a threshold, so nothing here is due to kinship filtering."
            if ch == 0
            else f"tau = {result.tau:g} changed the outcome of {ch} of {n} instructions "
            f"({pct(m['diag.changed_by_tau'])}) against the search without a threshold, "
            f"{dr} of them ({pct(m['diag.dropped_by_tau'])}) dropped for want of a kin pair."
        )
        lines.append(verdict)
    else:
        lines.append(f"`{result.strategy}` ignores kinship: tau changes nothing.")
    overlap = ", ".join(
        f"`{s}` {pct(m.get(f'diag.overlap.{s}'))}" for s in STRATEGIES if s != result.strategy
    )
    lines += [
        "",
        f"- same pair as the other strategies (share of these pairs): {overlap}",
        f"- mean kinship: pairs used {m['diag.used.mean_kinship']}, every candidate pair "
        f"{m['diag.pool.mean_kinship']} ({m['diag.pool.candidate_pairs']} candidate pairs)",
        f"- mean \\|S_pref gap\\|: pairs used {m['diag.used.mean_abs_s_pref_gap']}, every "
        f"candidate pair {m['diag.pool.mean_abs_s_pref_gap']}",
        "- Spearman correlation of kinship and \\|S_pref gap\\| over the candidate pairs: "
        f"{m['diag.pool.spearman_kinship_gap']}",
    ]
    return "\n".join(lines)


def _layout_text(layout: str, rating: str) -> tuple[str, str]:
    """The card's description of ``layout`` and the head of its column list."""
    if layout == "h4":
        fmt = (
            "the layout of `HuggingFaceH4/ultrafeedback_binarized` (same columns, order and "
            "Arrow types: `prompt` text, `prompt_id` = sha256 of the prompt, `chosen` / "
            "`rejected` / `messages` = user + assistant conversations, `score_chosen` / "
            f"`score_rejected` = the `{rating}` ratings), so it concatenates with H4 "
            "(`datasets.concatenate_datasets`) and joins with it on `prompt_id`"
        )
        cols = "`prompt`, `prompt_id`, `chosen`, `rejected`, `messages`, `score_chosen`, "
        cols += "`score_rejected` (as H4); then "
    else:
        fmt = (
            "TRL's conversational format (`prompt` = list of messages, `chosen` / `rejected` = "
            "one assistant message each), ready for `trl.DPOTrainer`"
        )
        cols = "`prompt`, `chosen`, `rejected` (messages); `prompt_id` (128-bit hash of the "
        cols += "instruction); "
    return fmt, cols


def _hub_header(result: PreferenceResult, license: str) -> str:
    """The card's YAML header (what the hub reads)."""
    return f"""---
language:
- en
license: {license}
pretty_name: KARMA preference pairs ({result.strategy})
size_categories:
- {size_category(result.counts["pairs"])}
task_categories:
- text-generation
tags:
- dpo
- preference
- karma
- trl
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: train_prefs.parquet
  - split: test_prefs
    path: test_prefs.parquet
  - split: dev_prefs
    path: dev_prefs.parquet
---
"""


def dataset_card(
    result: PreferenceResult,
    *,
    dataset: str,
    params: Mapping[str, Any],
    layout: str = "trl",
    license: str = "other",
    source: str | None = None,
) -> str:
    """The dataset card (``README.md`` with the hub's YAML header)."""
    c = result.counts
    m = result.metrics
    drops = "\n".join(
        f"| {k.removeprefix('drop_')} | {v} |"
        for k, v in sorted(c.items())
        if k.startswith("drop_")
    )
    param_lines = "\n".join(f"- `{k}`: `{v}`" for k, v in sorted(params.items()))
    how = made_by(result.strategy, result.tau)
    rating = params.get("preferences.rating", "overall_score")
    agree = "\n".join(
        f"- `{f}`: agree {m.get(f'rating.{f}.agree')}, tie {m.get(f'rating.{f}.tie')}, "
        f"disagree {m.get(f'rating.{f}.disagree')} (over {m.get(f'rating.{f}.rated_pairs')} "
        "rated pairs)"
        for f in RATING_FIELDS
    )
    fmt, cols = _layout_text(layout, rating)
    made_from = f"`{dataset}`" + (f" ({source})" if source else "")
    return (
        _hub_header(result, license)
        + f"""
# KARMA preference pairs: `{result.strategy}`

Preference data in {fmt}.

Made from {made_from} by {how}. One pair at most per instruction; same inputs and params
give byte-identical files. License: `{license}` (that of the source data).

Splits by prompt (no prompt in two): `train_prefs` {m.get("split.train_pairs")} pairs,
`dev_prefs` {m.get("split.dev_pairs")} pairs, `test_prefs` {m.get("split.test_pairs")} pairs.
A seeded hash of the prompt (seed `seed`), as a fraction of its range, puts it in `test_prefs`
below `preferences.test_fraction`, in `dev_prefs` in the next `preferences.dev_fraction`, else
in `train_prefs`. Recipes are chosen on `dev_prefs`; results are reported on `test_prefs`.

## What the kinship threshold did

{diagnostics_text(result)}

## Params

{param_lines}

## Counts

- instructions: {c["instructions"]}
- completions: {c.get("completions")} (blank {c.get("completions_blank")}, model without
  S_pref {c.get("completions_unknown_model")})
- pairs kept: {c["pairs"]}
- mean kinship: {m.get("mean_kinship")}
- mean S_pref gap: {m.get("mean_s_pref_gap")}

Agreement of chosen vs rejected with the instance ratings (UltraFeedback's `overall_score` has
documented problems; `fine_grained_score` is the mean of the four aspect ratings):

{agree}

| dropped because | instructions |
|---|---|
{drops}

## Columns

{cols}`chosen_model`, `rejected_model`; `kinship` of the two models; `s_pref_chosen`,
`s_pref_rejected`; `chosen_rating`, `rejected_rating` (the `{rating}` instance rating, null
when absent); `source`.

Built by `karma preferences` / the DVC stage `preferences` (KARMA, arXiv 2502.18744).
"""
    )


def summary(result: PreferenceResult) -> str:
    """A short human summary (the CLI prints it)."""
    m = result.metrics
    drops = ", ".join(
        f"{k.removeprefix('drop_')} {v}"
        for k, v in sorted(result.counts.items())
        if k.startswith("drop_") and v
    )
    text = (
        f"strategy {result.strategy} (tau {result.tau:g}, seed {result.seed}): "
        f"{m['pairs']} pairs from {m['instructions']} instructions"
        f" (dropped: {drops or 'none'}); mean kinship {m['mean_kinship']}, "
        f"mean S_pref gap {m['mean_s_pref_gap']}, rating agreement {m['rating_agree']} "
        f"(ties {m['rating_tie']}, {m['rated_pairs']} rated pairs)"
    )
    if "diag.changed_by_tau" in m:
        n = m.get("diag.instructions", m["instructions"])
        text += f"; tau changed {m['diag.changed_by_tau_n']} of {n} pairs"
    return text
