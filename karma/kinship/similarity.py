"""Pairwise similarity of benchmark vectors: numba kernels, a BLAS path, the numpy reference."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from numba import njit, prange

from karma.core.errors import KarmaError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


Metric = Literal["cosine", "pearson", "euclidean"]


METRICS: tuple[str, ...] = ("cosine", "pearson", "euclidean")


_METRIC_CODE = {name: i for i, name in enumerate(METRICS)}


#: complete tables with at least this many models use the BLAS path under ``backend="auto"``
BLAS_MIN_MODELS = 64


#: a pearson vector counts as constant when sum((x - mean)^2) <= this * sum(x^2)
_CONST_RTOL = 1e-20


#: euclidean via the Gram matrix: recompute exactly where d^2 <= this * 2 max |x|^2
_CANCEL_RTOL = 1e-6


#: top-k mode computes at most this many similarities at a time (rows x models)
BLOCK_ELEMENTS = 1 << 22


_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _cosine(x: np.ndarray, m: np.ndarray, i: int, j: int, min_common: int) -> float:
    """Cosine of rows i and j over their common benchmarks (x: NaN->0, m: 1.0 if present).

    Branch-free over benchmarks: missing values are 0 in ``x`` and the mask multiplies them out.
    Every expression is symmetric in (i, j), so the result is too, bit for bit.
    """
    dot = 0.0
    na = 0.0
    nb = 0.0
    c = 0.0
    for k in range(x.shape[1]):
        a = x[i, k]
        b = x[j, k]
        wa = m[i, k]
        wb = m[j, k]
        dot += a * b
        na += a * a * wb
        nb += b * b * wa
        c += wa * wb
    if c < min_common or na == 0.0 or nb == 0.0:
        return np.nan
    return min(1.0, max(-1.0, dot / np.sqrt(na * nb)))


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _pearson(x: np.ndarray, m: np.ndarray, i: int, j: int, min_common: int) -> float:
    """Pearson r of rows i and j over their common benchmarks; two passes (means first)."""
    c = 0.0
    sa = 0.0
    sb = 0.0
    qa = 0.0
    qb = 0.0
    for k in range(x.shape[1]):
        a = x[i, k]
        b = x[j, k]
        wa = m[i, k]
        wb = m[j, k]
        c += wa * wb
        sa += a * wb
        sb += b * wa
        qa += a * a * wb
        qb += b * b * wa
    if c < min_common:
        return np.nan
    mean_a = sa / c
    mean_b = sb / c
    sab = 0.0
    saa = 0.0
    sbb = 0.0
    for k in range(x.shape[1]):
        w = m[i, k] * m[j, k]
        da = (x[i, k] - mean_a) * w
        db = (x[j, k] - mean_b) * w
        sab += da * db
        saa += da * da
        sbb += db * db
    if saa <= _CONST_RTOL * qa or sbb <= _CONST_RTOL * qb:
        return np.nan
    return min(1.0, max(-1.0, sab / np.sqrt(saa * sbb)))


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _euclidean(x: np.ndarray, m: np.ndarray, i: int, j: int, min_common: int) -> float:
    """1 / (1 + euclidean distance) of rows i and j over their common benchmarks."""
    c = 0.0
    s = 0.0
    for k in range(x.shape[1]):
        w = m[i, k] * m[j, k]
        diff = (x[i, k] - x[j, k]) * w
        s += diff * diff
        c += w
    if c < min_common:
        return np.nan
    return 1.0 / (1.0 + np.sqrt(s))


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _fill_row(
    x: np.ndarray,
    m: np.ndarray,
    i: int,
    j0: int,
    out_row: np.ndarray,
    metric: int,
    min_common: int,
) -> None:
    """``out_row[j] = similarity(i, j)`` for j >= j0; the metric switch sits outside the loop."""
    n = x.shape[0]
    if metric == 0:
        for j in range(j0, n):
            out_row[j] = _cosine(x, m, i, j, min_common)
    elif metric == 1:
        for j in range(j0, n):
            out_row[j] = _pearson(x, m, i, j, min_common)
    else:
        for j in range(j0, n):
            out_row[j] = _euclidean(x, m, i, j, min_common)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _dense_kernel(x: np.ndarray, m: np.ndarray, metric: int, min_common: int) -> np.ndarray:
    """Full symmetric (n, n) matrix; each unordered pair computed once.

    The upper triangle is computed row by row (contiguous writes); rows are processed in pairs
    (p, n-1-p) so that every parallel task has ~n pairs to do. The lower triangle is then
    mirrored tile by tile (cache-friendly transpose).
    """
    n = x.shape[0]
    out = np.empty((n, n))
    for q in prange((n + 1) // 2):
        p = np.int64(q)  # prange indices may be unsigned: keep index arithmetic in int64
        _fill_row(x, m, p, p, out[p], metric, min_common)
        if n - 1 - p != p:
            _fill_row(x, m, n - 1 - p, n - 1 - p, out[n - 1 - p], metric, min_common)
    tile = 32
    for bq in prange((n + tile - 1) // tile):
        bi = np.int64(bq) * tile
        for bj in range(0, bi + 1, tile):
            for i in range(bi, min(bi + tile, n)):
                for j in range(bj, min(bj + tile, i)):
                    out[i, j] = out[j, i]
    return out


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _rows_kernel(
    x: np.ndarray, m: np.ndarray, rows: np.ndarray, metric: int, min_common: int
) -> np.ndarray:
    """Similarities of the given rows against all rows: shape (len(rows), n)."""
    r = rows.shape[0]
    out = np.empty((r, x.shape[0]))
    for q in prange(r):
        a = np.int64(q)
        _fill_row(x, m, rows[a], 0, out[a], metric, min_common)
    return out


def kernel_inputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous float64 values (NaN -> 0) and presence mask (1.0 / 0.0) for the kernels."""
    present = ~np.isnan(x)
    x0 = np.ascontiguousarray(np.where(present, x, 0.0), dtype=np.float64)
    mask = np.ascontiguousarray(present, dtype=np.float64)
    return x0, mask


