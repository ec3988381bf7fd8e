"""The pairing rules in plain Python, one instruction at a time: the reference the Numba kernel
(:mod:`karma.pairing.kernel`) is tested against, and the per-record loop the benchmark times.
Each strategy's own rule is its entry of :data:`karma.pairing.strategies.SPECS`; this module
applies what they share (candidates, drops, the order by S_pref, identical texts).

Inputs are plain: an :class:`~karma.pairing.ultrafeedback.UltraFeedback` dataset, ``S_pref`` per
model and the kinship of model pairs (``model_a, model_b, kinship``). Rules, per instruction:

* **candidates** (KARMA strategies and ``random``): completions whose model has an S_pref
  (names matched case-insensitively, after ``aliases``) and whose response is not blank.
  Fewer than two candidates: dropped as ``unknown_models`` when at least two non-blank
  responses exist (unknown models are the reason), else ``too_few_candidates``.
* **eligible pairs**: candidate pairs of two *different* models with kinship >= tau
  (NaN kinship is never eligible; a model is not its own kin partner).
* ``score``: the eligible pair with the highest mean S_pref; ties -> higher kinship ->
  the pair met first (lowest completion positions, lexicographically).
* ``sim``: the eligible pair with the highest kinship; ties -> higher mean S_pref -> first.
* ``score_sim``: the highest-S_pref candidate with an eligible partner (ties -> first in the
  record), paired with its most-kin eligible partner (ties -> higher S_pref -> first).
* ``random``: a seeded-random pair of candidates (kinship ignored: the ablation).
* chosen = the higher-S_pref response. Equal S_pref -> drop ``tie``; then identical response
  text -> drop ``identical_text``. No eligible pair -> drop ``no_eligible_pair``.
* ``rlaif`` (as ``HuggingFaceH4/ultrafeedback_binarized``): candidates are non-blank responses
  with a rating (``rating`` field; "N/A" is missing) whose model has an S_pref (``pool="scored"``,
  the default: the same responses KARMA pairs from) or of any model (``pool="all"``). chosen =
  the highest rating (ties -> first in the record); rejected = a seeded-random one of the
  remaining candidates rated strictly lower; none lower (all tie) -> drop ``tie``; fewer than
  two candidates -> drop ``unknown_models`` (scored pool, two rated responses of any model) or
  ``too_few_candidates``; identical text -> drop ``identical_text``.

Randomness is counter-based (SplitMix64 of a per-strategy stream of ``seed`` and the
instruction's row), so a pair never depends on other instructions or on processing order, and
``random`` and ``rlaif`` draw independent numbers. ``prompt_id`` is a stable 128-bit hash of the
instruction (32 hex digits; the sha256 of H4 in ``layout="h4"``). The train/test split is by
prompt: a prompt goes to ``test_prefs`` when a seeded hash of its text falls below
``test_fraction`` (so the same prompt is always on the same side, for every strategy). Same
inputs and params give byte-identical Parquet files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from karma.pairing.rng import splitmix64, stream_seed
from karma.pairing.strategies import Case, spec


def reference_pair(
    completions: Sequence[Mapping[str, Any]],
    s_pref: Mapping[str, float],
    kinship: Mapping[tuple[str, str], float],
    *,
    strategy: str,
    tau: float,
    seed: int,
    row: int,
    rating: str = "overall_score",
    pool: str = "scored",
) -> tuple[int, int, str]:
    """Plain-Python rules for one instruction: ``(chosen_pos, rejected_pos, reason)``.

    ``completions`` items have ``model`` (already canonical), ``response`` and the ``rating``
    key (float or None). The kernel is tested against this; the benchmark loops over it.
    """
    rule = spec(strategy)

    def scored(i: int) -> bool:
        v = s_pref.get(completions[i]["model"])
        return v is not None and not math.isnan(v)

    idx = range(len(completions))
    nonempty = [bool(c["response"].strip()) for c in completions]
    if rule.candidates == "rated":
        reachable = [i for i in idx if nonempty[i] and completions[i].get(rating) is not None]
        cands = [i for i in reachable if pool == "all" or scored(i)]
    else:
        reachable = [i for i in idx if nonempty[i]]
        cands = [i for i in reachable if scored(i)]
    if len(cands) < 2:
        return -1, -1, "unknown_models" if len(reachable) >= 2 else "too_few_candidates"
    sp = {i: s_pref.get(completions[i]["model"]) for i in idx}
    draw = splitmix64(stream_seed(seed, strategy), row)
    case = Case(completions, cands, sp, kinship, tau, draw, rating)
    picked = rule.rule(case)
    if isinstance(picked, str):
        return -1, -1, picked
    a, b = picked
    if not rule.rule_orders:
        if sp[a] == sp[b]:
            return -1, -1, "tie"
        if sp[a] < sp[b]:  # type: ignore[operator]
            a, b = b, a
    if completions[a]["response"] == completions[b]["response"]:
        return -1, -1, "identical_text"
    return a, b, "kept"
