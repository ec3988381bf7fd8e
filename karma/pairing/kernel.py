"""The pair search in Numba: one pass over CSR-like completions, every strategy of
:data:`karma.pairing.strategies.SPECS` (codes from the table), reasons as small integers.

The plain-Python rules (:mod:`karma.pairing.strategies`, applied by
:func:`karma.pairing.reference.reference_pair`) are the reference: the tests compare the two
on random instructions. A new strategy is a ``_pick_*`` function and a branch of
:func:`_pick`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from karma.core.errors import KarmaError
from karma.pairing.rng import splitmix64_nb, stream_seed
from karma.pairing.strategies import POOLS, strategy_code

#: Strategy codes of the kernel (from the spec table).
SCORE, SIM, SCORE_SIM, RLAIF, RANDOM = (
    strategy_code(s) for s in ("score", "sim", "score_sim", "rlaif", "random")
)
#: Reason codes returned by the kernel (index into :data:`REASONS`; 0 = kept).
REASONS = (
    "kept",
    "too_few_candidates",
    "unknown_models",
    "no_eligible_pair",
    "tie",
    "identical_text",
)
KEPT, TOO_FEW, UNKNOWN, NO_ELIGIBLE, TIE, IDENTICAL = range(6)


@njit(cache=True, nogil=True)
def _pick_random(lo, hi, cand, ncand, draw):  # type: ignore[no-untyped-def]
    """The ``draw``-th candidate pair (p < q, in record order)."""
    k = np.int64(draw % np.uint64(ncand * (ncand - 1) // 2))
    for p in range(lo, hi):
        if not cand[p]:
            continue
        for q in range(p + 1, hi):
            if not cand[q]:
                continue
            if k == 0:
                return p, q
            k -= 1
    return -1, -1


@njit(cache=True, nogil=True)
def _pick_best_pair(lo, hi, cand, model, s_pref, kin, tau, by_score):  # type: ignore[no-untyped-def]
    """``score`` (by_score) or ``sim``: the best eligible pair, then the other key, then first."""
    a = -1
    b = -1
    best1 = 0.0
    best2 = 0.0
    for p in range(lo, hi):
        if not cand[p]:
            continue
        mp = model[p]
        for q in range(p + 1, hi):
            if not cand[q]:
                continue
            mq = model[q]
            if mp == mq:
                continue
            k_pq = kin[mp, mq]
            if not k_pq >= tau:  # NaN kinship (or tau) is never kin
                continue
            ssum = s_pref[mp] + s_pref[mq]
            if by_score:
                v1 = ssum
                v2 = k_pq
            else:
                v1 = k_pq
                v2 = ssum
            if a < 0 or v1 > best1 or (v1 == best1 and v2 > best2):
                a = p
                b = q
                best1 = v1
                best2 = v2
    return a, b


@njit(cache=True, nogil=True)
def _pick_score_sim(lo, hi, cand, model, s_pref, kin, tau):  # type: ignore[no-untyped-def]
    """The best-S_pref candidate with a kin partner, and its most-kin partner."""
    a = -1
    best_s = 0.0
    for p in range(lo, hi):
        if not cand[p]:
            continue
        mp = model[p]
        if a >= 0 and not s_pref[mp] > best_s:
            continue
        for q in range(lo, hi):
            if q == p or not cand[q]:
                continue
            mq = model[q]
            if mq != mp and kin[mp, mq] >= tau:
                a = p
                best_s = s_pref[mp]
                break
    if a < 0:
        return -1, -1
    ma = model[a]
    b = -1
    bk = 0.0
    bs = 0.0
    for q in range(lo, hi):
        if q == a or not cand[q]:
            continue
        mq = model[q]
        if mq == ma:
            continue
        k_aq = kin[ma, mq]
        if not k_aq >= tau:
            continue
        if b < 0 or k_aq > bk or (k_aq == bk and s_pref[mq] > bs):
            b = q
            bk = k_aq
            bs = s_pref[mq]
    return a, b


@njit(cache=True, nogil=True)
def _pick(strategy, lo, hi, cand, ncand, model, s_pref, kin, tau, draw):  # type: ignore[no-untyped-def]
    """The pair of a scored-candidate strategy, (-1, -1) when none is eligible."""
    if strategy == RANDOM:
        return _pick_random(lo, hi, cand, ncand, draw)
    if strategy == SCORE or strategy == SIM:  # noqa: SIM109 (Numba: no tuple test)
        return _pick_best_pair(lo, hi, cand, model, s_pref, kin, tau, strategy == SCORE)
    return _pick_score_sim(lo, hi, cand, model, s_pref, kin, tau)


@njit(cache=True, nogil=True)
def _rlaif_row(lo, hi, cand, model, nonempty, rating, s_pref, pool_all, draw):  # type: ignore[no-untyped-def]
    """``rlaif`` for one instruction: (chosen, rejected, reason)."""
    count = 0
    nrated = 0
    best = -1
    best_r = 0.0
    for c in range(lo, hi):
        ok = nonempty[c] and not np.isnan(rating[c])
        if ok:
            nrated += 1
            ok = pool_all or (model[c] >= 0 and not np.isnan(s_pref[model[c]]))
        cand[c] = ok
        if ok:
            count += 1
            if best < 0 or rating[c] > best_r:
                best = c
                best_r = rating[c]
    if count < 2:
        return -1, -1, UNKNOWN if nrated >= 2 else TOO_FEW
    nlower = 0
    for c in range(lo, hi):
        if cand[c] and rating[c] < best_r:
            nlower += 1
    if nlower == 0:
        return -1, -1, TIE
    k = np.int64(draw % np.uint64(nlower))
    for c in range(lo, hi):
        if cand[c] and rating[c] < best_r:
            if k == 0:
                return best, c, KEPT
            k -= 1
    return -1, -1, TIE  # not reached


@njit(cache=True, nogil=True)
def _pair_row(strategy, lo, hi, cand, model, nonempty, rating, s_pref, kin, tau, stream, row,
              pool_all):  # type: ignore[no-untyped-def]  # fmt: skip
    """One instruction (completions ``lo:hi``): (chosen, rejected, reason)."""
    if strategy == RLAIF:
        draw = splitmix64_nb(stream, np.uint64(row))
        return _rlaif_row(lo, hi, cand, model, nonempty, rating, s_pref, pool_all, draw)
    ncand = 0
    nne = 0
    for c in range(lo, hi):
        ok = False
        if nonempty[c]:
            nne += 1
            if model[c] >= 0 and not np.isnan(s_pref[model[c]]):
                ok = True
                ncand += 1
        cand[c] = ok
    if ncand < 2:
        return -1, -1, UNKNOWN if nne >= 2 else TOO_FEW
    draw = np.uint64(0)
    if strategy == RANDOM:
        draw = splitmix64_nb(stream, np.uint64(row))
    a, b = _pick(strategy, lo, hi, cand, ncand, model, s_pref, kin, tau, draw)
    if a < 0:
        return -1, -1, NO_ELIGIBLE
    sa = s_pref[model[a]]
    sb = s_pref[model[b]]
    if sa == sb:
        return -1, -1, TIE
    if sa > sb:
        return a, b, KEPT
    return b, a, KEPT


@njit(cache=True, nogil=True)
def pair_kernel(
    offsets: np.ndarray,  # int64 (n+1,)  completions of instruction i: offsets[i]:offsets[i+1]
    model: np.ndarray,  # int64 (c,)  index into s_pref / kin, -1 = unknown
    nonempty: np.ndarray,  # bool (c,)
    rating: np.ndarray,  # float64 (c,), NaN = missing
    s_pref: np.ndarray,  # float64 (m,), NaN = missing
    kin: np.ndarray,  # float64 (m, m), NaN = unknown
    strategy: int,
    tau: float,
    stream: np.uint64,  # the strategy's random stream (stream_seed)
    row0: int,  # global row of instruction 0 (the random numbers follow the global row)
    pool_all: bool,  # rlaif: every rated response (else only those of scored models)
    out_chosen: np.ndarray,  # int64 (n,), flat completion index or -1
    out_rejected: np.ndarray,  # int64 (n,)
    out_reason: np.ndarray,  # int8 (n,)
) -> None:
    """Pair every instruction (see :func:`pair_arrays`)."""
    cand = np.zeros(model.shape[0], dtype=np.bool_)
    for i in range(offsets.shape[0] - 1):
        c, r, why = _pair_row(strategy, offsets[i], offsets[i + 1], cand, model, nonempty,
                              rating, s_pref, kin, tau, stream, row0 + i, pool_all)  # fmt: skip
        out_chosen[i] = c
        out_rejected[i] = r
        out_reason[i] = why


@njit(cache=True, nogil=True)
def same_pair_kernel(
    offsets: np.ndarray,
    model: np.ndarray,
    nonempty: np.ndarray,
    rating: np.ndarray,
    s_pref: np.ndarray,
    kin: np.ndarray,
    strategies: np.ndarray,  # int64 (k,) strategy codes
    streams: np.ndarray,  # uint64 (k,) their random streams
    tau: float,
    row0: int,
    pool_all: bool,
    chosen: np.ndarray,  # int64 (n,) the pairs to compare with (-1: none)
    rejected: np.ndarray,
    out: np.ndarray,  # int64 (k,) += instructions where strategy k makes the same pair
) -> None:
    """How often each strategy makes the same (chosen, rejected) pair, over the instructions
    with a pair (identical texts need no check: such a pair is never among the given ones)."""
    cand = np.zeros(model.shape[0], dtype=np.bool_)
    for i in range(offsets.shape[0] - 1):
        if chosen[i] < 0:
            continue
        for k in range(strategies.shape[0]):
            c, r, _ = _pair_row(strategies[k], offsets[i], offsets[i + 1], cand, model,
                                nonempty, rating, s_pref, kin, tau, streams[k], row0 + i,
                                pool_all)  # fmt: skip
            if c == chosen[i] and r == rejected[i]:
                out[k] += 1


@njit(cache=True, nogil=True)
def pool_kernel(
    offsets: np.ndarray, model: np.ndarray, ok: np.ndarray, m: int, out: np.ndarray
) -> None:
    """``out[a, b]`` (a < b) += 1 for every pair of candidate completions of models a != b."""
    for i in range(offsets.shape[0] - 1):
        for p in range(offsets[i], offsets[i + 1]):
            if not ok[p]:
                continue
            for q in range(p + 1, offsets[i + 1]):
                if not ok[q] or model[p] == model[q]:
                    continue
                a = min(model[p], model[q])
                b = max(model[p], model[q])
                out[a, b] += 1


def _contiguous(
    offsets: np.ndarray,
    model: np.ndarray,
    nonempty: np.ndarray,
    rating: np.ndarray,
    s_pref: np.ndarray,
    kin: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """The kernels' row arrays, contiguous and of the dtypes they are compiled for."""
    return (
        np.ascontiguousarray(offsets, dtype=np.int64),
        np.ascontiguousarray(model, dtype=np.int64),
        np.ascontiguousarray(nonempty, dtype=np.bool_),
        np.ascontiguousarray(rating, dtype=np.float64),
        np.ascontiguousarray(s_pref, dtype=np.float64),
        np.ascontiguousarray(kin, dtype=np.float64),
    )


