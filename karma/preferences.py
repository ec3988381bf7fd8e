"""Preference pairs per instruction: KARMA kinship-aware pairing and the RLAIF baseline.

Inputs are plain: an :class:`~karma.ultrafeedback.UltraFeedback` dataset, ``S_pref`` per model
and the kinship of model pairs (``model_a, model_b, kinship``). Rules, per instruction:

* **candidates** (KARMA strategies): completions whose model has an S_pref (names matched
  case-insensitively, after ``aliases``) and whose response is not blank.
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
  with a rating (``rating`` field; "N/A" is missing), any model. chosen = the highest rating
  (ties -> first in the record); rejected = a seeded-random one of the remaining candidates
  rated strictly lower; none lower (all tie) -> drop ``tie``; fewer than two rated -> drop
  ``too_few_candidates``; identical text -> drop ``identical_text``.

Randomness is counter-based (SplitMix64 of ``seed`` and the instruction's row), so a pair
never depends on other instructions or on processing order. ``prompt_id`` is a stable 128-bit
hash of the instruction (32 hex digits). Same inputs and params give a byte-identical Parquet.

>>> import polars as pl
>>> from karma.ultrafeedback import from_records
>>> data = from_records([("line 1", {"instruction": "Hi", "completions": [
...     {"model": "a", "response": "x"}, {"model": "b", "response": "y"}]})], file="demo")
>>> s_pref = pl.DataFrame({"model": ["a", "b"], "s_pref": [0.2, 0.9]})
>>> kin = pl.DataFrame({"model_a": ["a", "b"], "model_b": ["b", "a"], "kinship": [0.5, 0.5]})
>>> res = make_pairs(data, s_pref, kin, strategy="score")
>>> res.pairs["chosen_model"].to_list(), res.counts["pairs"]
(['b'], 1)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numba import njit

from karma.config import Params
from karma.errors import KarmaError, did_you_mean
from karma.pipeline import Stage, input_path, output_path
from karma.ultrafeedback import UltraFeedback

log = logging.getLogger(__name__)

STRATEGIES = ("score", "sim", "score_sim", "rlaif", "random")
#: Strategy codes of the kernel (index into :data:`STRATEGIES`).
SCORE, SIM, SCORE_SIM, RLAIF, RANDOM = range(5)
RATING_FIELDS = ("overall_score", "fine_grained_score")
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
    seed: np.uint64,
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
            best = -1
            best_r = 0.0
            for c in range(lo, hi):
                if nonempty[c] and not np.isnan(rating[c]):
                    count += 1
                    if best < 0 or rating[c] > best_r:
                        best = c
                        best_r = rating[c]
            if count < 2:
                out_reason[i] = TOO_FEW
                continue
            nlower = 0
            for c in range(lo, hi):
                if nonempty[c] and not np.isnan(rating[c]) and rating[c] < best_r:
                    nlower += 1
            if nlower == 0:
                out_reason[i] = TIE
                continue
            k = np.int64(_splitmix64_nb(seed, np.uint64(i)) % np.uint64(nlower))
            for c in range(lo, hi):
                if nonempty[c] and not np.isnan(rating[c]) and rating[c] < best_r:
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
            k = np.int64(_splitmix64_nb(seed, np.uint64(i)) % np.uint64(npairs))
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the pair search over CSR-like ``offsets``; returns (chosen, rejected, reason) per
    instruction (flat completion indices, -1 when dropped; reason codes index :data:`REASONS`).
    ``identical_text`` is not decided here (see :func:`make_pairs`)."""
    code = strategy_code(strategy)
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
        np.uint64(seed),
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
) -> tuple[int, int, str]:
    """Plain-Python rules for one instruction: ``(chosen_pos, rejected_pos, reason)``.

    ``completions`` items have ``model`` (already canonical), ``response`` and the ``rating``
    key (float or None). The kernel is tested against this; the benchmark loops over it.
    """

    def kin_of(x: str, y: str) -> float:
        v = kinship.get((x, y), math.nan)
        return math.nan if v is None else v

    idx = range(len(completions))
    nonempty = [bool(c["response"].strip()) for c in completions]
    if strategy == "rlaif":
        rated = [i for i in idx if nonempty[i] and completions[i].get(rating) is not None]
        if len(rated) < 2:
            return -1, -1, "too_few_candidates"
        best = max(rated, key=lambda i: (completions[i][rating], -i))
        top = completions[best][rating]
        lower = [i for i in rated if completions[i][rating] < top]
        if not lower:
            return -1, -1, "tie"
        rej = lower[splitmix64(seed, row) % len(lower)]
        if completions[best]["response"] == completions[rej]["response"]:
            return -1, -1, "identical_text"
        return best, rej, "kept"
    sp = {i: s_pref.get(completions[i]["model"]) for i in idx}
    cands = [i for i in idx if nonempty[i] and sp[i] is not None and not math.isnan(sp[i])]
    if len(cands) < 2:
        return -1, -1, "unknown_models" if sum(nonempty) >= 2 else "too_few_candidates"
    pairs = [(p, q) for k, p in enumerate(cands) for q in cands[k + 1 :]]

    def eligible(p: int, q: int) -> bool:
        mp, mq = completions[p]["model"], completions[q]["model"]
        return mp != mq and kin_of(mp, mq) >= tau  # NaN >= tau is False

    if strategy == "random":
        a, b = pairs[splitmix64(seed, row) % len(pairs)]
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
    """``pairs``: the TRL frame (see :data:`OUTPUT_COLUMNS`); ``counts``: per-reason counts;
    ``metrics``: the flat metrics dict written for DVC."""

    pairs: pl.DataFrame
    counts: dict[str, int]
    metrics: dict[str, Any]
    strategy: str
    tau: float
    seed: int


