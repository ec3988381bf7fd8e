"""karma.core.stats against independent references (scipy, plain-python loops, hand-worked
cases)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from karma.core import stats
from karma.core.stats import (
    aggregate_replicates,
    compare_paired,
    mcnemar_exact,
    mean_ci,
    paired_bootstrap_ci,
    sign_flip_p,
    to_metrics,
)


def _loop_bootstrap(a, b, n_boot, seed, level=0.95):
    """Plain-python reference: one row of n uniforms per resample, index floor(u * n)."""
    rng = np.random.default_rng(seed)
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    means = []
    for _ in range(n_boot):
        row = rng.random(n)
        means.append(sum(d[min(int(u * n), n - 1)] for u in row) / n)
    means.sort()

    def pct(q):  # numpy's default linear interpolation
        pos = (len(means) - 1) * q
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    tail = (1 - level) / 2
    return pct(tail), pct(1 - tail)


# ---------------------------------------------------------------- mean_ci


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 49), (25, 49), (49, 49), (1, 1), (7, 40)])
def test_wilson_matches_scipy(k, n):
    est = mean_ci([1] * k + [0] * (n - k))
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert est.method == "wilson"
    assert est.mean == pytest.approx(k / n)
    assert (est.ci_low, est.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_wilson_hand_worked():
    # k = 0: upper bound z^2 / (n + z^2) with z = 1.959964
    z2 = 1.959963984540054**2
    est = mean_ci([0] * 10)
    assert est.ci_low == 0.0
    assert est.ci_high == pytest.approx(z2 / (10 + z2), rel=1e-12)
    assert est.se == 0.0


def test_se_is_sample_sd_over_sqrt_n_like_lm_eval():
    x = [1, 0, 0, 1, 1, 1, 0]
    assert mean_ci(x).se == pytest.approx(sps.sem(x), rel=1e-12)
    # lm-eval's own mean_stderr (sample sd, n - 1)
    from lm_eval.api.metrics import mean_stderr

    assert mean_ci(x).se == pytest.approx(mean_stderr(x), rel=1e-12)


def test_t_interval_matches_scipy():
    x = np.random.default_rng(3).normal(0.4, 0.2, size=23)
    est = mean_ci(x)
    low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert est.method == "t"
    assert (est.ci_low, est.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert est.se == pytest.approx(sps.sem(x), rel=1e-12)
    wider = mean_ci(x, level=0.99)
    assert wider.ci_low < est.ci_low < est.ci_high < wider.ci_high


def test_mean_ci_edge_cases():
    same = mean_ci([0.5] * 5)
    assert (same.mean, same.se, same.ci_low, same.ci_high) == (0.5, 0.0, 0.5, 0.5)
    one = mean_ci([0.3])
    assert one.n == 1 and one.mean == 0.3
    assert math.isnan(one.se) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    one_bin = mean_ci([1])
    assert one_bin.method == "wilson" and 0 < one_bin.ci_low < 1 == one_bin.ci_high
    assert mean_ci([0, 1, 1], binary=False).method == "t"
    with pytest.raises(ValueError, match="not all 0 or 1"):
        mean_ci([0.5, 1], binary=True)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        mean_ci([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1, 0], level=95)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_matches_plain_loop():
    rng = np.random.default_rng(11)
    a, b = rng.integers(0, 2, 49), rng.integers(0, 2, 49)
    got = paired_bootstrap_ci(a, b, n_boot=2000, seed=7)
    ref = _loop_bootstrap(a.tolist(), b.tolist(), 2000, 7)
    assert got == pytest.approx(ref, abs=1e-12)
    ref90 = _loop_bootstrap(a.tolist(), b.tolist(), 2000, 7, level=0.9)
    assert paired_bootstrap_ci(a, b, n_boot=2000, seed=7, level=0.9) == pytest.approx(ref90)


def test_bootstrap_continuous_matches_loop_and_blocks(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.random(37), rng.random(37)
    whole = paired_bootstrap_ci(a, b, n_boot=999, seed=1)
    assert whole == pytest.approx(_loop_bootstrap(list(a), list(b), 999, 1), abs=1e-12)
    monkeypatch.setattr(stats, "_CHUNK_ELEMS", 37 * 10 + 5)  # blocks of 10 resamples
    assert paired_bootstrap_ci(a, b, n_boot=999, seed=1) == pytest.approx(whole, abs=1e-12)


def test_bootstrap_deterministic_and_seed_sensitive():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    first = paired_bootstrap_ci(a, b, n_boot=500, seed=42)
    assert paired_bootstrap_ci(a, b, n_boot=500, seed=42) == first
    assert paired_bootstrap_ci(a, b, n_boot=500, seed=43) != first
    low, high = first
    assert low <= float(np.mean(a) - np.mean(b)) <= high


def test_bootstrap_edge_cases():
    assert paired_bootstrap_ci([1, 0, 1], [1, 0, 1], n_boot=100) == (0.0, 0.0)
    assert paired_bootstrap_ci([0.7], [0.2], n_boot=50) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_ci([1], [0], n_boot=0)


# ---------------------------------------------------------------- tests


def test_mcnemar_hand_worked_three_discordant_of_49():
    base = np.zeros(49, dtype=int)
    base[:20] = 1
    policy = base.copy()
    policy[20:23] = 1  # 3 items only the policy gets right, none the other way
    assert mcnemar_exact(policy, base) == pytest.approx(0.25)  # 2 * (1/2)^3
    policy[0] = 0  # now 3 wins, 1 loss: 2 * P(Binom(4, 1/2) <= 1) = 2 * 5/16
    assert mcnemar_exact(policy, base) == pytest.approx(0.625)
    assert mcnemar_exact(base, policy) == pytest.approx(0.625)


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (1, 0), (5, 5), (12, 3), (0, 9), (30, 11)])
def test_mcnemar_matches_scipy_binomtest(wins, losses):
    n = wins + losses + 7
    a = np.array([1] * wins + [0] * losses + [1] * 4 + [0] * 3)
    b = np.array([0] * wins + [1] * losses + [1] * 4 + [0] * 3)
    assert a.size == n
    ref = 1.0 if wins + losses == 0 else sps.binomtest(wins, wins + losses, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(ref, rel=1e-12)


def test_mcnemar_rejects_continuous():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1], [0, 1])


def test_sign_flip_hand_worked():
    # d = 1, 2, 3: only all-plus / all-minus reach |sum| = 6 -> 2 / 8
    assert sign_flip_p([1.5, 2.5, 3.5], [0.5, 0.5, 0.5]) == pytest.approx(0.25)
    assert sign_flip_p([0.2, 0.4], [0.2, 0.4]) == 1.0  # all differences zero


def test_sign_flip_exact_matches_scipy_permutation_test():
    rng = np.random.default_rng(2)
    a, b = rng.random(10), rng.random(10) + 0.2
    ref = sps.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
        vectorized=True,
        alternative="two-sided",
    ).pvalue
    assert sign_flip_p(a, b) == pytest.approx(ref, rel=1e-12)


def test_sign_flip_monte_carlo_deterministic_and_close_to_exact():
    rng = np.random.default_rng(4)
    a, b = rng.random(12), rng.random(12)
    exact = sign_flip_p(a, b, n_perm=2**12)
    mc = sign_flip_p(a, b, n_perm=4000, seed=9)
    assert mc == sign_flip_p(a, b, n_perm=4000, seed=9)
    assert mc != exact and mc == pytest.approx(exact, abs=0.03)
    # 2**20 > n_perm: Monte Carlo; no draw beats all-positive differences -> 1 / (1 + n_perm)
    assert sign_flip_p(np.arange(1.0, 21.0), np.zeros(20), n_perm=999) == pytest.approx(1e-3)


# ---------------------------------------------------------------- compare / replicates / dict


def test_compare_paired_binary_and_continuous():
    base = np.array([1] * 20 + [0] * 29)
    policy = base.copy()
    policy[20:23] = 1
    cmp = compare_paired(policy, base, n_boot=1000, seed=3)
    assert cmp.test == "mcnemar" and cmp.p == pytest.approx(0.25) and not cmp.significant
    assert (cmp.delta, cmp.n, cmp.wins, cmp.losses) == (pytest.approx(3 / 49), 49, 3, 0)
    assert (cmp.ci_low, cmp.ci_high) == stats.tango_ci(policy, base)  # 0/1 items: Tango
    assert cmp.ci_low < 0 < cmp.ci_high
    cont_pair = ([0.5, 1.5, 2.5, 0.2], [0.1, 0.2, 0.4, 0.3])  # continuous: the bootstrap
    cc = compare_paired(*cont_pair, n_boot=500, seed=3)
    assert (cc.ci_low, cc.ci_high) == paired_bootstrap_ci(*cont_pair, n_boot=500, seed=3)
    strong = compare_paired([1] * 40, [0] * 40, n_boot=200)
    assert strong.significant and strong.p == pytest.approx(2 * 0.5**40)
    cont = compare_paired([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], n_boot=200)
    assert cont.test == "sign_flip" and cont.p == pytest.approx(0.25)
    # fewer than MIN_ITEMS items: never significant, whatever alpha
    assert not compare_paired([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], alpha=0.3).significant
    many = np.arange(1.0, 13.0)
    assert compare_paired(many, many - 1, alpha=0.3, n_boot=500).significant


def test_aggregate_replicates():
    rep = aggregate_replicates([0.31, 0.35, 0.36])
    assert rep.mean == pytest.approx(1.02 / 3)
    assert rep.sd == pytest.approx(float(np.std([0.31, 0.35, 0.36], ddof=1)))
    assert rep.n == 3
    one = aggregate_replicates([0.4])
    assert one.n == 1 and math.isnan(one.sd)
    with pytest.raises(ValueError, match="empty"):
        aggregate_replicates([])


def test_to_metrics_is_flat_json():
    cmp = compare_paired([1, 1, 0, 1], [0, 1, 0, 1], n_boot=100)
    flat = to_metrics(cmp, prefix="arc_easy.")
    assert set(flat) == {
        f"arc_easy.{k}"
        for k in ("delta", "ci_low", "ci_high", "p", "n", "wins", "losses", "test", "significant")
    }
    assert flat["arc_easy.significant"] is False and flat["arc_easy.n"] == 4
    est = to_metrics(mean_ci([0.3]))
    assert est["se"] is None and est["ci_low"] is None and est["mean"] == 0.3
    json.dumps(est, allow_nan=False)  # NaN would raise


# ---------------------------------------------------------------- the eval.json keys


def test_estimate_is_the_eval_json_keys_of_mean_ci():
    items = [1] * 16 + [0] * 33  # 16 of 49 prompts, like the default run's IFEval
    est = stats.estimate(items)
    ref = sps.binomtest(16, 49).proportion_ci(confidence_level=0.95, method="wilson")
    assert est == {
        "score": round(16 / 49, 6),
        "ci_low": round(ref.low, 6),
        "ci_high": round(ref.high, 6),
        "stderr": round(float(np.std(items, ddof=1)) / 7, 6),
        "n": 49,
    }
    cont = stats.estimate([0.2, 0.4, 0.9])
    t = sps.t.ppf(0.975, 2) * np.std([0.2, 0.4, 0.9], ddof=1) / math.sqrt(3)
    assert (cont["ci_low"], cont["ci_high"]) == pytest.approx((0.5 - t, 0.5 + t), abs=1e-6)
    assert stats.estimate([1])["stderr"] is None  # NaN -> JSON null


def test_paired_matches_the_reference_bootstrap_and_exact_test():
    """delta.<bench>.* of eval.json: p against scipy's exact binomial test of the discordant
    items, Tango's interval for 0/1 items, significance from the p (not from the interval)."""
    rng = np.random.default_rng(7)
    base = (rng.random(49) < 0.35).astype(float)
    policy = base.copy()
    flip = rng.choice(49, size=9, replace=False)
    policy[flip[:7]] = 1  # mostly wins
    policy[flip[7:]] = 0
    got = stats.paired(policy, base, seed=11, n_boot=2000)
    wins, losses = int(np.sum(policy > base)), int(np.sum(policy < base))
    assert got["score"] == round(policy.mean() - base.mean(), 6)
    assert (got["n"], got["wins"], got["losses"]) == (49, wins, losses)
    exact = sps.binomtest(wins, wins + losses, 0.5).pvalue
    assert got["p"] == pytest.approx(exact, rel=1e-5)
    assert got["significant"] == int(exact < 0.05)  # from the test, not the interval
    assert (got["ci_low"], got["ci_high"]) == tuple(
        round(x, 6) for x in stats.tango_ci(policy, base)
    )
    # 3 prompts of 49 lost: the interval holds 0, not significant (the IFEval example)
    drop = base.copy()
    drop[np.flatnonzero(base)[:3]] = 0
    noise = stats.paired(drop, base, seed=0, n_boot=2000)
    assert noise["score"] == round(-3 / 49, 6) and noise["ci_low"] < 0
    assert noise["p"] == pytest.approx(0.25) and noise["significant"] == 0
    # 12 of 40 gained, none lost: significant, by the interval and by the test
    strong = stats.paired([1] * 12 + [0] * 28, [0] * 40, seed=0, n_boot=2000)
    assert strong["significant"] == 1 and strong["ci_low"] > 0
    assert strong["p"] == pytest.approx(2 * 0.5**12, rel=1e-5)
    json.dumps(strong, allow_nan=False)
    # seeded: the same seed gives the same interval
    assert stats.paired(policy, base, seed=11, n_boot=2000) == got


