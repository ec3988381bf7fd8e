"""Numbers with their uncertainty for the report: cells, differences, replicates, pools.

One significance rule everywhere (:func:`karma.core.stats.is_significant`): a difference is
marked when its test's p, Holm-adjusted across the columns of one comparison
(:func:`adjust`), is below 0.05 and it rests on at least 10 items. The test is named in
``Estimate.test``: exact McNemar (one run per side, 0/1 items), sign-flip (one run per side,
continuous items), bootstrap (replicate runs: the two-sided share of resampled differences
beyond 0), normal (means over bases, or unpaired). Intervals of replicates use Student t with
n - 1 degrees of freedom, not z.
"""

from __future__ import annotations

import math
import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from karma.core.stats import (
    holm,
    is_significant,
    mcnemar_exact,
    sign_flip_p,
    t_quantile,
    tango_ci,
)

Z = 1.959963984540054  # two-sided 95 %


@dataclass
class Estimate:
    """A number with its 95 % interval (``lo``/``hi`` None when unknown), its seed spread and,
    for a difference, its test: ``p`` (raw), ``p_holm`` (adjusted), ``items``, ``test``."""

    value: float
    lo: float | None = None
    hi: float | None = None
    sd: float | None = None
    n: int = 1
    p: float | None = None
    how: str = ""
    p_holm: float | None = None
    items: int = 0
    test: str = ""

    @property
    def se(self) -> float | None:
        """Standard error implied by the interval."""
        return None if self.lo is None or self.hi is None else (self.hi - self.lo) / (2 * Z)

    @property
    def significant(self) -> bool:
        """The one rule: Holm-adjusted p < 0.05 and at least 10 items."""
        p = self.p_holm if self.p_holm is not None else self.p
        return is_significant(p, self.items)

    @property
    def sign(self) -> int:
        """+1 / -1 for a significant difference above / below 0, else 0."""
        if not self.significant:
            return 0
        return 1 if self.value > 0 else (-1 if self.value < 0 else 0)


def normal_p(value: float, se: float | None) -> float | None:
    """Two-sided p of ``value / se`` under the normal approximation (None without an se)."""
    if se is None or se <= 0:
        return None
    return float(2 * sps.norm.sf(abs(value) / se))


def paired(a: np.ndarray, b: np.ndarray, *, seed: int, n_boot: int = 2000) -> dict[str, float]:
    """mean(a) - mean(b) with a 95 % interval and p over aligned items.

    ``a``/``b`` are scores per item, or per (replicate, item) for several seeds. One run per
    side: Tango's interval and the exact McNemar p for 0/1 items, else a seeded paired bootstrap
    and the sign-flip p (as :func:`karma.core.stats.paired`). Replicates: items resampled
    jointly on both sides (paired), replicates independently on each side; the p is the
    bootstrap's two-sided share of differences on the other side of 0.
    """
    a2, b2 = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a2.shape[1] != b2.shape[1] or a2.shape[1] == 0:
        raise ValueError("paired: a and b need the same, non-zero number of items")
    m = a2.shape[1]
    out = {"score": float(a2.mean() - b2.mean()), "n": float(m)}
    binary = np.isin(a2, (0.0, 1.0)).all() and np.isin(b2, (0.0, 1.0)).all()
    if a2.shape[0] == b2.shape[0] == 1 and binary:
        out["ci_low"], out["ci_high"] = tango_ci(a2[0], b2[0])
        out["p"], out["test"] = mcnemar_exact(a2[0], b2[0]), "mcnemar"  # type: ignore[assignment]
        return out
    d = _replicate_draws(a2, b2, seed=seed, n_boot=n_boot)
    out["ci_low"], out["ci_high"] = float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))
    if a2.shape[0] == b2.shape[0] == 1:
        out["p"] = sign_flip_p(a2[0], b2[0], n_perm=n_boot, seed=seed)
        out["test"] = "sign_flip"  # type: ignore[assignment]
    else:
        share = min(float(np.mean(d <= 0)), float(np.mean(d >= 0)))
        out["p"] = min(1.0, 2 * share)
        out["test"] = "bootstrap"  # type: ignore[assignment]
    return out