def _blas_rows(x: np.ndarray, rows: np.ndarray | None, metric: str, min_common: int) -> np.ndarray:
    """Complete data (no NaN): similarities of ``rows`` (all when None) against all rows."""
    n, d = x.shape
    nr = n if rows is None else len(rows)
    if d < min_common:
        return np.full((nr, n), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "euclidean":
            sq = np.einsum("ij,ij->i", x, x)
            xr = x if rows is None else x[rows]
            sqr = sq if rows is None else sq[rows]
            d2 = xr @ x.T  # in place from here on: one n x n buffer
            d2 *= -2.0
            d2 += sqr[:, None]
            d2 += sq[None, :]
            # |error| of d2 <= ~eps * (|a|^2 + |b|^2) <= eps * 2 max|x|^2: where d2 is not far
            # above that (near-identical vectors), recompute exactly
            ri, cj = np.nonzero(d2 <= _CANCEL_RTOL * 2.0 * float(sq.max(initial=0.0)))
            if len(ri):
                src = ri if rows is None else np.asarray(rows)[ri]
                for s in range(0, len(ri), 1 << 16):
                    sl = slice(s, s + (1 << 16))
                    diff = x[src[sl]] - x[cj[sl]]
                    d2[ri[sl], cj[sl]] = np.einsum("ij,ij->i", diff, diff)
            np.maximum(d2, 0.0, out=d2)
            np.sqrt(d2, out=d2)
            d2 += 1.0
            return np.reciprocal(d2, out=d2)
        if metric == "pearson":
            q = np.einsum("ij,ij->i", x, x)
            y = x - x.mean(axis=1, keepdims=True)
            s = np.einsum("ij,ij->i", y, y)
            y = y / np.sqrt(s)[:, None]
            y[s <= _CONST_RTOL * q] = np.nan
        else:
            s = np.einsum("ij,ij->i", x, x)
            y = x / np.sqrt(s)[:, None]
            y[s == 0.0] = np.nan
        yr = y if rows is None else y[rows]
        out = yr @ y.T
        return np.clip(out, -1.0, 1.0, out=out)


def pairwise_similarity_numpy(
    x: np.ndarray,
    metric: str = "cosine",
    min_common: int = 2,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Reference: the straightforward masked numpy computation, one row at a time.

    Same semantics as the kernels (common benchmarks only; NaN below ``min_common``, for a zero
    vector (cosine) and a constant vector (pearson)). Slow; used by tests and benchmarks.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    present = ~np.isnan(x)
    idx = np.arange(n) if rows is None else np.asarray(rows)
    out = np.empty((len(idx), n))
    with np.errstate(divide="ignore", invalid="ignore"):
        for r, i in enumerate(idx):
            common = present & present[i]
            c = common.sum(axis=1)
            a = np.where(common, x[i], 0.0)
            b = np.where(common, x, 0.0)
            if metric == "cosine":
                na = (a * a).sum(axis=1)
                nb = (b * b).sum(axis=1)
                val = (a * b).sum(axis=1) / np.sqrt(na * nb)
                val[(na == 0) | (nb == 0)] = np.nan
                val = np.clip(val, -1.0, 1.0)
            elif metric == "pearson":
                da = np.where(common, a - (a.sum(axis=1) / c)[:, None], 0.0)
                db = np.where(common, b - (b.sum(axis=1) / c)[:, None], 0.0)
                saa = (da * da).sum(axis=1)
                sbb = (db * db).sum(axis=1)
                val = (da * db).sum(axis=1) / np.sqrt(saa * sbb)
                const = (saa <= _CONST_RTOL * (a * a).sum(axis=1)) | (
                    sbb <= _CONST_RTOL * (b * b).sum(axis=1)
                )
                val[const] = np.nan
                val = np.clip(val, -1.0, 1.0)
            elif metric == "euclidean":
                val = 1.0 / (1.0 + np.sqrt(((a - b) ** 2).sum(axis=1)))
            else:
                raise KarmaError("unknown similarity", field="metric", value=metric)
            val[c < min_common] = np.nan
            out[r] = val
    return out


def resolve_backend(x: np.ndarray, backend: str) -> str:
    if backend not in ("auto", "kernel", "blas", "numpy"):
        raise KarmaError(
            "unknown backend", field="backend", value=backend, expected="auto|kernel|blas|numpy"
        )
    complete = not np.isnan(x).any()
    if backend == "blas" and not complete:
        raise KarmaError("the BLAS backend needs a table without missing values", field="backend")
    if backend == "auto":
        return "blas" if complete and x.shape[0] >= BLAS_MIN_MODELS else "kernel"
    return backend


def pairwise_similarity(
    x: np.ndarray, metric: str = "cosine", min_common: int = 2, *, backend: str = "auto"
) -> np.ndarray:
    """Symmetric (n, n) similarity matrix of the rows of ``x`` (NaN = missing value)."""
    if metric not in METRICS:
        raise KarmaError(
            "unknown similarity", field="metric", value=metric, expected="|".join(METRICS)
        )
    x = np.ascontiguousarray(x, dtype=np.float64)
    chosen = resolve_backend(x, backend)
    if chosen == "blas":
        return _blas_rows(x, None, metric, min_common)
    if chosen == "numpy":
        return pairwise_similarity_numpy(x, metric, min_common)
    x0, mask = kernel_inputs(x)
    return _dense_kernel(x0, mask, _METRIC_CODE[metric], int(min_common))


def similarity_rows(
    x: np.ndarray,
    rows: np.ndarray,
    metric: str = "cosine",
    min_common: int = 2,
    *,
    backend: str = "auto",
    prepared: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Similarities of ``rows`` of ``x`` against all rows: shape (len(rows), n)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    chosen = resolve_backend(x, backend)
    if chosen == "blas":
        return _blas_rows(x, rows, metric, min_common)
    if chosen == "numpy":
        return pairwise_similarity_numpy(x, metric, min_common, rows=rows)
    x0, mask = prepared if prepared is not None else kernel_inputs(x)
    return _rows_kernel(x0, mask, rows, _METRIC_CODE[metric], int(min_common))