# ---------------------------------------------------------------- one significance rule (issue 20)


@pytest.mark.parametrize(("wins", "losses", "p"), [(4, 0, 0.125), (5, 0, 0.0625), (7, 1, 0.0703125),
                                                   (9, 2, 0.0654296875)])  # fmt: skip
def test_p_and_significant_agree_on_the_audit_cases(wins: int, losses: int, p: float) -> None:
    """42 items with 4 wins and 0 losses (and the other audit cases): p >= 0.05, never flagged,
    and ``Comparison.significant`` says the same as the eval.json key."""
    base = np.array([0] * wins + [1] * losses + [1] * 10 + [0] * (32 - wins - losses))
    policy = base.copy()
    policy[:wins], policy[wins : wins + losses] = 1, 0
    got = stats.paired(policy, base, seed=0, n_boot=500)
    assert got["p"] == pytest.approx(p, rel=1e-5) and got["significant"] == 0
    assert not compare_paired(policy, base, n_boot=500).significant


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_to_three_items_all_won_are_never_significant(n: int) -> None:
    got = stats.paired([1] * n, [0] * n, seed=0, n_boot=200)
    assert got["significant"] == 0 and got["ci_low"] < got["ci_high"]
    family = {"a": dict(got), "b": dict(got)}
    stats.adjust_family(family)
    assert family["a"]["significant"] == 0


