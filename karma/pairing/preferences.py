"""Preference pairs per instruction: KARMA kinship-aware pairing and the RLAIF baseline.

Inputs are plain: an :class:`~karma.pairing.ultrafeedback.UltraFeedback` dataset, ``S_pref`` per
model
and the kinship of model pairs (``model_a, model_b, kinship``). Rules, per instruction:

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

>>> import polars as pl
>>> from karma.pairing.ultrafeedback import from_records
>>> data = from_records([("line 1", {"instruction": "Hi", "completions": [
...     {"model": "a", "response": "x"}, {"model": "b", "response": "y"}]})], file="demo")
>>> s_pref = pl.DataFrame({"model": ["a", "b"], "s_pref": [0.2, 0.9]})
>>> kin = pl.DataFrame({"model_a": ["a", "b"], "model_b": ["b", "a"], "kinship": [0.5, 0.5]})
>>> res = make_pairs(data, s_pref, kin, strategy="score")
>>> res.pairs["chosen_model"].to_list(), res.counts["pairs"], res.metrics["diag.changed_by_tau"]
(['b'], 1, 0.0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from numba import njit

from karma.core.errors import KarmaError, did_you_mean
from karma.core.stage import Stage, input_path, output_path
from karma.pairing.agreement import AgreementTally
from karma.pairing.ultrafeedback import UltraFeedback

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

STRATEGIES = ("score", "sim", "score_sim", "rlaif", "random")
#: The KARMA strategies (the ones tau constrains).
KARMA_STRATEGIES = ("score", "sim", "score_sim")
#: Strategy codes of the kernel (index into :data:`STRATEGIES`).
SCORE, SIM, SCORE_SIM, RLAIF, RANDOM = range(5)
RATING_FIELDS = ("overall_score", "fine_grained_score")
LAYOUTS = ("trl", "h4")
POOLS = ("scored", "all")
SPLITS = ("train_prefs", "test_prefs")
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
_MASK = (1 << 64) - 1
#: Counter of the random stream of strategy ``k``: ``splitmix64(seed, _STREAM + k)``.
_STREAM = 0x5EED_0000
#: Counter of the train/test split's stream.
_SPLIT_STREAM = 0x5EED_5EED


def strategy_code(strategy: str) -> int:
    """The kernel's code of a pairing strategy (KarmaError naming the choices)."""
    if strategy not in STRATEGIES:
        raise KarmaError(
            f"unknown pairing strategy{did_you_mean(strategy, STRATEGIES)}",
            field="kinship",
            value=strategy,
            expected=" | ".join(STRATEGIES),
        )
    return STRATEGIES.index(strategy)