def pair_arrays(
    offsets: np.ndarray,
    model: np.ndarray,
    nonempty: np.ndarray,
    rating: np.ndarray,
    s_pref: np.ndarray,
    kin: np.ndarray,
    *,
    strategy: str,
    tau: float = 0.1,
    seed: int = 0,
    pool: str = "scored",
    row0: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the pair search over CSR-like ``offsets``; returns (chosen, rejected, reason) per
    instruction (flat completion indices, -1 when dropped; reason codes index :data:`REASONS`).
    ``identical_text`` is not decided here (see :func:`karma.pairing.pool.search`). ``row0``:
    the global row of the first instruction (random draws follow it, so batches give the same
    pairs)."""
    code = strategy_code(strategy)
    if pool not in POOLS:
        raise KarmaError("unknown pool", field="preferences.baseline_pool", value=pool,
                         expected=" | ".join(POOLS))  # fmt: skip
    n = offsets.shape[0] - 1
    chosen = np.empty(n, dtype=np.int64)
    rejected = np.empty(n, dtype=np.int64)
    reason = np.empty(n, dtype=np.int8)
    pair_kernel(
        *_contiguous(offsets, model, nonempty, rating, s_pref, kin),
        code,
        float(tau),
        np.uint64(stream_seed(seed, strategy)),
        int(row0),
        pool == "all",
        chosen,
        rejected,
        reason,
    )
    return chosen, rejected, reason


def same_pairs(
    offsets: np.ndarray,
    model: np.ndarray,
    nonempty: np.ndarray,
    rating: np.ndarray,
    s_pref: np.ndarray,
    kin: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    strategies: Sequence[str],
    tau: float = 0.1,
    seed: int = 0,
    pool: str = "scored",
    row0: int = 0,
) -> dict[str, int]:
    """For each of ``strategies``: on how many instructions it makes the pair ``(chosen[i],
    rejected[i])`` (instructions without one are skipped); one pass, what comparing
    :func:`pair_arrays` of each strategy with the pairs would count."""
    codes = np.array([strategy_code(s) for s in strategies], dtype=np.int64)
    streams = np.array([stream_seed(seed, s) for s in strategies], dtype=np.uint64)
    out = np.zeros(len(strategies), dtype=np.int64)
    same_pair_kernel(
        *_contiguous(offsets, model, nonempty, rating, s_pref, kin),
        codes,
        streams,
        float(tau),
        int(row0),
        pool == "all",
        np.ascontiguousarray(chosen, dtype=np.int64),
        np.ascontiguousarray(rejected, dtype=np.int64),
        out,
    )
    return dict(zip(strategies, out.tolist(), strict=True))