def test_holm_by_hand() -> None:
    """p = (0.01, 0.04, 0.03, 0.20): sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 =
    0.04, 0.09, 0.08 -> 0.09 (monotone), 0.20 -> 0.20."""
    assert stats.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.6, 0.6]) == [1.0, 1.0]
    fam = {
        "x": {"p": 0.01, "n": 40},
        "y": {"p": 0.04, "n": 40},
        "z": {"p": 0.03, "n": 40},
        "w": {"p": 0.20, "n": 40},
    }
    stats.adjust_family(fam)
    assert [fam[k]["significant"] for k in "xyzw"] == [1, 0, 0, 0]  # raw: x, y, z < 0.05
    assert fam["y"]["p"] == 0.04 and fam["y"]["p_holm"] == pytest.approx(0.09)


@pytest.mark.parametrize("n", [1, 2, 10, 42, 500])
def test_no_zero_width_interval_when_nothing_is_discordant(n: int) -> None:
    """No discordant item: Tango's bound is z^2 / (n + z^2) (7.7-9 % for 40-49 items), not 0."""
    z2 = 1.959963984540054**2
    for same in ([1] * n, [0] * n, ([1, 0] * n)[:n]):
        low, high = stats.tango_ci(same, same)
        assert high == pytest.approx(z2 / (n + z2), rel=1e-6) and low == pytest.approx(-high)
        got = stats.paired(same, same, seed=0, n_boot=200)
        assert got["ci_low"] < 0 < got["ci_high"]


