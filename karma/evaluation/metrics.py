"""lm-eval result keys made flat, and the paired comparison of two runs (``eval.json``).

Result keys of lm-eval look like ``acc,none`` (metric, filter); they are flattened to ``acc``
(filter ``none``) or ``exact_match_custom-extract`` (another filter) before they are written.
Against a baseline, each benchmark gets the paired comparison of its per-item scores
(:func:`karma.core.stats.paired`), Holm-adjusted across the benchmarks of the comparison
(:func:`karma.core.stats.adjust_family`), and the paper's Total (0-1 mean of its five Table 2
benchmarks) its own stratified bootstrap interval and sign-flip test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError
from karma.core.settings import TABLE2_BENCHMARKS

#: The keys every benchmark's headline metric gets: ``<bench>.<key>``.
HEADLINE_KEYS = ("score", "ci_low", "ci_high", "stderr", "n")
#: Every metric's interval keys: ``<bench>.<metric>_stderr`` / ``_ci_low`` / ``_ci_high``.
INTERVAL_SUFFIXES = ("_stderr", "_ci_low", "_ci_high")
#: The name of the paper's Total in ``eval.json`` (``policy.total``, ``delta.total.*``).
TOTAL = "total"


def flat_key(result_key: str) -> str:
    """``acc,none`` -> ``acc``; ``exact_match,custom-extract`` -> ``exact_match_custom-extract``."""
    metric, _, filt = result_key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def flatten_metrics(task_result: Mapping[str, Any]) -> dict[str, float]:
    """Numeric ``metric,filter`` entries of one lm-eval task result, keys flattened.

    Non-metric entries (``alias``, ``name``, ``sample_len``) and non-numbers (``"N/A"`` standard
    errors) are dropped.
    """
    out: dict[str, float] = {}
    for key, value in task_result.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[flat_key(key)] = float(value)
    return dict(sorted(out.items()))


def compare_metrics(
    base: Mapping[str, Any], policy: Mapping[str, Any], *, digits: int = 6
) -> dict[str, Any]:
    """Flat ``base.*``, ``policy.*`` and ``delta.*`` (policy - base) keys.

    No plain difference for standard errors and interval bounds, for the headline keys
    (``<bench>.score``, ``ci_low``, ...: their deltas are paired comparisons,
    :func:`compare_runs`), for ``meta.*`` keys (not compared) and for missing values (null).
    """
    out: dict[str, Any] = {}

    def rounded(value: Any) -> Any:
        return round(value, digits) if isinstance(value, float) else value

    for key, value in base.items():
        if not key.startswith("meta."):
            out[f"base.{key}"] = rounded(value)
    for key, value in policy.items():
        if key.startswith("meta."):
            continue
        out[f"policy.{key}"] = rounded(value)
        plain = not key.endswith(INTERVAL_SUFFIXES) and key.rsplit(".", 1)[-1] not in HEADLINE_KEYS
        other = base.get(key)
        if plain and isinstance(value, (int, float)) and isinstance(other, (int, float)):
            out[f"delta.{key}"] = round(value - other, digits)
    return dict(sorted(out.items()))


def model_meta(model: str | Path) -> dict[str, Any]:
    """``meta.base_model`` (and for a policy ``meta.seed``, ``meta.train_method``) from the
    provenance (``karma.json``) of a model directory; nothing for a directory without one."""
    from karma.core.lm import PROVENANCE, provenance

    if not (Path(model) / PROVENANCE).is_file():
        return {}
    prov = provenance(model)
    meta: dict[str, Any] = {}
    if prov.get("source") is not None:
        meta["meta.base_model"] = str(prov["source"])
    for key, name in (("seed", "meta.seed"), ("method", "meta.train_method")):
        if prov.get(key) is not None:
            meta[name] = prov[key]
    return meta


def compare_runs(
    base: Mapping[str, Any],
    policy: Mapping[str, Any],
    base_samples: Any,
    policy_samples: Any,
    *,
    seed: int,
    n_boot: int,
    where: object = "baseline",
) -> dict[str, Any]:
    """``base.*``, ``policy.*`` and ``delta.*`` keys (:func:`compare_metrics`), and for
    each benchmark in both the paired comparison of the per-item scores
    (:func:`karma.core.stats.paired`):
    ``delta.<bench>.score``, ``ci_low``, ``ci_high``, ``p``, ``p_holm``, ``significant``, ``n``,
    ``wins``, ``losses``, ``test``, and the Total (:func:`total_comparison`). ``p_holm`` is Holm's
    adjustment across the comparison's benchmarks and Total; ``significant`` comes from it
    (:func:`karma.core.stats.is_significant`). Items are matched by ``(benchmark, item)``.
    """
    from karma.core.stats import adjust_family, paired

    for key in ("meta.suite", "meta.protocol"):
        if key in base and key in policy and base[key] != policy[key]:
            raise KarmaError(
                "the baseline was evaluated with another suite or protocol",
                file=where,
                field=key,
                value=base[key],
                expected=str(policy[key]),
            )
    out = compare_metrics(base, policy)
    diffs = paired_items(base_samples, policy_samples, where=where)
    family = {bench: paired(a, b, seed=seed, n_boot=n_boot) for bench, (a, b) in diffs.items()}
    total = total_comparison(diffs, seed=seed, n_boot=n_boot)
    if total is not None:
        family[TOTAL] = total
        for who, side in (("policy", 0), ("base", 1)):
            out[f"{who}.{TOTAL}.score"] = round(
                sum(float(diffs[b][side].mean()) for b in TABLE2_BENCHMARKS) / 5, 6
            )
    adjust_family(family)
    for bench, delta in family.items():
        out.update({f"delta.{bench}.{k}": v for k, v in delta.items()})
    return dict(sorted(out.items()))


def paired_items(base_samples: Any, policy_samples: Any, *, where: object) -> dict[str, Any]:
    """``{bench: (policy scores, base scores)}`` aligned by ``(benchmark, item)``; both runs
    must hold the same items of every benchmark they share."""
    a = policy_samples.select("benchmark", "item", "score")
    b = base_samples.select("benchmark", "item", "score")
    joined = a.join(b, on=["benchmark", "item"], how="inner", suffix="_base")
    benches = [x for x in dict.fromkeys(a["benchmark"].to_list()) if x in set(b["benchmark"])]
    out = {}
    for bench in benches:
        pairs = joined.filter(joined["benchmark"] == bench)
        n_a = a.filter(a["benchmark"] == bench).height
        n_b = b.filter(b["benchmark"] == bench).height
        if not pairs.height == n_a == n_b:
            raise KarmaError(
                f"per-item results of {bench!r} differ from the baseline's ({n_a} items, "
                f"baseline {n_b}, {pairs.height} shared): evaluate both with the same settings",
                file=where,
            )
        out[bench] = (pairs["score"].to_numpy(), pairs["score_base"].to_numpy())
    return out


def total_comparison(diffs: Mapping[str, Any], *, seed: int, n_boot: int) -> dict[str, Any] | None:
    """The paper's Total (0-1 mean of :data:`TABLE2_BENCHMARKS`): its paired difference with
    the stratified bootstrap interval of the Total itself and the stratified sign-flip p; None
    unless every Table 2 benchmark is there."""
    from karma.core.stats import is_significant, stratified_bootstrap, stratified_sign_flip_p

    if not all(b in diffs for b in TABLE2_BENCHMARKS):
        return None
    d = [diffs[b][0] - diffs[b][1] for b in TABLE2_BENCHMARKS]
    mean, low, high = stratified_bootstrap(d, n_boot=n_boot, seed=seed)
    p = float(f"{stratified_sign_flip_p(d, n_perm=n_boot, seed=seed):.6g}")
    n = int(sum(x.size for x in d))
    return {
        "score": round(mean, 6),
        "ci_low": round(low, 6),
        "ci_high": round(high, 6),
        "p": p,
        "p_holm": p,
        "significant": int(is_significant(p, n)),
        "n": n,
        "test": "stratified_sign_flip",
    }