#: Codec of the pairs file: fast to write and read, what ``datasets`` itself writes.
PARQUET_COMPRESSION = "snappy"
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


def prompt_ids(instructions: pl.Series) -> pl.Series:
    """``prompt_id`` of each instruction: a stable 128-bit hash (32 hex digits) of its UTF-8
    bytes, computed by a Numba kernel (sha256 in a Python loop is several times slower)."""
    import pyarrow as pa

    arr = instructions.to_arrow(compat_level=pl.CompatLevel.oldest())
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros((n, 2), dtype=np.uint64)
    if n:
        _, off, data = arr.buffers()
        offsets = np.frombuffer(off, dtype=np.int64)[arr.offset : arr.offset + n + 1]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(1, np.uint8)
        _hash128_kernel(raw, np.ascontiguousarray(offsets), out)
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
) -> PreferenceResult:
    """Pair every instruction of ``data`` by ``strategy``; returns the TRL frame and counts."""
    names, sp = _s_pref_table(s_pref)
    kin = kinship_matrix(names, kinship)
    comps = data.completions
    n = data.prompts.height
    counts_per_row = np.bincount(comps["row"].to_numpy(), minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts_per_row, out=offsets[1:])
    model_idx = _model_index(comps["model"], names, aliases)
    nonempty = (comps["response"].str.strip_chars().str.len_bytes() > 0).to_numpy()
    ratings = comps[rating].fill_null(np.nan).to_numpy().astype(np.float64)
    chosen, rejected, reason = pair_arrays(
        offsets, model_idx, nonempty, ratings, sp, kin, strategy=strategy, tau=tau, seed=seed
    )
    kept = np.flatnonzero(reason == KEPT)
    ci, ri = chosen[kept], rejected[kept]
    chosen_text = comps["response"].gather(ci)
    rejected_text = comps["response"].gather(ri)
    identical = (chosen_text == rejected_text).fill_null(False).to_numpy()
    if identical.any():
        reason[kept[identical]] = IDENTICAL
        keep = ~identical
        kept, ci, ri = kept[keep], ci[keep], ri[keep]
        chosen_text = chosen_text.filter(pl.Series(keep))
        rejected_text = rejected_text.filter(pl.Series(keep))
    sp_full = np.append(sp, np.nan)  # index -1 -> NaN
    kin_pad = np.full((len(names) + 1, len(names) + 1), np.nan)
    kin_pad[:-1, :-1] = kin
    mc, mr = model_idx[ci], model_idx[ri]
    prompt_text = data.prompts["instruction"].gather(kept)

    def msg(role: str, text: pl.Series) -> pl.Series:
        return pl.select(
            pl.concat_list(pl.struct(pl.lit(role).alias("role"), pl.lit(text).alias("content")))
        ).to_series()

    def nan_to_null(x: np.ndarray) -> pl.Series:
        return pl.Series(x, dtype=pl.Float64).fill_nan(None)

    pairs = pl.DataFrame(
        {
            "prompt": msg("user", prompt_text),
            "chosen": msg("assistant", chosen_text),
            "rejected": msg("assistant", rejected_text),
            "prompt_id": prompt_ids(prompt_text),
            "chosen_model": comps["model"].gather(ci),
            "rejected_model": comps["model"].gather(ri),
            "kinship": nan_to_null(kin_pad[mc, mr]),
            "s_pref_chosen": nan_to_null(sp_full[mc]),
            "s_pref_rejected": nan_to_null(sp_full[mr]),
            "chosen_rating": comps[rating].gather(ci),
            "rejected_rating": comps[rating].gather(ri),
            "source": data.prompts["source"].gather(kept),
        }
    )
    codes = np.bincount(reason.astype(np.int64), minlength=len(REASONS))
    counts = {"instructions": n, "pairs": int(codes[KEPT])}
    counts["completions"] = int(comps.height)
    counts["completions_blank"] = int((~nonempty).sum())
    counts["completions_unknown_model"] = int((model_idx < 0).sum())
    counts.update({f"drop_{r}": int(codes[i]) for i, r in enumerate(REASONS) if i != KEPT})
    result = PreferenceResult(pairs, counts, {}, strategy, float(tau), seed)
    result = dataclasses.replace(result, metrics=pair_metrics(result))
    log.info("%s: %d of %d instructions paired", strategy, counts["pairs"], n)
    return result