def test_tango_bounds_are_where_the_score_statistic_is_z() -> None:
    """At each bound the score statistic equals -+z (checked against a direct evaluation with
    the restricted MLE found by a grid search of the likelihood)."""
    a = np.array([1] * 9 + [0] * 2 + [1] * 10 + [0] * 21)
    b = np.array([0] * 9 + [1] * 2 + [1] * 10 + [0] * 21)
    n, nb, nc = 42, 9, 2
    low, high = stats.tango_ci(a, b)
    grid = np.linspace(1e-9, 1 - 1e-9, 200001)
    for d0, sign in ((low, 1), (high, -1)):
        q = grid[(grid + d0 > 0) & (1 - 2 * grid - d0 > 0)]
        ll = nb * np.log(q + d0) + nc * np.log(q) + (n - nb - nc) * np.log(1 - 2 * q - d0)
        q21 = q[np.argmax(ll)]
        t = (nb - nc - n * d0) / math.sqrt(n * (2 * q21 + d0 * (1 - d0)))
        assert t == pytest.approx(sign * 1.959963984540054, abs=2e-3)


def test_total_bootstrap_and_replicate_t() -> None:
    rng = np.random.default_rng(0)
    diffs = [rng.normal(0.1, 1, 40) for _ in range(5)]
    mean, low, high = stats.stratified_bootstrap(diffs, n_boot=4000, seed=1)
    assert mean == pytest.approx(np.mean([d.mean() for d in diffs]))
    se = math.sqrt(sum(d.var(ddof=1) / d.size for d in diffs)) / 5
    assert low == pytest.approx(mean - 1.96 * se, abs=0.03) and high > mean > low
    assert 0 < stats.stratified_sign_flip_p(diffs, n_perm=2000, seed=0) <= 1
    assert stats.t_quantile(2) == pytest.approx(12.706, rel=1e-4)


