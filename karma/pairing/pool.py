"""The origin models as the kernel sees them (:class:`Pool`), a batch as the kernel's arrays
(:func:`prepare`), the pair search over a batch (:func:`search`) and the pool statistics of
the diagnostics (:func:`pool_stats`, :func:`used_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from karma.core.errors import KarmaError
from karma.pairing.kernel import IDENTICAL, KEPT, pair_arrays, pool_kernel
from karma.pairing.strategies import RATING_FIELDS
from karma.pairing.ultrafeedback import UltraFeedback


def round6(v: float | None) -> float | None:
    """A metric as written: 6 decimals, None for undefined (None, NaN, inf)."""
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def s_pref_table(s_pref: pl.DataFrame | Mapping[str, float]) -> tuple[list[str], np.ndarray]:
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


def model_index(
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


@dataclass(frozen=True)
class Pool:
    """The origin models as the kernel sees them: ``names`` (sorted), their ``s_pref`` (NaN when
    undefined) and the ``kin`` matrix over them."""

    names: list[str]
    s_pref: np.ndarray
    kin: np.ndarray

    @classmethod
    def of(cls, s_pref: pl.DataFrame | Mapping[str, float], kinship: pl.DataFrame) -> Pool:
        names, sp = s_pref_table(s_pref)
        return cls(names, sp, kinship_matrix(names, kinship))

    @property
    def m(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Prepared:
    """A batch of instructions as the kernel's arrays against a :class:`Pool`: one entry per
    completion (``model`` index or -1, ``nonempty``, ``ratings`` per field, the byte length
    ``text_len`` of the response); ``row0`` is the global row of the batch's first
    instruction."""

    data: UltraFeedback
    pool: Pool
    offsets: np.ndarray
    model: np.ndarray
    nonempty: np.ndarray
    ratings: dict[str, np.ndarray]
    text_len: np.ndarray
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

    def slice(self, a: int, b: int) -> Prepared:
        """Instructions ``a`` to ``b - 1`` of the batch, as a batch of their own (the same
        global rows, so the same per-row seeds)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        data = UltraFeedback(
            self.data.prompts.slice(a, b - a), self.data.completions.slice(lo, hi - lo),
            self.data.source,
        )  # fmt: skip
        return Prepared(
            data=data,
            pool=self.pool,
            offsets=self.offsets[a : b + 1] - lo,
            model=self.model[lo:hi],
            nonempty=self.nonempty[lo:hi],
            ratings={f: r[lo:hi] for f, r in self.ratings.items()},
            text_len=self.text_len[lo:hi],
            row0=self.row0 + a,
        )


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
    response = comps["response"]
    # not blank = some non-whitespace character (what strip_chars() would leave; no copy)
    nonempty = response.str.contains(r"\S").to_numpy()
    ratings = {f: comps[f].fill_null(np.nan).to_numpy().astype(np.float64) for f in RATING_FIELDS}
    return Prepared(
        data=data,
        pool=pool,
        offsets=offsets,
        model=model_index(comps["model"], pool.names, aliases),
        nonempty=np.ascontiguousarray(nonempty, dtype=np.bool_),
        ratings=ratings,
        # equal lengths are confirmed on the text (search)
        text_len=response.str.len_bytes().to_numpy(),
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
    check_text: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pair_arrays` over a prepared batch, identical texts dropped:
    ``(chosen, rejected, reason)`` per instruction. ``check_text=False``: keep identical texts
    (for a comparison with pairs already checked: an identical pair never equals one of
    them)."""
    chosen, rejected, reason = pair_arrays(
        prep.offsets, prep.model, prep.nonempty, prep.ratings[rating], prep.s_pref, prep.kin,
        strategy=strategy, tau=tau, seed=seed, pool=pool, row0=prep.row0,
    )  # fmt: skip
    if not check_text:
        return chosen, rejected, reason
    kept = np.flatnonzero(reason == KEPT)
    length = prep.text_len
    same = length[chosen[kept]] == length[rejected[kept]]
    if same.any():  # confirm on the text itself
        cand = kept[same]
        resp = prep.data.completions["response"]
        equal = (resp.gather(chosen[cand]) == resp.gather(rejected[cand])).to_numpy()
        drop = cand[equal]
        reason[drop] = IDENTICAL
        chosen[drop] = -1
        rejected[drop] = -1
    return chosen, rejected, reason


def pool_counts(prep: Prepared) -> np.ndarray:
    """How often each model pair (a < b) meets as two candidates of one instruction: the pool
    every strategy chooses from (``(m, m)`` int64, upper triangle)."""
    m = prep.pool.m
    out = np.zeros((m, m), dtype=np.int64)
    scored = prep.model >= 0
    scored[scored] = ~np.isnan(prep.s_pref[prep.model[scored]])
    pool_kernel(prep.offsets, prep.model, prep.nonempty & scored, m, out)
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
        "mean_kinship": round6(float((w[ok] * kin[ok]).sum() / w[ok].sum())) if ok.any() else None,
        "mean_abs_s_pref_gap": round6(float((w * gap).sum() / total)) if total else None,
        "spearman_kinship_gap": round6(weighted_spearman(kin[ok], gap[ok], w[ok])),
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
        out[key] = round6(float((c[ok] * values[ok]).sum() / n)) if n else None
    return out


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