def _mean(s: pl.Series) -> float | None:
    s = s.drop_nulls()
    return None if s.len() == 0 else round(float(s.mean()), 6)  # type: ignore[arg-type]


def pair_metrics(result: PreferenceResult) -> dict[str, Any]:
    """Flat metrics: counts, mean kinship, mean S_pref gap, agreement with instance ratings."""
    p = result.pairs
    diff = (p["chosen_rating"] - p["rejected_rating"]).drop_nulls()  # both rated
    nr = diff.len()
    out: dict[str, Any] = dict(result.counts)
    out.update(
        {
            "strategy": result.strategy,
            "keep_rate": round(result.counts["pairs"] / max(result.counts["instructions"], 1), 6),
            "mean_kinship": _mean(p["kinship"]),
            "mean_s_pref_gap": _mean(p["s_pref_chosen"] - p["s_pref_rejected"]),
            "rated_pairs": nr,
            "rating_agree": round(int((diff > 0).sum()) / nr, 6) if nr else None,
            "rating_tie": round(int((diff == 0).sum()) / nr, 6) if nr else None,
            "rating_disagree": round(int((diff < 0).sum()) / nr, 6) if nr else None,
            "mean_rating_gap": _mean(diff),
            "distinct_model_pairs": p.select(
                pl.struct("chosen_model", "rejected_model").n_unique()
            ).item(),
        }
    )
    return out


def write_pairs(result: PreferenceResult, path: str | Path) -> None:
    """Write the pairs Parquet (byte-identical for equal frames)."""
    result.pairs.write_parquet(path, compression=PARQUET_COMPRESSION, statistics=False)