def test_cluster_interval_is_wider_than_the_independent_one_when_prompts_cluster() -> None:
    """IFEval instructions cluster in prompts: all-or-nothing prompts carry less information
    than the same number of independent instructions. Reference: the delete-a-cluster
    jackknife, and the closed form for one value per cluster (the plain t interval)."""
    clusters = [[1.0, 1.0, 1.0]] * 10 + [[0.0, 0.0, 0.0]] * 10 + [[1.0, 0.0]] * 5
    flat = [v for c in clusters for v in c]
    got = stats.cluster_mean_ci(clusters)
    naive = mean_ci(flat, binary=False)
    assert got.mean == pytest.approx(np.mean(flat))
    assert got.se > 1.5 * naive.se
    n = len(clusters)
    loo = [np.mean([v for j, c in enumerate(clusters) if j != i for v in c]) for i in range(n)]
    jack = math.sqrt((n - 1) / n * np.sum((np.array(loo) - np.mean(loo)) ** 2))
    assert got.se == pytest.approx(jack, rel=0.15)
    single = stats.cluster_mean_ci([[v] for v in [0.2, 0.5, 0.9, 0.4]])
    t = mean_ci([0.2, 0.5, 0.9, 0.4])
    assert single.se == pytest.approx(t.se) and single.ci_low == pytest.approx(t.ci_low)