# --------------------------------------------------------------------------- randomness
def splitmix64(seed: int, row: int) -> int:
    """Counter-based 64-bit random number for ``(seed, row)`` (plain-Python reference)."""
    z = (seed * 0xD1B54A32D192ED03 + row + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def stream_seed(seed: int, strategy: str) -> int:
    """The seed of ``strategy``'s own random stream (``random`` and ``rlaif`` are independent)."""
    return splitmix64(seed, _STREAM + strategy_code(strategy))


@njit(cache=True)
def _splitmix64_nb(seed: np.uint64, row: np.uint64) -> np.uint64:
    z = seed * np.uint64(0xD1B54A32D192ED03) + row + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


# --------------------------------------------------------------------------- kernel
@njit(cache=True)
def _pair_kernel(
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
    n = offsets.shape[0] - 1
    cand = np.zeros(model.shape[0], dtype=np.bool_)
    for i in range(n):
        lo = offsets[i]
        hi = offsets[i + 1]
        out_chosen[i] = -1
        out_rejected[i] = -1
        if strategy == RLAIF:
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
                out_reason[i] = UNKNOWN if nrated >= 2 else TOO_FEW
                continue
            nlower = 0
            for c in range(lo, hi):
                if cand[c] and rating[c] < best_r:
                    nlower += 1
            if nlower == 0:
                out_reason[i] = TIE
                continue
            r = _splitmix64_nb(stream, np.uint64(row0 + i))
            k = np.int64(r % np.uint64(nlower))
            for c in range(lo, hi):
                if cand[c] and rating[c] < best_r:
                    if k == 0:
                        out_chosen[i] = best
                        out_rejected[i] = c
                        break
                    k -= 1
            out_reason[i] = KEPT
            continue
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
            out_reason[i] = UNKNOWN if nne >= 2 else TOO_FEW
            continue
        a = -1
        b = -1
        if strategy == RANDOM:  # any candidate pair
            npairs = ncand * (ncand - 1) // 2
            r = _splitmix64_nb(stream, np.uint64(row0 + i))
            k = np.int64(r % np.uint64(npairs))
            for p in range(lo, hi):
                if not cand[p]:
                    continue
                for q in range(p + 1, hi):
                    if not cand[q]:
                        continue
                    if k == 0:
                        a = p
                        b = q
                    k -= 1
                if a >= 0:
                    break
        elif strategy in (SCORE, SIM):
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
                    if strategy == SCORE:
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
        else:  # score_sim
            best_s = 0.0
            for p in range(lo, hi):
                if not cand[p]:
                    continue
                mp = model[p]
                if a >= 0 and not s_pref[mp] > best_s:
                    continue
                has = False
                for q in range(lo, hi):
                    if q == p or not cand[q]:
                        continue
                    mq = model[q]
                    if mq != mp and kin[mp, mq] >= tau:
                        has = True
                        break
                if has:
                    a = p
                    best_s = s_pref[mp]
            if a >= 0:
                ma = model[a]
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
        if a < 0:
            out_reason[i] = NO_ELIGIBLE
            continue
        sa = s_pref[model[a]]
        sb = s_pref[model[b]]
        if sa == sb:
            out_reason[i] = TIE
            continue
        if sa > sb:
            out_chosen[i] = a
            out_rejected[i] = b
        else:
            out_chosen[i] = b
            out_rejected[i] = a
        out_reason[i] = KEPT


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
    ``identical_text`` is not decided here (see :func:`search`). ``row0``: the global row of
    the first instruction (random draws follow it, so batches give the same pairs)."""
    code = strategy_code(strategy)
    if pool not in POOLS:
        raise KarmaError("unknown pool", field="preferences.baseline_pool", value=pool,
                         expected=" | ".join(POOLS))  # fmt: skip
    n = offsets.shape[0] - 1
    chosen = np.empty(n, dtype=np.int64)
    rejected = np.empty(n, dtype=np.int64)
    reason = np.empty(n, dtype=np.int8)
    _pair_kernel(
        np.ascontiguousarray(offsets, dtype=np.int64),
        np.ascontiguousarray(model, dtype=np.int64),
        np.ascontiguousarray(nonempty, dtype=np.bool_),
        np.ascontiguousarray(rating, dtype=np.float64),
        np.ascontiguousarray(s_pref, dtype=np.float64),
        np.ascontiguousarray(kin, dtype=np.float64),
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


# --------------------------------------------------------------------------- reference
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

    def kin_of(x: str, y: str) -> float:
        v = kinship.get((x, y), math.nan)
        return math.nan if v is None else v

    def scored(i: int) -> bool:
        v = s_pref.get(completions[i]["model"])
        return v is not None and not math.isnan(v)

    idx = range(len(completions))
    nonempty = [bool(c["response"].strip()) for c in completions]
    draw = splitmix64(stream_seed(seed, strategy), row)
    if strategy == "rlaif":
        rated_any = [i for i in idx if nonempty[i] and completions[i].get(rating) is not None]
        rated = [i for i in rated_any if pool == "all" or scored(i)]
        if len(rated) < 2:
            return -1, -1, "unknown_models" if len(rated_any) >= 2 else "too_few_candidates"
        best = max(rated, key=lambda i: (completions[i][rating], -i))
        top = completions[best][rating]
        lower = [i for i in rated if completions[i][rating] < top]
        if not lower:
            return -1, -1, "tie"
        rej = lower[draw % len(lower)]
        if completions[best]["response"] == completions[rej]["response"]:
            return -1, -1, "identical_text"
        return best, rej, "kept"
    sp = {i: s_pref.get(completions[i]["model"]) for i in idx}
    cands = [i for i in idx if nonempty[i] and scored(i)]
    if len(cands) < 2:
        return -1, -1, "unknown_models" if sum(nonempty) >= 2 else "too_few_candidates"
    pairs = [(p, q) for k, p in enumerate(cands) for q in cands[k + 1 :]]

    def eligible(p: int, q: int) -> bool:
        mp, mq = completions[p]["model"], completions[q]["model"]
        return mp != mq and kin_of(mp, mq) >= tau  # NaN >= tau is False

    if strategy == "random":
        a, b = pairs[draw % len(pairs)]
    else:
        elig = [(p, q) for p, q in pairs if eligible(p, q)]
        if not elig:
            return -1, -1, "no_eligible_pair"
        if strategy == "score":
            a, b = max(
                elig,
                key=lambda pq: (
                    sp[pq[0]] + sp[pq[1]],
                    kin_of(completions[pq[0]]["model"], completions[pq[1]]["model"]),
                    -pq[0],
                    -pq[1],
                ),
            )
        elif strategy == "sim":
            a, b = max(
                elig,
                key=lambda pq: (
                    kin_of(completions[pq[0]]["model"], completions[pq[1]]["model"]),
                    sp[pq[0]] + sp[pq[1]],
                    -pq[0],
                    -pq[1],
                ),
            )
        elif strategy == "score_sim":
            with_partner = sorted({x for pq in elig for x in pq})
            a = max(with_partner, key=lambda i: (sp[i], -i))
            partners = [q for q in cands if q != a and eligible(a, q)]
            b = max(
                partners,
                key=lambda q: (kin_of(completions[a]["model"], completions[q]["model"]), sp[q], -q),
            )
        else:
            raise KarmaError("unknown pairing strategy", field="kinship", value=strategy)
    if sp[a] == sp[b]:
        return -1, -1, "tie"
    if sp[a] < sp[b]:
        a, b = b, a
    if completions[a]["response"] == completions[b]["response"]:
        return -1, -1, "identical_text"
    return a, b, "kept"


# --------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class PreferenceResult:
    """``pairs``: every pair as a TRL frame (see :data:`OUTPUT_COLUMNS`); ``test``: whether
    each pair's prompt is in ``test_prefs``; ``counts``: per-reason counts; ``metrics``: the
    flat metrics dict written for DVC (counts, agreement, diagnostics ``diag.*``, split)."""

    pairs: pl.DataFrame
    counts: dict[str, int]
    metrics: dict[str, Any]
    strategy: str
    tau: float
    seed: int
    test: np.ndarray | None = None
    #: how often each (chosen_model, rejected_model) pair was used, names as written
    model_pairs: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> pl.DataFrame:
        """The pairs of ``train_prefs`` or ``test_prefs``."""
        test = np.zeros(self.pairs.height, bool) if self.test is None else self.test
        return self.pairs.filter(pl.Series(test if name == "test_prefs" else ~test))


#: Codec of the pairs files: fast to write and read, what ``datasets`` itself writes.
PARQUET_COMPRESSION = "snappy"
#: Rows per Parquet row group (fixed, so that the bytes do not depend on how data was batched).
ROW_GROUP = 65_536
OUTPUT_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "prompt_id",
    "chosen_model",
    "rejected_model",
    "kinship",
    "s_pref_chosen",
    "s_pref_rejected",
    "chosen_rating",
    "rejected_rating",
    "source",
)
#: Our metadata columns (both layouts carry them after the layout's own columns).
META_COLUMNS = OUTPUT_COLUMNS[4:]
#: The columns of ``HuggingFaceH4/ultrafeedback_binarized``, in its order.
H4_COLUMNS = (
    "prompt",
    "prompt_id",
    "chosen",
    "rejected",
    "messages",
    "score_chosen",
    "score_rejected",
)


def _arrow_schema(layout: str) -> Any:
    """The Arrow schema written for ``layout`` (string, not large_string: concatenates with
    datasets written by ``datasets``, such as H4's)."""
    import pyarrow as pa

    text = pa.string()
    meta = [
        ("chosen_model", text),
        ("rejected_model", text),
        ("kinship", pa.float64()),
        ("s_pref_chosen", pa.float64()),
        ("s_pref_rejected", pa.float64()),
        ("chosen_rating", pa.float64()),
        ("rejected_rating", pa.float64()),
        ("source", text),
    ]
    if layout == "h4":
        conv = pa.list_(pa.struct([("content", text), ("role", text)]))
        head = [("prompt", text), ("prompt_id", text), ("chosen", conv), ("rejected", conv),
                ("messages", conv), ("score_chosen", pa.float64()),
                ("score_rejected", pa.float64())]  # fmt: skip
    else:
        msgs = pa.list_(pa.struct([("role", text), ("content", text)]))
        head = [("prompt", msgs), ("chosen", msgs), ("rejected", msgs), ("prompt_id", text)]
    return pa.schema(head + meta)


def _s_pref_table(s_pref: pl.DataFrame | Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    if isinstance(s_pref, Mapping):
        names = sorted(s_pref)
        values = np.array([float(s_pref[k]) for k in names], dtype=np.float64)
        return names, values
    for col in ("model", "s_pref"):
        if col not in s_pref.columns:
            raise KarmaError("missing column", field=col, expected="model and s_pref")
    frame = s_pref.select(
        pl.col("model").cast(pl.String), pl.col("s_pref").cast(pl.Float64).fill_nan(None)
    ).sort("model")
    return frame["model"].to_list(), frame["s_pref"].to_numpy().astype(np.float64)


def kinship_matrix(names: Sequence[str], kinship: pl.DataFrame) -> np.ndarray:
    """Dense (m, m) kinship over ``names`` from a long ``model_a, model_b, kinship`` frame
    (NaN for pairs absent from the frame)."""
    for col in ("model_a", "model_b", "kinship"):
        if col not in kinship.columns:
            raise KarmaError(
                "missing column in the kinship frame",
                field=col,
                expected="model_a, model_b, kinship",
            )
    index = {name: i for i, name in enumerate(names)}
    m = len(names)
    mat = np.full((m, m), np.nan, dtype=np.float64)
    k = kinship.select(
        pl.col("model_a").cast(pl.String).replace_strict(index, default=-1, return_dtype=pl.Int64),
        pl.col("model_b").cast(pl.String).replace_strict(index, default=-1, return_dtype=pl.Int64),
        pl.col("kinship").cast(pl.Float64).fill_nan(None),
    ).filter((pl.col("model_a") >= 0) & (pl.col("model_b") >= 0))
    ia, ib = k["model_a"].to_numpy(), k["model_b"].to_numpy()
    mat[ia, ib] = k["kinship"].to_numpy().astype(np.float64)
    return np.where(np.isnan(mat), mat.T, mat)  # a frame may list a pair in one order only


def _model_index(
    models: pl.Series, names: Sequence[str], aliases: Mapping[str, str] | None
) -> np.ndarray:
    """Map completion model names to indices of ``names`` (case-insensitive, aliases first)."""
    lower = {n.strip().lower(): i for i, n in enumerate(names)}
    for alias, target in (aliases or {}).items():
        t = target.strip().lower()
        if t in lower:
            lower[alias.strip().lower()] = lower[t]
    # map the few distinct raw spellings in Python, then every row with one hash lookup
    raw = {m: lower.get(m.strip().lower(), -1) for m in models.unique().to_list()}
    return models.replace_strict(raw, default=-1, return_dtype=pl.Int64).to_numpy()


# --------------------------------------------------------------------------- hashing, split
@njit(cache=True)
def _hash128_kernel(data: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    for i in range(offsets.shape[0] - 1):
        lo = offsets[i]
        hi = offsets[i + 1]
        h1 = np.uint64(0xCBF29CE484222325) ^ np.uint64(hi - lo)
        h2 = np.uint64(0x6A09E667F3BCC909)
        for k in range(lo, hi, 8):  # 8 bytes (little-endian, zero-padded) per step
            w = np.uint64(0)
            for j in range(min(8, hi - k)):
                w |= np.uint64(data[k + j]) << np.uint64(8 * j)
            h1 = (h1 ^ w) * np.uint64(0x100000001B3)
            h1 ^= h1 >> np.uint64(32)
            h2 = (h2 + w + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
            h2 ^= h2 >> np.uint64(29)
        out[i, 0] = _splitmix64_nb(h1, h2)
        out[i, 1] = _splitmix64_nb(h2, h1)


def prompt_id(text: str) -> str:
    """Plain-Python reference of :func:`prompt_ids` for one instruction."""
    data = text.encode("utf-8")
    h1 = 0xCBF29CE484222325 ^ len(data)
    h2 = 0x6A09E667F3BCC909
    for k in range(0, len(data), 8):
        w = int.from_bytes(data[k : k + 8], "little")
        h1 = ((h1 ^ w) * 0x100000001B3) & _MASK
        h1 ^= h1 >> 32
        h2 = ((h2 + w + 1) * 0x9E3779B97F4A7C15) & _MASK
        h2 ^= h2 >> 29
    return f"{splitmix64(h1, h2):016x}{splitmix64(h2, h1):016x}"


_HEX_PAIRS = np.array(  # byte -> its two hex digits as one little-endian uint16
    [ord(f"{b:02x}"[0]) | (ord(f"{b:02x}"[1]) << 8) for b in range(256)], dtype="<u2"
)


def hash128(texts: pl.Series) -> np.ndarray:
    """The 128-bit hash of each string as ``(n, 2)`` uint64 (Numba kernel; see prompt_id)."""
    import pyarrow as pa

    arr = texts.to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros((n, 2), dtype=np.uint64)
    if n:
        _, off, data = arr.buffers()
        offsets = np.frombuffer(off, dtype=np.int64)[arr.offset : arr.offset + n + 1]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(1, np.uint8)
        _hash128_kernel(raw, np.ascontiguousarray(offsets), out)
    return out


def prompt_ids(instructions: pl.Series, hashes: np.ndarray | None = None) -> pl.Series:
    """``prompt_id`` of each instruction: a stable 128-bit hash (32 hex digits) of its UTF-8
    bytes, computed by a Numba kernel (sha256 in a Python loop is several times slower);
    ``hashes``: their :func:`hash128`, when already computed."""
    import pyarrow as pa

    out = hash128(instructions) if hashes is None else hashes
    n = out.shape[0]
    big_endian = out.astype(">u8").view(np.uint8).reshape(n, 16)
    chars = _HEX_PAIRS[big_endian]  # (n, 16) uint16 = (n, 32) ASCII bytes
    offsets32 = np.arange(0, 32 * n + 1, 32, dtype=np.int64)
    hexes = pa.Array.from_buffers(
        pa.large_string(),
        n,
        [None, pa.py_buffer(offsets32), pa.py_buffer(np.ascontiguousarray(chars))],
    )
    out_series = pl.from_arrow(hexes)
    assert isinstance(out_series, pl.Series)
    return out_series.alias("prompt_id")


def sha256_ids(prompts: pl.Series) -> pl.Series:
    """H4's ``prompt_id``: the sha256 hex digest of the prompt's UTF-8 bytes."""
    ids = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in prompts.to_list()]
    return pl.Series("prompt_id", ids, dtype=pl.String)


@njit(cache=True)
def _split_kernel(h: np.ndarray, stream: np.uint64, threshold: np.uint64, out: np.ndarray) -> None:
    for i in range(h.shape[0]):
        out[i] = _splitmix64_nb(stream, h[i]) < threshold


def _threshold(fraction: float) -> int:
    return min(int(fraction * 2.0**64), _MASK)


def is_test(
    prompts: pl.Series, *, seed: int, fraction: float, hashes: np.ndarray | None = None
) -> np.ndarray:
    """Whether each prompt belongs to ``test_prefs``: a seeded hash of its text below
    ``fraction`` (the same prompt is always on the same side; no prompt is in both);
    ``hashes``: their :func:`hash128`, when already computed."""
    out = np.zeros(prompts.len(), dtype=np.bool_)
    if fraction > 0 and prompts.len():
        h = np.ascontiguousarray((hash128(prompts) if hashes is None else hashes)[:, 0])
        stream = np.uint64(splitmix64(seed, _SPLIT_STREAM))
        _split_kernel(h, stream, np.uint64(_threshold(fraction)), out)
    return out


def is_test_reference(prompt: str, *, seed: int, fraction: float) -> bool:
    """Plain-Python reference of :func:`is_test` for one prompt."""
    h = int(prompt_id(prompt)[:16], 16)
    return fraction > 0 and splitmix64(splitmix64(seed, _SPLIT_STREAM), h) < _threshold(fraction)


# --------------------------------------------------------------------------- pair search
@dataclass(frozen=True)
class Pool:
    """The origin models as the kernel sees them: ``names`` (sorted), their ``s_pref`` (NaN when
    undefined) and the ``kin`` matrix over them."""

    names: list[str]
    s_pref: np.ndarray
    kin: np.ndarray

    @classmethod
    def of(cls, s_pref: pl.DataFrame | Mapping[str, float], kinship: pl.DataFrame) -> Pool:
        names, sp = _s_pref_table(s_pref)
        return cls(names, sp, kinship_matrix(names, kinship))

    @property
    def m(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Prepared:
    """A batch of instructions as the kernel's arrays against a :class:`Pool`: one entry per
    completion (``model`` index or -1, ``nonempty``, ``ratings`` per field, a 64-bit
    ``text_hash`` of the response);
    ``row0`` is the global row of the batch's first instruction."""

    data: UltraFeedback
    pool: Pool
    offsets: np.ndarray
    model: np.ndarray
    nonempty: np.ndarray
    ratings: dict[str, np.ndarray]
    text_hash: np.ndarray
    row0: int = 0

    @property
    def n(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def names(self) -> list[str]:
        return self.pool.names

    @property
    def s_pref(self) -> np.ndarray:
        return self.pool.s_pref

    @property
    def kin(self) -> np.ndarray:
        return self.pool.kin


def prepare(
    data: UltraFeedback,
    s_pref: pl.DataFrame | Mapping[str, float] | Pool,
    kinship: pl.DataFrame | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
) -> Prepared:
    """The kernel's arrays of ``data`` against a pool (a :class:`Pool`, or S_pref per model and
    the kinship pairs)."""
    if isinstance(s_pref, Pool):
        pool = s_pref
    else:
        assert kinship is not None, "kinship pairs are needed with S_pref"
        pool = Pool.of(s_pref, kinship)
    comps = data.completions
    n = data.prompts.height
    row0 = int(data.prompts["row"][0]) if n else 0
    rows = comps["row"].to_numpy().astype(np.int64) - row0
    counts_per_row = np.bincount(rows, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts_per_row, out=offsets[1:])
    nonempty = (comps["response"].str.strip_chars().str.len_bytes() > 0).to_numpy()
    ratings = {f: comps[f].fill_null(np.nan).to_numpy().astype(np.float64) for f in RATING_FIELDS}
    return Prepared(
        data=data,
        pool=pool,
        offsets=offsets,
        model=_model_index(comps["model"], pool.names, aliases),
        nonempty=np.ascontiguousarray(nonempty, dtype=np.bool_),
        ratings=ratings,
        # a fast 64-bit hash (polars'); equal hashes are confirmed on the text (search)
        text_hash=comps["response"].hash(seed=0).to_numpy(),
        row0=row0,
    )


def search(
    prep: Prepared,
    strategy: str,
    *,
    tau: float,
    seed: int,
    rating: str = "overall_score",
    pool: str = "scored",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pair_arrays` over a prepared batch, identical texts dropped:
    ``(chosen, rejected, reason)`` per instruction."""
    chosen, rejected, reason = pair_arrays(
        prep.offsets, prep.model, prep.nonempty, prep.ratings[rating], prep.s_pref, prep.kin,
        strategy=strategy, tau=tau, seed=seed, pool=pool, row0=prep.row0,
    )  # fmt: skip
    kept = np.flatnonzero(reason == KEPT)
    h = prep.text_hash
    same = h[chosen[kept]] == h[rejected[kept]]
    if same.any():  # confirm on the text itself (a hash collision is not an identical text)
        cand = kept[same]
        resp = prep.data.completions["response"]
        equal = (resp.gather(chosen[cand]) == resp.gather(rejected[cand])).to_numpy()
        drop = cand[equal]
        reason[drop] = IDENTICAL
        chosen[drop] = -1
        rejected[drop] = -1
    return chosen, rejected, reason


@njit(cache=True)
def _pool_kernel(
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


def pool_counts(prep: Prepared) -> np.ndarray:
    """How often each model pair (a < b) meets as two candidates of one instruction: the pool
    every strategy chooses from (``(m, m)`` int64, upper triangle)."""
    m = prep.pool.m
    out = np.zeros((m, m), dtype=np.int64)
    scored = prep.model >= 0
    scored[scored] = ~np.isnan(prep.s_pref[prep.model[scored]])
    _pool_kernel(prep.offsets, prep.model, prep.nonempty & scored, m, out)
    return out


def _weighted_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``v`` where value i stands for ``w[i]`` tied observations."""
    uniq, inv = np.unique(v, return_inverse=True)
    wsum = np.bincount(inv, weights=w, minlength=len(uniq))
    below = np.cumsum(wsum) - wsum
    return (below + (wsum + 1.0) / 2.0)[inv]


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    """Spearman's rho of the observations ``(x[i], y[i])`` repeated ``w[i]`` times (equal to
    :func:`scipy.stats.spearmanr` on the expanded arrays); None when undefined."""
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep].astype(np.float64)
    if len(x) < 2:
        return None
    rx, ry = _weighted_ranks(x, w), _weighted_ranks(y, w)
    total = w.sum()
    dx, dy = rx - (w * rx).sum() / total, ry - (w * ry).sum() / total
    sxx, syy = (w * dx * dx).sum(), (w * dy * dy).sum()
    if sxx <= 0 or syy <= 0:
        return None
    return float((w * dx * dy).sum() / math.sqrt(sxx * syy))


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def pool_stats(pool: Pool, counts: np.ndarray) -> dict[str, Any]:
    """Mean kinship and |S_pref gap| over every candidate pair (``counts`` from
    :func:`pool_counts`) and the Spearman correlation between the two (pairs with undefined
    kinship are left out of both)."""
    ia, ib = np.nonzero(counts)
    w = counts[ia, ib].astype(np.float64)
    kin = pool.kin[ia, ib]
    gap = np.abs(pool.s_pref[ia] - pool.s_pref[ib])
    ok = ~np.isnan(kin)
    total = float(w.sum())
    return {
        "candidate_pairs": int(total),
        "mean_kinship": _round(float((w[ok] * kin[ok]).sum() / w[ok].sum())) if ok.any() else None,
        "mean_abs_s_pref_gap": _round(float((w * gap).sum() / total)) if total else None,
        "spearman_kinship_gap": _round(weighted_spearman(kin[ok], gap[ok], w[ok])),
    }


def pair_model_counts(prep: Prepared, chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """``(m+1, m+1)`` counts of (chosen model, rejected model) over the kept pairs (index m:
    a model without a score-table entry)."""
    m = prep.pool.m
    kept = chosen >= 0
    mc, mr = prep.model[chosen[kept]], prep.model[rejected[kept]]
    mc, mr = np.where(mc < 0, m, mc), np.where(mr < 0, m, mr)
    return np.bincount(mc * (m + 1) + mr, minlength=(m + 1) ** 2).reshape(m + 1, m + 1)


def used_stats(pool: Pool, counts: np.ndarray) -> dict[str, Any]:
    """Mean kinship, mean S_pref gap (chosen - rejected) and mean |gap| of the pairs in
    ``counts`` (:func:`pair_model_counts`), over the pairs where each is defined."""
    m = pool.m
    c = counts[:m, :m].astype(np.float64)
    sp = pool.s_pref
    gap = sp[:, None] - sp[None, :]
    out: dict[str, Any] = {}
    for key, values in (("mean_kinship", pool.kin), ("mean_s_pref_gap", gap),
                        ("mean_abs_s_pref_gap", np.abs(gap))):  # fmt: skip
        ok = ~np.isnan(values) & (c > 0)
        n = c[ok].sum()
        out[key] = _round(float((c[ok] * values[ok]).sum() / n)) if n else None
    return out


def _text(series: pl.Series) -> Any:
    """A polars string Series as an Arrow ``string`` array."""
    import pyarrow as pa

    arr = series.to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.string())


def _float(values: np.ndarray) -> Any:
    """Float64 values as an Arrow array, NaN as null."""
    import pyarrow as pa

    return pa.array(values, type=pa.float64(), mask=np.isnan(values))


def flat_pairs(
    prep: Prepared,
    chosen: np.ndarray,
    rejected: np.ndarray,
    rating: str,
    prompt_hash: np.ndarray | None = None,
) -> Any:
    """The kept pairs (instruction order) as a flat Arrow table: ``prompt``, ``chosen``,
    ``rejected`` (texts), ``prompt_id`` and the metadata columns; :func:`layout_of` gives the
    written layouts. ``prompt_hash``: the :func:`hash128` of the kept prompts, if computed."""
    import pyarrow as pa

    comps = prep.data.completions
    kept = np.flatnonzero(chosen >= 0)
    ci, ri = chosen[kept], rejected[kept]
    sp_full = np.append(prep.s_pref, np.nan)  # index -1 -> NaN
    m = prep.pool.m
    kin_pad = np.full((m + 1, m + 1), np.nan)
    kin_pad[:-1, :-1] = prep.kin
    mc, mr = prep.model[ci], prep.model[ri]
    prompt_text = prep.data.prompts["instruction"].gather(kept)
    columns = {
        "prompt": _text(prompt_text),
        "chosen": _text(comps["response"].gather(ci)),
        "rejected": _text(comps["response"].gather(ri)),
        "prompt_id": _text(prompt_ids(prompt_text, prompt_hash)),
        "chosen_model": _text(comps["model"].gather(ci)),
        "rejected_model": _text(comps["model"].gather(ri)),
        "kinship": _float(kin_pad[mc, mr]),
        "s_pref_chosen": _float(sp_full[mc]),
        "s_pref_rejected": _float(sp_full[mr]),
        "chosen_rating": _float(prep.ratings[rating][ci]),
        "rejected_rating": _float(prep.ratings[rating][ri]),
        "source": _text(prep.data.prompts["source"].gather(kept)),
    }
    return pa.table(columns)


def _conversation(parts: Sequence[tuple[str, Any]], order: tuple[str, str]) -> Any:
    """A list array of conversations: row i = the messages ``(role, texts[i])`` of ``parts``,
    struct fields in ``order``."""
    import pyarrow as pa

    n, k = len(parts[0][1]), len(parts)
    roles = [pa.repeat(pa.scalar(role, pa.string()), n) for role, _ in parts]
    texts = [text for _, text in parts]
    if k == 1:
        fields = {"role": roles[0], "content": texts[0]}
    else:  # interleave: message j of row i sits at k * i + j
        idx = (np.arange(n)[:, None] + n * np.arange(k)[None, :]).reshape(-1)
        fields = {"role": pa.concat_arrays(roles).take(idx),
                  "content": pa.concat_arrays(texts).take(idx)}  # fmt: skip
    struct = pa.StructArray.from_arrays([fields[f] for f in order], names=list(order))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, k * n + 1, k, dtype=np.int32)), struct)


def layout_of(flat: Any, layout: str) -> Any:
    """A flat pairs table (:func:`flat_pairs`) in ``layout``, with its exact Arrow schema:
    ``trl`` (messages) or ``h4`` (``HuggingFaceH4/ultrafeedback_binarized``'s columns: the
    prompt text, ``prompt_id`` = sha256 of the prompt, the user + assistant conversations,
    ``messages`` = chosen, ``score_*`` = the instance ratings), then the metadata columns."""
    import pyarrow as pa

    col = {name: flat.column(name).combine_chunks() for name in flat.column_names}
    meta = [col[c] for c in META_COLUMNS]
    if layout == "h4":
        ids = _text(sha256_ids(pl.from_arrow(col["prompt"])))  # type: ignore[arg-type]
        chosen = _conversation([("user", col["prompt"]), ("assistant", col["chosen"])],
                               ("content", "role"))  # fmt: skip
        rejected = _conversation([("user", col["prompt"]), ("assistant", col["rejected"])],
                                 ("content", "role"))  # fmt: skip
        arrays = [col["prompt"], ids, chosen, rejected, chosen, col["chosen_rating"],
                  col["rejected_rating"], *meta]  # fmt: skip
    else:
        order = ("role", "content")
        arrays = [_conversation([("user", col["prompt"])], order),
                  _conversation([("assistant", col["chosen"])], order),
                  _conversation([("assistant", col["rejected"])], order),
                  col["prompt_id"], *meta]  # fmt: skip
    return pa.Table.from_arrays(arrays, schema=_arrow_schema(layout))


def flat_from_trl(frame: pl.DataFrame) -> Any:
    """A TRL pairs frame (``PreferenceResult.pairs``) as the flat table of :func:`flat_pairs`."""
    import pyarrow as pa

    def text(col: str) -> pl.Series:
        return frame[col].list.first().struct.field("content")

    columns = {c: _text(text(c)) for c in ("prompt", "chosen", "rejected")}
    columns["prompt_id"] = _text(frame["prompt_id"])
    for c in META_COLUMNS:
        s = frame[c]
        columns[c] = _text(s) if s.dtype == pl.String else _float(
            s.cast(pl.Float64).fill_null(np.nan).to_numpy()
        )  # fmt: skip
    return pa.table(columns)


_MSG = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
_FRAME_SCHEMA = {
    "prompt": _MSG,
    "chosen": _MSG,
    "rejected": _MSG,
    "prompt_id": pl.String,
    "chosen_model": pl.String,
    "rejected_model": pl.String,
    "kinship": pl.Float64,
    "s_pref_chosen": pl.Float64,
    "s_pref_rejected": pl.Float64,
    "chosen_rating": pl.Float64,
    "rejected_rating": pl.Float64,
    "source": pl.String,
}


def trl_frame(flat: Any) -> pl.DataFrame:
    """A flat pairs table as the TRL polars frame of :attr:`PreferenceResult.pairs`."""
    frame = pl.from_arrow(layout_of(flat, "trl"))
    assert isinstance(frame, pl.DataFrame)
    return frame.cast(_FRAME_SCHEMA)  # type: ignore[arg-type]


class PairStream:
    """Pair instructions batch by batch (:meth:`add`) and keep only exact, order-independent
    tallies (integer counts per model pair, per reason, per rating difference), so that the
    metrics of :meth:`result` are the same bytes however the data was batched, and memory does
    not grow with the number of instructions.

    ``diagnose``: also run the searches the diagnostics need (the strategy at tau = -inf and
    every other strategy at tau) and tally the pool (see :func:`diagnostics_of`).
    """

    def __init__(
        self,
        pool: Pool,
        *,
        strategy: str = "score",
        tau: float = 0.1,
        seed: int = 0,
        rating: str = "overall_score",
        aliases: Mapping[str, str] | None = None,
        baseline_pool: str = "scored",
        test_fraction: float = 0.2,
        diagnose: bool = True,
    ) -> None:
        strategy_code(strategy)
        self.pool, self.strategy, self.tau, self.seed = pool, strategy, float(tau), seed
        self.rating, self.aliases, self.baseline_pool = rating, aliases, baseline_pool
        self.test_fraction, self.diagnose = test_fraction, diagnose
        m1 = pool.m + 1
        self.reasons = np.zeros(len(REASONS), dtype=np.int64)
        self.counts = {"completions": 0, "completions_blank": 0, "completions_unknown_model": 0}
        self.used = np.zeros((m1, m1), dtype=np.int64)
        self.names: dict[tuple[str, str], int] = {}  # (chosen_model, rejected_model) as written
        self.diffs: dict[str, dict[float, int]] = {f: {} for f in RATING_FIELDS}
        self.test = 0
        self.pool_counts = np.zeros((pool.m, pool.m), dtype=np.int64)
        self.changed = self.dropped = 0
        self.same = {s: 0 for s in STRATEGIES if s != strategy}
        self.agreement = AgreementTally()  # every strategy's pairs vs the rating (diagnose)

    def add(self, data: UltraFeedback) -> tuple[Any, np.ndarray]:
        """Pair one batch; returns its flat pairs table (:func:`flat_pairs`) and whether each
        pair is in ``test_prefs``."""
        prep = prepare(data, self.pool, aliases=self.aliases)
        kw = {"seed": self.seed, "rating": self.rating, "pool": self.baseline_pool}
        chosen, rejected, reason = search(prep, self.strategy, tau=self.tau, **kw)
        prompts = prep.data.prompts["instruction"].gather(np.flatnonzero(chosen >= 0))
        h = hash128(prompts)
        pairs = flat_pairs(prep, chosen, rejected, self.rating, h)
        test = is_test(prompts, seed=self.seed, fraction=self.test_fraction, hashes=h)
        self.reasons += np.bincount(reason.astype(np.int64), minlength=len(REASONS))
        self.counts["completions"] += data.completions.height
        self.counts["completions_blank"] += int((~prep.nonempty).sum())
        self.counts["completions_unknown_model"] += int((prep.model < 0).sum())
        self.used += pair_model_counts(prep, chosen, rejected)
        names = pl.from_arrow(pairs.select(["chosen_model", "rejected_model"]))
        assert isinstance(names, pl.DataFrame)
        for row in names.group_by("chosen_model", "rejected_model").len().iter_rows():
            self.names[row[:2]] = self.names.get(row[:2], 0) + row[2]
        kept = chosen >= 0
        for f in RATING_FIELDS:
            d = prep.ratings[f][chosen[kept]] - prep.ratings[f][rejected[kept]]
            values, n = np.unique(d[~np.isnan(d)], return_counts=True)
            tally = self.diffs[f]
            for v, k in zip(values.tolist(), n.tolist(), strict=True):
                tally[v] = tally.get(v, 0) + k
        self.test += int(test.sum())
        if self.diagnose:
            self.pool_counts += pool_counts(prep)
            c0, r0, reason0 = search(prep, self.strategy, tau=-math.inf, **kw)
            self.changed += int(((chosen != c0) | (rejected != r0)).sum())
            self.dropped += int((~kept & (reason0 == KEPT)).sum())
            self.agreement.add(self.strategy, prep.ratings[self.rating], chosen, rejected)
            for other in self.same:
                co, ro, _ = search(prep, other, tau=self.tau, **kw)
                self.same[other] += int((kept & (co == chosen) & (ro == rejected)).sum())
                self.agreement.add(other, prep.ratings[self.rating], co, ro)
        return pairs, test

    def metrics(self) -> dict[str, Any]:
        """Counts, pair statistics, agreement with both rating fields, split and ``diag.*``."""
        n = int(self.reasons.sum())
        pairs = int(self.reasons[KEPT])
        out: dict[str, Any] = {"instructions": n, "pairs": pairs, **self.counts}
        out.update({f"drop_{r}": int(self.reasons[i]) for i, r in enumerate(REASONS) if i != KEPT})
        used = used_stats(self.pool, self.used)
        out.update({"strategy": self.strategy, "keep_rate": _round(pairs / max(n, 1)),
                    "mean_kinship": used["mean_kinship"],
                    "mean_s_pref_gap": used["mean_s_pref_gap"]})  # fmt: skip
        agree = {}
        for f in RATING_FIELDS:
            tally = sorted(self.diffs[f].items())
            nr = sum(k for _, k in tally)
            up = sum(k for v, k in tally if v > 0)
            tie = sum(k for v, k in tally if v == 0)
            agree[f] = {
                "rated_pairs": nr,
                "agree": _round(up / nr) if nr else None,
                "tie": _round(tie / nr) if nr else None,
                "disagree": _round((nr - up - tie) / nr) if nr else None,
                "mean_gap": _round(math.fsum(v * k for v, k in tally) / nr) if nr else None,
            }
        a = agree[self.rating]
        out.update({"rated_pairs": a["rated_pairs"], "rating_agree": a["agree"],
                    "rating_tie": a["tie"], "rating_disagree": a["disagree"],
                    "mean_rating_gap": a["mean_gap"],
                    "distinct_model_pairs": len(self.names)})  # fmt: skip
        for f, values in agree.items():
            out.update({f"rating.{f}.{k}": v for k, v in values.items()})
        out.update({"split.train_pairs": pairs - self.test, "split.test_pairs": self.test,
                    "split.test_share": _round(self.test / max(pairs, 1))})  # fmt: skip
        if self.diagnose:
            out.update(self.diagnostics(n, pairs, used))
        return out

    def diagnostics(self, n: int, pairs: int, used: dict[str, Any]) -> dict[str, Any]:
        """What the kinship threshold did, as flat ``diag.*`` metrics.

        ``changed_by_tau``: share of instructions whose outcome (pair or drop) differs from the
        search without a threshold (tau = -inf: every candidate pair eligible);
        ``dropped_by_tau``: share paired without the threshold but dropped with it;
        ``overlap.<s>``: share of this strategy's pairs that strategy ``s`` also makes (same
        chosen and rejected response); ``used.*`` vs ``pool.*``: mean kinship and |S_pref gap| of
        the pairs used vs of every candidate pair, and the Spearman correlation of the two over
        the pool.
        """
        out: dict[str, Any] = {
            "diag.changed_by_tau": _round(self.changed / max(n, 1)),
            "diag.changed_by_tau_n": self.changed,
            "diag.dropped_by_tau": _round(self.dropped / max(n, 1)),
            "diag.dropped_by_tau_n": self.dropped,
        }
        for other, same in self.same.items():
            out[f"diag.overlap.{other}"] = _round(same / pairs) if pairs else None
        out.update(self.agreement.metrics())
        out["diag.used.mean_kinship"] = used["mean_kinship"]
        out["diag.used.mean_abs_s_pref_gap"] = used["mean_abs_s_pref_gap"]
        for k, v in pool_stats(self.pool, self.pool_counts).items():
            out[f"diag.pool.{k}"] = v
        return out

    def result(self, pairs: pl.DataFrame | None = None, test: np.ndarray | None = None) -> Any:
        """The :class:`PreferenceResult` (``pairs``/``test``: the collected frames, if kept)."""
        metrics = self.metrics()
        counts = {k: metrics[k] for k in ("instructions", "pairs", *self.counts)}
        counts.update({f"drop_{r}": metrics[f"drop_{r}"] for r in REASONS[1:]})
        frame = pl.DataFrame(schema=_FRAME_SCHEMA) if pairs is None else pairs
        return PreferenceResult(frame, counts, metrics, self.strategy, self.tau, self.seed, test,
                                self.names)  # fmt: skip


def make_pairs(
    data: UltraFeedback,
    s_pref: pl.DataFrame | Mapping[str, float],
    kinship: pl.DataFrame,
    *,
    strategy: str = "score",
    tau: float = 0.1,
    seed: int = 0,
    rating: str = "overall_score",
    aliases: Mapping[str, str] | None = None,
    pool: str = "scored",
    test_fraction: float = 0.2,
    diagnose: bool = True,
) -> PreferenceResult:
    """Pair every instruction of ``data`` by ``strategy`` (in memory: one batch of
    :class:`PairStream`); returns the TRL frame, the train/test split, counts and metrics."""
    stream = PairStream(
        Pool.of(s_pref, kinship), strategy=strategy, tau=tau, seed=seed, rating=rating,
        aliases=aliases, baseline_pool=pool, test_fraction=test_fraction, diagnose=diagnose,
    )  # fmt: skip
    flat, test = stream.add(data)
    log.info("%s: %d of %d instructions paired", strategy, flat.num_rows, len(data))
    return stream.result(trl_frame(flat), test)


# --------------------------------------------------------------------------- layouts
def h4_frame(pairs: pl.DataFrame) -> pl.DataFrame:
    """A TRL pairs frame in ``HuggingFaceH4/ultrafeedback_binarized``'s layout (see
    :func:`layout_of`)."""
    frame = pl.from_arrow(layout_table(pairs, "h4"))
    assert isinstance(frame, pl.DataFrame)
    return frame


def to_trl(frame: pl.DataFrame) -> pl.DataFrame:
    """Either layout -> TRL's conversational one: ``prompt`` (a list of messages) and
    ``chosen``/``rejected`` (one assistant message each), then the other columns unchanged.

    An H4-layout frame (``prompt`` as text, full conversations in ``chosen``/``rejected``)
    becomes the prompt as one user message and the last message of each conversation; a TRL
    frame is returned as it is (so is anything else: callers check the columns).
    """
    if "prompt" not in frame.columns or frame.schema["prompt"] != pl.String:
        return frame
    for col in ("chosen", "rejected"):
        dtype = frame.schema.get(col)
        if not isinstance(dtype, pl.List) or not isinstance(dtype.inner, pl.Struct):
            return frame

    def last(col: str) -> pl.Expr:
        m = pl.col(col).list.last()
        return pl.concat_list(pl.struct(m.struct.field("role"), m.struct.field("content"))).alias(
            col
        )

    prompt = pl.concat_list(
        pl.struct(pl.lit("user").alias("role"), pl.col("prompt").alias("content"))
    ).alias("prompt")
    rest = [c for c in frame.columns if c not in ("prompt", "chosen", "rejected")]
    return frame.select(prompt, last("chosen"), last("rejected"), *rest)


def layout_table(pairs: pl.DataFrame, layout: str) -> Any:
    """A TRL pairs frame as an Arrow table with the exact schema of ``layout``."""
    return layout_of(flat_from_trl(pairs), layout)


class RowGroupWriter:
    """A Parquet file written table by table in row groups of exactly :data:`ROW_GROUP` rows
    (the last one shorter), each from one contiguous array: the bytes depend only on the rows,
    not on how they were batched (the streaming and the in-memory path write the same file)."""

    def __init__(self, path: str | Path, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.writer = pq.ParquetWriter(
            str(path), schema, compression=PARQUET_COMPRESSION, write_statistics=False
        )
        self.pending: list[Any] = []
        self.rows = 0

    def write(self, table: Any) -> None:
        if table.num_rows:
            self.pending.append(table.cast(self.schema))
            self.rows += table.num_rows
        while self.rows >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.writer.write_table(table.slice(0, n).combine_chunks(), row_group_size=ROW_GROUP)
        rest = table.slice(n)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
        self.writer.close()


def write_table(table: Any, path: str | Path) -> None:
    """Write an Arrow table as Parquet (:class:`RowGroupWriter`: fixed row groups, snappy,
    no statistics)."""
    writer = RowGroupWriter(path, table.schema)
    writer.write(table)
    writer.close()


class SplitWriter:
    """``train_prefs.parquet`` and ``test_prefs.parquet`` in ``layout``, written batch by batch."""

    def __init__(self, out_dir: str | Path, layout: str = "trl", *, background: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        schema = _arrow_schema(layout)
        self.files = {s: RowGroupWriter(out / f"{s}.parquet", schema) for s in SPLITS}
        # one background thread converts and writes (pyarrow releases the GIL), one batch at a
        # time, in order: the caller pairs the next batch meanwhile
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: Any = None

    def _write(self, flat: Any, test: np.ndarray) -> None:
        for name, mask in (("train_prefs", ~test), ("test_prefs", test)):
            part = flat.filter(mask)
            if part.num_rows:
                self.files[name].write(layout_of(part, self.layout))

    def write(self, flat: Any, test: np.ndarray) -> None:
        """Write a flat pairs table (:func:`flat_pairs`), each pair to its split."""
        if self.pool is None:
            self._write(flat, test)
            return
        if self.pending is not None:
            self.pending.result()  # at most one batch in flight; its errors surface here
        self.pending = self.pool.submit(self._write, flat, test)

    def close(self) -> None:
        try:
            if self.pending is not None:
                self.pending.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            for f in self.files.values():
                f.close()


def write_splits(result: PreferenceResult, out_dir: str | Path, layout: str = "trl") -> None:
    """Write ``train_prefs.parquet`` and ``test_prefs.parquet`` into ``out_dir``."""
    writer = SplitWriter(out_dir, layout)
    test = np.zeros(result.pairs.height, bool) if result.test is None else result.test
    writer.write(flat_from_trl(result.pairs), test)
    writer.close()


def write_pairs(result: PreferenceResult, path: str | Path, layout: str = "trl") -> None:
    """Write every pair (no split) as one Parquet file."""
    write_table(layout_table(result.pairs, layout), path)


# --------------------------------------------------------------------------- card
def _size(n: int) -> str:
    for limit, label in ((1000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (10**6, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return label
    return "n>1M"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def diagnostics_text(result: PreferenceResult) -> str:
    """The card's paragraph on what the kinship threshold did (from ``diag.*``)."""
    m = result.metrics
    if "diag.changed_by_tau" not in m:
        return "(not computed)"
    n = result.counts["instructions"]
    lines = []
    if result.strategy in KARMA_STRATEGIES:
        ch, dr = m["diag.changed_by_tau_n"], m["diag.dropped_by_tau_n"]
        verdict = (
            f"**tau = {result.tau:g} changed no pair**: every instruction gets the pair it gets "
            "without a threshold, so nothing here is due to kinship filtering."
            if ch == 0
            else f"tau = {result.tau:g} changed the outcome of {ch} of {n} instructions "
            f"({_pct(m['diag.changed_by_tau'])}) against the search without a threshold, "
            f"{dr} of them ({_pct(m['diag.dropped_by_tau'])}) dropped for want of a kin pair."
        )
        lines.append(verdict)
    else:
        lines.append(f"`{result.strategy}` ignores kinship: tau changes nothing.")
    overlap = ", ".join(
        f"`{s}` {_pct(m.get(f'diag.overlap.{s}'))}" for s in STRATEGIES if s != result.strategy
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
    how = (
        "instance-wise AI-feedback binarisation (chosen = highest rating, rejected = a "
        "seeded-random lower-rated response), as `HuggingFaceH4/ultrafeedback_binarized`"
        if result.strategy == "rlaif"
        else "a seeded-random pair of responses ordered by S_pref (ablation, kinship ignored)"
        if result.strategy == "random"
        else f"KARMA kinship-aware pairing (strategy `{result.strategy}`): responses are paired "
        f"only between kin models (kinship >= {result.tau:g}); the response of the model with "
        "the higher normalised benchmark score S_pref is chosen"
    )
    rating = params.get("preferences.rating", "overall_score")
    agree = "\n".join(
        f"- `{f}`: agree {m.get(f'rating.{f}.agree')}, tie {m.get(f'rating.{f}.tie')}, "
        f"disagree {m.get(f'rating.{f}.disagree')} (over {m.get(f'rating.{f}.rated_pairs')} "
        "rated pairs)"
        for f in RATING_FIELDS
    )
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
    made_from = f"`{dataset}`" + (f" ({source})" if source else "")
    return f"""---
language:
- en
license: {license}
pretty_name: KARMA preference pairs ({result.strategy})
size_categories:
- {_size(c["pairs"])}
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
---

# KARMA preference pairs: `{result.strategy}`

Preference data in {fmt}.

Made from {made_from} by {how}. One pair at most per instruction; same inputs and params
give byte-identical files. License: `{license}` (that of the source data).

Splits by prompt (no prompt in both): `train_prefs` {m.get("split.train_pairs")} pairs,
`test_prefs` {m.get("split.test_pairs")} pairs (a prompt is in `test_prefs` when a hash of it,
seeded by `seed`, falls below `preferences.test_fraction`).

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
        text += f"; tau changed {m['diag.changed_by_tau_n']} of {m['instructions']} pairs"
    return text


def load_kinship_dir(path: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(models, kinship)`` frames from the kinship stage's output directory."""
    from karma.core.io import read_parquet

    d = Path(path)
    frames = []
    for name in ("models.parquet", "kinship.parquet"):
        f = d / name
        if not f.is_file():
            raise KarmaError("missing kinship output (run the kinship stage first)", file=f)
        frames.append(read_parquet(f, "kinship output"))
    return frames[0], frames[1]


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, kw_only=True)
class PreferencesPaths:
    """Paths of the ``preferences`` stage (the completions are ``preferences.dataset``)."""

    kinship_dir: Path = input_path("the kinship stage's output directory", is_dir=True)
    out: Path = output_path(
        "train_prefs.parquet, test_prefs.parquet + README.md (dataset card)", is_dir=True
    )
    metrics: Path | None = output_path("flat metrics", ".json", required=False)
    plot: Path | None = output_path("model-pair heatmap", ".png", required=False)


def _read_completions(params: Params) -> tuple[UltraFeedback, dict[str, Any]]:
    """The completions of ``preferences.dataset`` (in memory) and what is known of their
    source."""
    from karma.pairing.fetch import source_info
    from karma.pairing.ultrafeedback import read_ultrafeedback

    cfg = params.preferences
    data = read_ultrafeedback(cfg.dataset, split=cfg.split)
    log.info("read %d instructions, %d completions from %s", len(data), data.completions.height,
             cfg.dataset)  # fmt: skip
    return data, source_info(cfg.dataset)


def run_preferences(params: Params, paths: PreferencesPaths) -> dict[str, Any]:
    """Stage ``preferences``: stream the completions batch by batch, pair them, write the splits
    as they come, then the card and the metrics (memory does not grow with the data)."""
    from tqdm.auto import tqdm

    from karma.core.io import write_json
    from karma.pairing.fetch import source_info
    from karma.pairing.figures import pair_usage_heatmap
    from karma.pairing.ultrafeedback import count_records, iter_ultrafeedback

    cfg = params.preferences
    models, kinship = load_kinship_dir(paths.kinship_dir)
    stream = PairStream(
        Pool.of(models.select("model", "s_pref"), kinship),
        strategy=params.kinship,
        tau=params.similarity.tau,
        seed=params.seed,
        rating=cfg.rating,
        aliases=cfg.aliases,
        baseline_pool=cfg.baseline_pool,
        test_fraction=cfg.test_fraction,
    )
    out = Path(paths.out)
    writer = SplitWriter(out, cfg.layout)
    total = count_records(cfg.dataset)
    bar = tqdm(total=total, desc="preferences", unit="instr", mininterval=10,
               disable=not total or total < 10**6)  # fmt: skip
    try:
        batches = iter_ultrafeedback(cfg.dataset, split=cfg.split, batch_records=cfg.batch_records)
        for batch in batches:
            writer.write(*stream.add(batch))
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    result = stream.result()
    if result.counts["pairs"] == 0:
        c = result.counts
        drops = ", ".join(f"{r} {c[f'drop_{r}']}" for r in REASONS[1:] if c[f"drop_{r}"])
        raise KarmaError(
            f"no preference pair: every instruction was dropped ({drops})",
            file=cfg.dataset,
            field="kinship",
            value=params.kinship,
            expected=f"a strategy and tau ({params.similarity.tau}) that pair some responses",
        )
    metrics = {
        **result.metrics,
        "meta.seed": params.seed,
        "meta.kinship": params.kinship,
        "meta.test_fraction": cfg.test_fraction,
        "meta.layout": cfg.layout,
    }
    result = dataclasses.replace(result, metrics=metrics)
    card_params = {
        "kinship": params.kinship,
        "seed": params.seed,
        "similarity.tau": params.similarity.tau,
        "preferences.rating": cfg.rating,
        "preferences.dataset": cfg.dataset,
        "preferences.baseline_pool": cfg.baseline_pool,
        "preferences.layout": cfg.layout,
        "preferences.test_fraction": cfg.test_fraction,
    }
    info = source_info(cfg.dataset)
    card = dataset_card(result, dataset=cfg.dataset, params=card_params, layout=cfg.layout,
                        license=info["license"], source=info.get("described"))  # fmt: skip
    (out / "README.md").write_text(card)
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    if paths.plot is not None:
        pair_usage_heatmap(
            result.model_pairs,
            paths.plot,
            order=models["model"].to_list(),
            title=f"Model pairs used by '{params.kinship}'",
        )
    log.info("%s", summary(result))
    return metrics


STAGE = Stage(
    name="preferences",
    settings=("kinship", "seed", "similarity.tau", "preferences"),
    paths=PreferencesPaths,
    run=run_preferences,
    inputs=("preferences.dataset",),
    help="Per instruction, pair two responses of kin models (kinship >= tau) and choose the one "
    "whose model has the higher S_pref (KARMA), or binarise by rating (rlaif), or pair at "
    "random; train_prefs/test_prefs split by prompt, in TRL's conversational layout or H4's, "
    "with metadata columns and what the kinship threshold did (diag.* metrics, the card).",
)
