"""Uncertainty for per-item evaluation scores: intervals, paired comparisons, replicates.

Pure functions on 1-D arrays of per-item scores (numpy and scipy only). A score array is
*binary* when every value is 0 or 1 (accuracy, exact match); otherwise it is continuous.

>>> from karma.core.stats import mean_ci, compare_paired, to_metrics
>>> est = mean_ci([1, 0, 1, 1])                 # Wilson interval for a 0/1 metric
>>> cmp = compare_paired([1, 1, 0, 1], [0, 1, 0, 1], seed=0)
>>> sorted(to_metrics(cmp))[:3]
['ci_high', 'ci_low', 'delta']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

# Bootstrap resamples are drawn in blocks of about this many indices (memory bound).
_CHUNK_ELEMS = 2_000_000
#: Fewer paired items than this never make a difference significant, whatever its p: with a
#: handful of items one item is tens of points, and the report says so.
MIN_ITEMS = 10
#: The significance level of every mark, bold cell and ``significant`` key.
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """Mean of per-item scores with its standard error and interval (``method``)."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    n: int
    method: str  # "wilson" (0/1 scores) or "t" (continuous)


@dataclass(frozen=True)
class Comparison:
    """Paired comparison ``candidate - baseline`` over aligned items.

    ``wins``/``losses``: items where the candidate scores higher/lower. ``significant`` is
    :func:`is_significant` of the paired test's p (``mcnemar`` or ``sign_flip``): the same rule
    as the metrics files, where the p is first Holm-adjusted across a comparison's benchmarks.
    """

    delta: float
    ci_low: float
    ci_high: float
    p: float
    n: int
    wins: int
    losses: int
    test: str
    significant: bool


@dataclass(frozen=True)
class Replicates:
    """Seed replicates of one number: mean, sample sd (``ddof=1``; NaN for n=1) and n."""

    mean: float
    sd: float
    n: int


def _scores(x: ArrayLike, name: str = "scores") -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one item")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(candidate: ArrayLike, baseline: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _scores(candidate, "candidate"), _scores(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    return a, b


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(stats.norm.ppf(0.5 + level / 2))


def is_binary(scores: ArrayLike) -> bool:
    """True when every score is 0 or 1."""
    arr = np.asarray(scores, dtype=float)
    return bool(np.all((arr == 0) | (arr == 1)))


