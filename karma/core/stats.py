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
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

# Bootstrap resamples are drawn in blocks of about this many indices (memory bound).
_CHUNK_ELEMS = 2_000_000


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
    ``p < alpha`` of the paired test ``test`` (``mcnemar`` or ``sign_flip``); the metrics files
    mark a delta significant when its interval excludes 0 instead (:func:`paired`).
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


def compare_paired(
    candidate: ArrayLike,
    baseline: ArrayLike,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    alpha: float = 0.05,
    n_perm: int = 10_000,
) -> Comparison:
    """Paired comparison of aligned per-item scores (candidate = policy or experiment).

    Delta of means, paired bootstrap interval (:func:`paired_bootstrap_ci`) and p: exact
    McNemar (:func:`mcnemar_exact`) when both arrays are 0/1, else sign-flip permutation
    (:func:`sign_flip_p`).
    """
    a, b = _pair(candidate, baseline)
    low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, level=level)
    if is_binary(a) and is_binary(b):
        p, test = mcnemar_exact(a, b), "mcnemar"
    else:
        p, test = sign_flip_p(a, b, n_perm=n_perm, seed=seed), "sign_flip"
    wins, losses = int(np.sum(a > b)), int(np.sum(a < b))
    delta = float(a.mean() - b.mean())
    return Comparison(delta, low, high, p, a.size, wins, losses, test, bool(p < alpha))


def aggregate_replicates(values: ArrayLike) -> Replicates:
    """Mean, sample sd (``ddof=1``; NaN for one replicate) and n of seed replicates."""
    arr = _scores(values, "values")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return Replicates(float(arr.mean()), sd, int(arr.size))


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
) -> dict[str, float | int | None]:
    """The ``delta.<bench>.*`` keys of ``eval.json`` for aligned per-item scores ``a`` (the
    candidate: policy, experiment) against ``b`` (the baseline).

    ``score``: mean(a) - mean(b); ``ci_low``/``ci_high``: seeded paired bootstrap over items
    (:func:`paired_bootstrap_ci`); ``p``: exact McNemar for 0/1 items, else the sign-flip
    permutation test; ``significant``: 1 when the interval excludes 0, else 0; ``n``, ``wins``,
    ``losses`` (items where ``a`` scores higher / lower).

    >>> paired([1, 1, 1, 0], [0, 0, 1, 0], seed=0, n_boot=1000)["wins"]
    2
    """
    cmp = compare_paired(a, b, n_boot=n_boot, seed=seed, level=level, n_perm=n_boot)
    return {
        "score": _finite(cmp.delta),
        "ci_low": _finite(cmp.ci_low),
        "ci_high": _finite(cmp.ci_high),
        "p": float(f"{cmp.p:.6g}"),
        "significant": int(cmp.ci_low > 0 or cmp.ci_high < 0),
        "n": cmp.n,
        "wins": cmp.wins,
        "losses": cmp.losses,
    }


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