def _replicate_draws(a2: np.ndarray, b2: np.ndarray, *, seed: int, n_boot: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = a2.shape[1]
    chunk = max(1, 2_000_000 // (m * max(a2.shape[0], b2.shape[0])))
    draws = []
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)

        def side(x: np.ndarray, k: int = k) -> np.ndarray:
            if x.shape[0] == 1:
                return np.broadcast_to(x[0], (k, m))
            return x[rng.integers(0, x.shape[0], size=(k, x.shape[0]))].mean(axis=1)

        diff = side(a2) - side(b2)
        items = rng.integers(0, m, size=(k, m))
        draws.append(np.take_along_axis(diff, items, axis=1).mean(axis=1))
    return np.concatenate(draws)


def total_replicates(
    sides: Sequence[tuple[np.ndarray, np.ndarray]], *, seed: int, n_boot: int = 2000
) -> dict[str, float]:
    """The Total (mean over benchmarks) of ``a - b`` with replicate runs: each draw resamples
    the runs of each side once (a run spans every benchmark) and every benchmark's items;
    percentile interval and the bootstrap's two-sided p."""
    rng = np.random.default_rng(seed)
    n_a, n_b = sides[0][0].shape[0], sides[0][1].shape[0]
    totals = np.zeros(n_boot)
    for k in range(n_boot):
        ra, rb = rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)
        for a2, b2 in sides:
            m = a2.shape[1]
            items = rng.integers(0, m, m)
            totals[k] += a2[ra][:, items].mean() - b2[rb][:, items].mean()
    totals /= len(sides)
    value = float(np.mean([a2.mean() - b2.mean() for a2, b2 in sides]))
    share = min(float(np.mean(totals <= 0)), float(np.mean(totals >= 0)))
    low, high = np.percentile(totals, [2.5, 97.5])
    return {"score": value, "ci_low": float(low), "ci_high": float(high), "p": min(1.0, 2 * share)}


def replicates(ests: Sequence[Estimate]) -> Estimate:
    """Mean ± sd over seeds; interval ``mean ± t(n-1) * se`` with se² = sd²/n (seed noise)
    + the mean of the runs' se² (shared items)."""
    if len(ests) == 1:
        return ests[0]
    vals = [e.value for e in ests]
    n, mean = len(vals), math.fsum(vals) / len(vals)
    sd = statistics.stdev(vals)
    ses = [e.se for e in ests]
    if any(s is None for s in ses):
        return Estimate(mean, sd=sd, n=n)
    se = math.sqrt(sd**2 / n + math.fsum(s**2 for s in ses) / n)  # type: ignore[operator]
    half = t_quantile(n) * se
    return Estimate(mean, mean - half, mean + half, sd=sd, n=n, how=ests[0].how)


def linear(ests: Sequence[Estimate], weights: Sequence[float], how: str = "") -> Estimate:
    """sum w·x of independent estimates (normal approximation for the interval and p)."""
    value = math.fsum(w * e.value for e, w in zip(ests, weights, strict=True))
    ses = [e.se for e in ests]
    items = min((e.items for e in ests), default=0)
    if any(s is None for s in ses):
        return Estimate(value, how=how, items=items)
    se = math.sqrt(math.fsum((w * s) ** 2 for s, w in zip(ses, weights, strict=True)))  # type: ignore[operator]
    p = normal_p(value, se)
    return Estimate(value, value - Z * se, value + Z * se, p=p, how=how, items=items, test="normal")


def adjust(diffs: dict[str, Estimate]) -> None:
    """Holm-adjust the p of one comparison's columns in place (``p_holm``)."""
    names = [k for k, d in diffs.items() if d.p is not None]
    for name, p in zip(names, holm([float(diffs[k].p) for k in names]), strict=True):  # type: ignore[arg-type]
        diffs[name].p_holm = p


def seed_of(seed: int, *parts: str) -> int:
    """A reproducible sub-seed per comparison (independent of the order of the tables)."""
    return zlib.crc32(":".join([str(seed), *parts]).encode())