def mean_ci(scores: ArrayLike, *, level: float = 0.95, binary: bool | None = None) -> Estimate:
    """Mean, standard error and ``level`` interval of per-item scores.

    ``se`` is the sample sd (``ddof=1``) over sqrt(n), as lm-eval's ``*_stderr`` (NaN for n=1).
    0/1 scores (``binary``; default: detected) get the Wilson score interval, defined for any
    n >= 1 and never outside [0, 1]; continuous scores get the Student t interval
    ``mean +- t(n-1) * se`` (NaN bounds for n=1, zero width when all scores are equal).
    """
    arr = _scores(scores)
    z = _z(level)
    n = arr.size
    m = float(arr.mean())
    se = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    binary = is_binary(arr) if binary is None else binary
    if binary:
        if not is_binary(arr):
            raise ValueError("binary=True but scores are not all 0 or 1")
        denom = 1 + z * z / n
        centre = (m + z * z / (2 * n)) / denom
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / denom
        return Estimate(m, se, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")
    if n == 1:
        return Estimate(m, se, math.nan, math.nan, n, "t")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return Estimate(m, se, m - half, m + half, n, "t")


def cluster_mean_ci(clusters: Sequence[ArrayLike], *, level: float = 0.95) -> Estimate:
    """Mean over all values of clustered scores (IFEval's instructions within prompts), with a
    cluster-robust standard error: the ratio estimator's linearisation over the n clusters,
    ``se = sqrt(n/(n-1) * sum((x_i - r*m_i)^2)) / sum(m_i)`` (``x_i`` the sum and ``m_i`` the
    count of cluster i), and a t(n-1) interval (clipped to [0, 1] for rates). Values in one
    prompt are not independent; treating them so understates the interval.
    """
    groups = [_scores(c, "cluster") for c in clusters]
    if not groups:
        raise ValueError("no clusters")
    sums = np.array([g.sum() for g in groups])
    counts = np.array([g.size for g in groups], dtype=float)
    n, total = len(groups), counts.sum()
    r = float(sums.sum() / total)
    if n == 1:
        return Estimate(r, math.nan, math.nan, math.nan, int(total), "cluster_t")
    resid = sums - r * counts
    se = float(math.sqrt(n / (n - 1) * float(np.sum(resid**2))) / total)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    unit = all(g.min() >= 0 and g.max() <= 1 for g in groups)  # rates: clipped to [0, 1]
    lo, hi = (0.0, 1.0) if unit else (-math.inf, math.inf)
    return Estimate(r, se, max(lo, r - half), min(hi, r + half), int(total), "cluster_t")


def paired_bootstrap_ci(
    candidate: ArrayLike,
    baseline: ArrayLike,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``mean(candidate - baseline)`` by a seeded paired bootstrap.

    Each of ``n_boot`` resamples draws n items with replacement (the same items for both
    arrays): index ``floor(u * n)`` for ``u`` from ``numpy.random.default_rng(seed).random``,
    one row of n uniforms per resample, in order. Bounds are numpy's linear-interpolated
    percentiles. Deterministic for a seed; vectorised in blocks of resamples.
    """
    a, b = _pair(candidate, baseline)
    _z(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = a - b
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    rows = max(1, _CHUNK_ELEMS // n)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        idx = np.minimum((rng.random((k, n)) * n).astype(np.intp), n - 1)
        means[start : start + k] = d[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_exact(candidate: ArrayLike, baseline: ArrayLike) -> float:
    """Exact two-sided McNemar p for paired 0/1 scores.

    Binomial test of the discordant pairs: with ``w`` items only the candidate gets right and
    ``l`` only the baseline, ``p = min(1, 2 * P(Binom(w + l, 1/2) <= min(w, l)))``; 1 when
    no pair is discordant.
    """
    a, b = _pair(candidate, baseline)
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar's test needs 0/1 scores")
    wins, losses = int(np.sum(a > b)), int(np.sum(a < b))
    if wins + losses == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(wins, losses), wins + losses, 0.5)))


def sign_flip_p(
    candidate: ArrayLike, baseline: ArrayLike, *, n_perm: int = 10_000, seed: int = 0
) -> float:
    """Two-sided paired sign-flip permutation p for continuous scores.

    Statistic ``|sum(s * d)|`` with ``d = candidate - baseline`` and random signs ``s``; p is
    the share of sign vectors at least as extreme as the observed one. Exact (all 2**n sign
    vectors) when ``2**n <= n_perm``; otherwise Monte Carlo with ``n_perm`` seeded draws and
    ``p = (1 + hits) / (1 + n_perm)``. Ties within a relative 1e-9 count as extreme.
    """
    a, b = _pair(candidate, baseline)
    d = a - b
    n = d.size
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, observed)
    if 2**n <= n_perm:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, _CHUNK_ELEMS // n)
    for start in range(0, n_perm, rows):
        k = min(rows, n_perm - start)
        signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + n_perm)


def tango_ci(
    candidate: ArrayLike, baseline: ArrayLike, *, level: float = 0.95
) -> tuple[float, float]:
    """Tango's score interval for the difference of paired proportions (0/1 items).

    With ``b`` items only the candidate gets right, ``c`` only the baseline, and n items, the
    bounds are the ``delta0`` where ``|b - c - n*delta0| / sqrt(n*(2*q + delta0*(1-delta0)))``
    equals z, ``q`` the restricted MLE of the baseline-only rate (Tango 1998, Stat Med 17:891).
    Unlike the percentile bootstrap it is never zero-width for n > 0: with no discordant
    item it is ``[-z^2/(n+z^2), z^2/(n+z^2)]``.
    """
    a, bl = _pair(candidate, baseline)
    if not (is_binary(a) and is_binary(bl)):
        raise ValueError("Tango's interval needs 0/1 scores")
    z = _z(level)
    n = a.size
    b, c = float(np.sum(a > bl)), float(np.sum(a < bl))
    est = (b - c) / n

    def stat(d0: float) -> float:
        w = -b - c + (2 * n - b + c) * d0
        q = (-w + math.sqrt(max(0.0, w * w + 8 * n * c * d0 * (1 - d0)))) / (4 * n)
        var = n * (2 * q + d0 * (1 - d0))
        return (b - c - n * d0) / math.sqrt(var) if var > 0 else math.copysign(math.inf, est - d0)

    def root(lo: float, hi: float, target: float) -> float:
        for _ in range(100):  # stat decreases in d0: bisection to ~1e-30
            mid = (lo + hi) / 2
            if stat(mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    eps = 1e-12
    low = -1.0 if stat(-1 + eps) <= z else root(-1 + eps, est, z)
    high = 1.0 if stat(1 - eps) >= -z else root(est, 1 - eps, -z)
    return max(-1.0, low), min(1.0, high)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as ``ps``; NaN stays NaN).

    Sorted ascending, the i-th of m gets ``max_{j<=i} min(1, (m - j + 1) * p_(j))``.

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    idx = [i for i, p in enumerate(ps) if math.isfinite(p)]
    order = sorted(idx, key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    running, m = 0.0, len(order)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = float(f"{running:.12g}")
    return out


def is_significant(p: float | None, n: int, *, alpha: float = ALPHA) -> bool:
    """The one significance rule: ``p < alpha`` (p already adjusted where it belongs to a
    family) and at least :data:`MIN_ITEMS` paired items."""
    return p is not None and math.isfinite(p) and p < alpha and n >= MIN_ITEMS


def compare_paired(
    candidate: ArrayLike,
    baseline: ArrayLike,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    alpha: float = ALPHA,
    n_perm: int = 10_000,
) -> Comparison:
    """Paired comparison of aligned per-item scores (candidate = policy or experiment).

    0/1 items: Tango's score interval (:func:`tango_ci`) and the exact McNemar p
    (:func:`mcnemar_exact`); otherwise the seeded paired bootstrap interval
    (:func:`paired_bootstrap_ci`) and the sign-flip permutation p (:func:`sign_flip_p`).
    ``significant``: :func:`is_significant` of that (unadjusted) p.
    """
    a, b = _pair(candidate, baseline)
    if is_binary(a) and is_binary(b):
        low, high = tango_ci(a, b, level=level)
        p, test = mcnemar_exact(a, b), "mcnemar"
    else:
        low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, level=level)
        p, test = sign_flip_p(a, b, n_perm=n_perm, seed=seed), "sign_flip"
    wins, losses = int(np.sum(a > b)), int(np.sum(a < b))
    delta = float(a.mean() - b.mean())
    sig = is_significant(p, a.size, alpha=alpha)
    return Comparison(delta, low, high, p, a.size, wins, losses, test, sig)


def stratified_bootstrap(
    diffs: Sequence[ArrayLike], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean over strata of each stratum's mean difference.

    The Total of several benchmarks: each resample draws every benchmark's items with
    replacement (independently per benchmark) and averages the benchmarks' mean differences;
    the interval is the percentile interval of that Total, not a sum of normal approximations.
    """
    arrays = [_scores(d, "differences") for d in diffs]
    if not arrays:
        raise ValueError("no strata")
    _z(level)
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_boot)
    for d in arrays:
        n = d.size
        rows = max(1, _CHUNK_ELEMS // n)
        for start in range(0, n_boot, rows):
            k = min(rows, n_boot - start)
            idx = np.minimum((rng.random((k, n)) * n).astype(np.intp), n - 1)
            totals[start : start + k] += d[idx].mean(axis=1)
    totals /= len(arrays)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(totals, [tail, 100 - tail])
    mean = float(np.mean([d.mean() for d in arrays]))
    return mean, float(low), float(high)


def stratified_sign_flip_p(
    diffs: Sequence[ArrayLike], *, n_perm: int = 10_000, seed: int = 0
) -> float:
    """Two-sided sign-flip p of the mean over strata of the mean differences (Monte Carlo,
    ``(1 + hits) / (1 + n_perm)``): the Total's test, items flipped within their benchmark."""
    arrays = [_scores(d, "differences") for d in diffs]
    rng = np.random.default_rng(seed)
    observed = abs(sum(d.mean() for d in arrays))
    tol = 1e-9 * max(1.0, observed)
    stat = np.zeros(n_perm)
    for d in arrays:
        n = d.size
        rows = max(1, _CHUNK_ELEMS // n)
        for start in range(0, n_perm, rows):
            k = min(rows, n_perm - start)
            signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
            stat[start : start + k] += (signs @ d) / n
    hits = int(np.sum(np.abs(stat) >= observed - tol))
    return (1 + hits) / (1 + n_perm)


def aggregate_replicates(values: ArrayLike) -> Replicates:
    """Mean, sample sd (``ddof=1``; NaN for one replicate) and n of seed replicates."""
    arr = _scores(values, "values")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return Replicates(float(arr.mean()), sd, int(arr.size))


def t_quantile(n: int, level: float = 0.95) -> float:
    """Student t quantile for a ``level`` interval of a mean of n replicates (n - 1 degrees of
    freedom): 12.71 for two seeds, not the normal 1.96."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def _finite(value: float, digits: int = 6) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def estimate(scores: ArrayLike, *, level: float = 0.95) -> dict[str, float | int | None]:
    """The keys ``eval.json`` holds for one benchmark: ``score`` (mean), ``ci_low``, ``ci_high``
    (Wilson for 0/1 items, else t), ``stderr`` (sample sd / sqrt(n)) and ``n``; NaN -> None.

    >>> estimate([1, 0, 1, 1])
    {'score': 0.75, 'ci_low': 0.300642, 'ci_high': 0.954413, 'stderr': 0.25, 'n': 4}
    """
    est = mean_ci(scores, level=level)
    return {
        "score": _finite(est.mean),
        "ci_low": _finite(est.ci_low),
        "ci_high": _finite(est.ci_high),
        "stderr": _finite(est.se),
        "n": est.n,
    }


def paired(
    a: ArrayLike, b: ArrayLike, *, seed: int, n_boot: int, level: float = 0.95
) -> dict[str, float | int | str | None]:
    """The ``delta.<bench>.*`` keys of ``eval.json`` for aligned per-item scores ``a`` (the
    candidate: policy, experiment) against ``b`` (the baseline).

    ``score``: mean(a) - mean(b); ``ci_low``/``ci_high``: Tango's interval for 0/1 items, else
    the seeded paired bootstrap (:func:`compare_paired`); ``p``: exact McNemar for 0/1 items,
    else the sign-flip permutation test (``test`` names it); ``p_holm`` and ``significant``:
    this p alone (a family of one) until :func:`adjust_family` adjusts them across the
    benchmarks of a comparison; ``n``, ``wins``, ``losses`` (items where ``a`` scores higher /
    lower).

    >>> paired([1, 1, 1, 0], [0, 0, 1, 0], seed=0, n_boot=1000)["wins"]
    2
    """
    cmp = compare_paired(a, b, n_boot=n_boot, seed=seed, level=level, n_perm=n_boot)
    p = float(f"{cmp.p:.6g}")
    return {
        "score": _finite(cmp.delta),
        "ci_low": _finite(cmp.ci_low),
        "ci_high": _finite(cmp.ci_high),
        "p": p,
        "p_holm": p,
        "significant": int(cmp.significant),
        "n": cmp.n,
        "wins": cmp.wins,
        "losses": cmp.losses,
        "test": cmp.test,
    }


def adjust_family(deltas: dict[str, dict[str, Any]], *, alpha: float = ALPHA) -> None:
    """Holm-adjust the ``p`` of a comparison's benchmarks (``{bench: paired(...)}``) in place:
    ``p_holm`` and ``significant`` (:func:`is_significant` of ``p_holm``)."""
    names = [k for k, d in deltas.items() if d.get("p") is not None]
    adjusted = holm([float(deltas[k]["p"]) for k in names])
    for name, p in zip(names, adjusted, strict=True):
        deltas[name]["p_holm"] = p
        deltas[name]["significant"] = int(is_significant(p, int(deltas[name]["n"]), alpha=alpha))


def to_metrics(
    result: Estimate | Comparison | Replicates, *, prefix: str = ""
) -> dict[str, float | int | bool | str | None]:
    """Flat DVC-metrics dict of a result, keys ``prefix + field``; NaN/inf become None.

    >>> to_metrics(aggregate_replicates([0.5]), prefix="acc.")
    {'acc.mean': 0.5, 'acc.sd': None, 'acc.n': 1}
    """
    out: dict[str, float | int | bool | str | None] = {}
    for key, value in asdict(result).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[f"{prefix}{key}"] = value
    return out
