"""Kinship kernel speed vs numpy (BLAS / masked) and scipy ``cdist``, measured in the same run.

    python -m benchmarks.kinship            # n = 256, 1024, 4096 x 6 and 64 benchmarks
    python -m benchmarks.kinship --quick    # n = 256, 1024 only
    python -m benchmarks.kinship --metric pearson --sizes 512 2048

For every (n models, d benchmarks, complete | 20% missing) it prints the best-of-r wall time of:

* ``kernel``: the Numba kernel (``backend="kernel"``), all pairs, NaN-aware;
* ``auto``: the public :func:`karma.kinship.kinship.pairwise_similarity` (complete data -> BLAS
path);
* ``blas``: plain numpy on complete data (normalise rows, one ``Y @ Y.T``);
* ``masked``: the straightforward masked numpy approach (:func:`pairwise_similarity_numpy`,
  one vectorised row at a time), on missing data;
* ``cdist``: ``scipy.spatial.distance.cdist`` on complete data;

and the ratios ``auto/blas`` and ``kernel/blas`` (complete; goal: auto within 1.5x of BLAS),
``masked/kernel`` (missing; goal: >= 5x at n = 4096) and ``cdist/kernel``.
Timings include the kernel's input preparation; the first (compiling) call is not timed.
Each time is the best of several rounds (the implementations of one row run round-robin, up to
30 rounds within ``--budget`` seconds; the slow masked numpy rows at n = 4096 run once).
"""

from __future__ import annotations

import os

# Numba's OpenMP workers and OpenBLAS's threads alternate in this script: idle OpenMP threads
# that spin-wait would steal the cores from the next BLAS call (and vice versa).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from collections.abc import Callable

import numpy as np
from scipy.spatial.distance import cdist

from karma.kinship.similarity import pairwise_similarity, pairwise_similarity_numpy

CDIST = {"cosine": "cosine", "pearson": "correlation", "euclidean": "euclidean"}


def best_times(
    fns: dict[str, Callable[[], object]], budget: float
) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each function, run round-robin (so that all of them see the same load).

    Rounds continue while under ``budget`` seconds (at least one round, at most 30). The machine
    this runs on may be shared: the minimum is the least disturbed run.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    start = time.perf_counter()
    for _ in range(30):
        t_round = time.perf_counter()
        for key, fn in fns.items():
            t0 = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - t0)
        now = time.perf_counter()
        if now - start + (now - t_round) > budget:
            break
    return {k: min(v) for k, v in times.items()}, outs


def blas_reference(x: np.ndarray, metric: str) -> np.ndarray:
    """Plain numpy BLAS similarity of complete data (the peer for the complete case)."""
    if metric == "euclidean":
        sq = np.einsum("ij,ij->i", x, x)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
        return 1.0 / (1.0 + np.sqrt(d2))
    y = x - x.mean(axis=1, keepdims=True) if metric == "pearson" else x
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return y @ y.T


def cdist_reference(x: np.ndarray, metric: str) -> np.ndarray:
    d = cdist(x, x, CDIST[metric])
    return 1.0 / (1.0 + d) if metric == "euclidean" else 1.0 - d


def _fmt(cols: dict[str, float], key: str) -> str:
    return f"{cols[key] * 1e3:8.1f}m" if key in cols else f"{'-':>9}"


def _ratio(cols: dict[str, float], a: str, b: str) -> str:
    return f"{cols[a] / cols[b]:8.2f}x" if a in cols and b in cols else f"{'-':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 256 and 1024 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=[6, 64])
    parser.add_argument("--metric", choices=sorted(CDIST), default="cosine")
    parser.add_argument("--missing", type=float, default=0.2)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per table row")
    args = parser.parse_args()
    sizes = args.sizes or ([256, 1024] if args.quick else [256, 1024, 4096])
    metric = args.metric
    import numba

    print(
        f"metric={metric}  numba threads={numba.get_num_threads()}  cpus={os.cpu_count()}  "
        f"missing={args.missing:.0%}"
    )
    warm = np.random.default_rng(0).random((8, 3))
    pairwise_similarity(warm, metric, backend="kernel")  # compile (or load the cache)
    header = (
        f"{'n':>5} {'d':>3} {'data':>8} | {'kernel':>9} {'auto':>9} {'blas':>9} "
        f"{'masked':>9} {'cdist':>9} | {'auto/blas':>9} {'kern/blas':>9} "
        f"{'masked/k':>8} {'cdist/k':>8} {'max|err|':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        for d in args.dims:
            rng = np.random.default_rng(n * 1000 + d)
            full = rng.random((n, d))
            for label, miss in (("complete", 0.0), ("missing", args.missing)):
                x = full.copy()
                if miss:
                    x[rng.random(x.shape) < miss] = np.nan
                fns: dict[str, Callable[[], object]] = {
                    "kernel": lambda x=x: pairwise_similarity(x, metric, 2, backend="kernel")
                }
                if miss:
                    fns["masked"] = lambda x=x: pairwise_similarity_numpy(x, metric, 2)
                else:
                    fns["auto"] = lambda x=x: pairwise_similarity(x, metric, 2)
                    fns["blas"] = lambda x=x: blas_reference(x, metric)
                    fns["cdist"] = lambda x=x: cdist_reference(x, metric)
                cols, outs = best_times(fns, args.budget)
                k = outs["kernel"]
                ref = outs["masked" if miss else "blas"]
                err = float(np.nanmax(np.abs(np.asarray(k) - np.asarray(ref))))
                times = " ".join(
                    _fmt(cols, c) for c in ("kernel", "auto", "blas", "masked", "cdist")
                )
                ratios = (
                    f"{_ratio(cols, 'auto', 'blas')} {_ratio(cols, 'kernel', 'blas')} "
                    f"{_ratio(cols, 'masked', 'kernel')[1:]} {_ratio(cols, 'cdist', 'kernel')[1:]}"
                )
                print(f"{n:>5} {d:>3} {label:>8} | {times} | {ratios} {err:9.1e}", flush=True)


if __name__ == "__main__":
    main()