def dataset_card(
    result: PreferenceResult,
    *,
    dataset: str,
    params: Mapping[str, Any],
    data_file: str = "pairs.parquet",
) -> str:
    """The dataset card (``README.md`` with the hub's YAML header)."""
    c = result.counts
    m = result.metrics
    size = (
        "n<1K"
        if c["pairs"] < 1000
        else "1K<n<10K"
        if c["pairs"] < 10_000
        else "10K<n<100K"
        if c["pairs"] < 100_000
        else "100K<n<1M"
        if c["pairs"] < 10**6
        else "n>1M"
    )
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
        f"only between kin models (kinship >= {result.tau}); the response of the model with "
        "the higher normalised benchmark score S_pref is chosen"
    )
    return f"""---
language:
- en
license: other
pretty_name: KARMA preference pairs ({result.strategy})
size_categories:
- {size}
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
  - split: train
    path: {data_file}
---

# KARMA preference pairs: `{result.strategy}`

Preference data in TRL's conversational format (`prompt` = list of messages, `chosen` /
`rejected` = one assistant message each), ready for `trl.DPOTrainer`.

Made from `{dataset}` by {how}. One pair at most per instruction; same inputs and params
give a byte-identical file.

## Params

{param_lines}

## Counts

- instructions: {c["instructions"]}
- completions: {c.get("completions")} (blank {c.get("completions_blank")}, model without
  S_pref {c.get("completions_unknown_model")})
- pairs kept: {c["pairs"]}
- mean kinship: {m.get("mean_kinship")}
- mean S_pref gap: {m.get("mean_s_pref_gap")}
- agreement with instance ratings: {m.get("rating_agree")} (ties {m.get("rating_tie")},
  over {m.get("rated_pairs")} rated pairs)

| dropped because | instructions |
|---|---|
{drops}

## Columns

`prompt`, `chosen`, `rejected` (messages); `prompt_id` (128-bit hash of the instruction);
`chosen_model`, `rejected_model`; `kinship` of the two models; `s_pref_chosen`,
`s_pref_rejected`; `chosen_rating`, `rejected_rating` (the instance rating, null when absent);
`source`.

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
    return (
        f"strategy {result.strategy} (tau {result.tau:g}, seed {result.seed}): "
        f"{m['pairs']} pairs from {m['instructions']} instructions"
        f" (dropped: {drops or 'none'}); mean kinship {m['mean_kinship']}, "
        f"mean S_pref gap {m['mean_s_pref_gap']}, rating agreement {m['rating_agree']} "
        f"(ties {m['rating_tie']}, {m['rated_pairs']} rated pairs)"
    )


def load_kinship_dir(path: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(models, kinship)`` frames from the kinship stage's output directory."""
    from karma.io import read_parquet

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
    out: Path = output_path("pairs.parquet + README.md (dataset card)", is_dir=True)
    metrics: Path | None = output_path("flat metrics", ".json", required=False)
    plot: Path | None = output_path("model-pair heatmap", ".png", required=False)


def run_preferences(params: Params, paths: PreferencesPaths) -> dict[str, Any]:
    """Stage ``preferences``: read the completions, pair them, write pairs, card and metrics."""
    from karma.io import write_json
    from karma.plots import pair_usage_heatmap
    from karma.ultrafeedback import read_ultrafeedback

    cfg = params.preferences
    models, kinship = load_kinship_dir(paths.kinship_dir)
    data = read_ultrafeedback(cfg.dataset, split=cfg.split)
    log.info("read %d instructions, %d completions from %s", len(data), data.completions.height,
             cfg.dataset)  # fmt: skip
    result = make_pairs(
        data,
        models.select("model", "s_pref"),
        kinship,
        strategy=params.kinship,
        tau=params.similarity.tau,
        seed=params.seed,
        rating=cfg.rating,
        aliases=cfg.aliases,
    )
    if result.pairs.height == 0:
        c = result.counts
        drops = ", ".join(f"{r} {c[f'drop_{r}']}" for r in REASONS[1:] if c[f"drop_{r}"])
        raise KarmaError(
            f"no preference pair: every instruction was dropped ({drops})",
            file=cfg.dataset,
            field="kinship",
            value=params.kinship,
            expected=f"a strategy and tau ({params.similarity.tau}) that pair some responses",
        )
    card_params = {
        "kinship": params.kinship,
        "seed": params.seed,
        "similarity.tau": params.similarity.tau,
        "preferences.rating": cfg.rating,
        "preferences.dataset": cfg.dataset,
    }
    out = Path(paths.out)
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(result, out / "pairs.parquet")
    (out / "README.md").write_text(dataset_card(result, dataset=cfg.dataset, params=card_params))
    if paths.metrics is not None:
        write_json(paths.metrics, result.metrics)
    if paths.plot is not None:
        pair_usage_heatmap(
            result.pairs["chosen_model"].to_list(),
            result.pairs["rejected_model"].to_list(),
            paths.plot,
            order=models["model"].to_list(),
            title=f"Model pairs used by '{params.kinship}'",
        )
    log.info("%s", summary(result))
    return result.metrics


STAGE = Stage(
    name="preferences",
    settings=("kinship", "seed", "similarity.tau", "preferences"),
    paths=PreferencesPaths,
    run=run_preferences,
    inputs=("preferences.dataset",),
    help="Per instruction, pair two responses of kin models (kinship >= tau) and choose the one "
    "whose model has the higher S_pref (KARMA), or binarise by rating (rlaif), or pair at "
    "random; TRL conversational format with metadata columns.",
)
