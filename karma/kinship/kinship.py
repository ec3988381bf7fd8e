"""Kinship of origin models (KARMA, arXiv 2502.18744, section 3): S_pref, kinship, global kin pairs.

Pipeline of this module (pure functions; no params.yaml reads):

1. :func:`normalise` min-max normalises every benchmark over the pool (a constant benchmark
   carries no information and is dropped with a warning); ``S_pref`` is the mean of a model's
   normalised scores (the paper's eq. 2), ignoring missing ones.
2. :func:`pairwise_similarity` computes kinship: ``cosine`` (the paper's), ``pearson`` or
   ``euclidean`` (``1 / (1 + d)``) of normalised vectors. NaN-aware: a pair uses only the
   benchmarks both models have and is NaN with fewer than ``min_common`` of them (also NaN where
   the similarity is undefined: a zero vector for cosine, a constant vector for pearson).
3. :func:`compute_kinship` adds the global kin pairs (the paper's Figure 3) and, above
   ``dense_max_models`` models, keeps only the ``top_k`` kin of each model so that a pool of
   50,000 models fits in memory (the matrix is computed block by block and never held whole).

Global kin pairs, over pairs with kinship >= tau, models ranked by S_pref (descending, then id;
undefined S_pref last). Every tie is broken by this rank, so the result does not depend on the
order of the input rows:

* ``score``: the highest-ranked model that has a kin, with its highest-ranked kin (when the two
  best models are kin, that is them: "the two models with the highest S_pref");
* ``sim``: the pair with the highest kinship; ties -> the pair whose better model ranks higher,
  then whose other model does;
* ``score_sim``: the highest-ranked model that has a kin, with its most similar kin (ties -> the
  higher-ranked kin).

Each pair is written higher S_pref first. Undefined kinship is null (never NaN) in the frames.

Backends of :func:`pairwise_similarity` (``backend="auto"`` picks one):

* ``kernel``: Numba ``@njit(parallel=True, cache=True)`` kernels over C-contiguous float64 arrays
  (values with NaN replaced by 0, plus a 0/1 mask); branch-free inner loops. This is the path for
  tables with missing values.
* ``blas``: complete tables (no NaN) of >= ``BLAS_MIN_MODELS`` models go through one matrix
  product (``Y @ Y.T`` on normalised / centred rows; euclidean via the Gram matrix, with pairs
  that suffer cancellation recomputed exactly). Dense BLAS is the fastest way to do the complete
  case; the kernel exists for the NaN case, where BLAS does not apply.
* ``numpy``: :func:`pairwise_similarity_numpy`, the straightforward masked numpy reference the
  tests compare the kernels against.

>>> import polars as pl
>>> df = pl.DataFrame({"model": ["a", "b", "c"], "x": [1.0, 2.0, 3.0], "y": [3.0, 2.0, 0.0]})
>>> res = compute_kinship(df)
>>> res.pairs["score"]
['b', 'a']
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import dumps_json, read_json, write_json
from karma.core.stage import Stage, input_path, output_path

if TYPE_CHECKING:
    from karma.params import Params

from karma.kinship.result import KinshipResult
from karma.kinship.similarity import (
    BLOCK_ELEMENTS,
    METRICS,
    kernel_inputs,
    pairwise_similarity,
    resolve_backend,
    similarity_rows,
)

log = logging.getLogger(__name__)

PAIR_STRATEGIES: tuple[str, ...] = ("score", "sim", "score_sim")


def normalise(scores: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """Min-max normalise each benchmark over the pool; add ``s_pref``; rank the models.

    Returns (frame ``model, s_pref, <benchmarks>`` sorted by S_pref descending then model id,
    dropped benchmark names). Constant (or empty) benchmarks are dropped with a warning.
    """
    benches = [c for c in scores.columns if c != "model"]
    if "s_pref" in benches:
        raise KarmaError(
            "'s_pref' is a reserved column name, not a benchmark", field="s_pref", value=benches
        )
    stats = scores.select(
        [pl.col(b).fill_nan(None).min().alias(f"{b}\x00min") for b in benches]
        + [pl.col(b).fill_nan(None).max().alias(f"{b}\x00max") for b in benches]
    ).row(0, named=True)
    keep, dropped = [], []
    for b in benches:
        lo, hi = stats[f"{b}\x00min"], stats[f"{b}\x00max"]
        if lo is None or hi is None or hi <= lo:
            dropped.append(b)
        else:
            keep.append(b)
    if dropped:
        log.warning(
            "dropping constant benchmark(s) %s: the same score for every model carries no "
            "information about kinship",
            ", ".join(dropped),
        )
    if not keep:
        raise KarmaError(
            "every benchmark is constant over the pool (or empty)",
            field="benchmarks",
            value=benches,
            expected="at least one benchmark whose scores differ between models",
        )
    out = (
        scores.lazy()
        .select(
            pl.col("model"),
            *[
                (
                    (pl.col(b).fill_nan(None) - stats[f"{b}\x00min"])
                    / (stats[f"{b}\x00max"] - stats[f"{b}\x00min"])
                ).alias(b)
                for b in keep
            ],
        )
        .with_columns(pl.mean_horizontal(keep).alias("s_pref"))
        .select("model", "s_pref", *keep)
        .sort(["s_pref", "model"], descending=[True, False], nulls_last=True)
        .collect()
    )
    empty = out.filter(pl.col("s_pref").is_null())["model"].to_list()
    if empty:
        log.warning("model(s) with no usable score (S_pref undefined): %s", ", ".join(empty))
    return out, dropped


def _topk_rows(kin_block: np.ndarray, start: int, k: int) -> tuple[np.ndarray, ...]:
    """Top-k kin per row of a masked block (non-kin = -inf): ties -> lower index (higher S_pref)."""
    out_a, out_b, out_v = [], [], []
    b, n = kin_block.shape
    kk = min(k, n - 1)
    if kk <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    part = np.argpartition(-kin_block, kk - 1, axis=1)[:, :kk]
    kth = np.take_along_axis(kin_block, part, axis=1).min(axis=1)
    for r in range(b):
        row = kin_block[r]
        if not np.isfinite(kth[r]):  # fewer than k kin: keep all finite
            cand = np.nonzero(np.isfinite(row))[0]
        else:
            cand = np.nonzero(row >= kth[r])[0]
        order = np.lexsort((cand, -row[cand]))[:kk]
        sel = cand[order]
        out_a.append(np.full(len(sel), start + r, dtype=np.int64))
        out_b.append(sel)
        out_v.append(row[sel])
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_v)


def _check_scores(scores: pl.DataFrame, similarity: str) -> None:
    if similarity not in METRICS:
        raise KarmaError(
            "unknown similarity", field="metric", value=similarity, expected="|".join(METRICS)
        )
    if "model" not in scores.columns or scores.height < 2:
        raise KarmaError(
            "need a model column and at least two models", value=scores.shape, expected=">= 2 rows"
        )
    if scores["model"].n_unique() != scores.height:
        raise KarmaError("duplicate model ids", field="model")


def _row_blocks(
    x: np.ndarray, similarity: str, min_common: int, dense: bool, chosen: str
) -> tuple[Any, int, np.ndarray | None]:
    """``(blocks of (start row, similarity rows), number of blocks, dense matrix or None)``."""
    n = x.shape[0]
    if dense:
        matrix = pairwise_similarity(x, similarity, min_common, backend=chosen)
        return ((s, matrix[s : s + 1024]) for s in range(0, n, 1024)), math.ceil(n / 1024), matrix
    prepared = kernel_inputs(x) if chosen == "kernel" else None
    step = max(1, min(n, BLOCK_ELEMENTS // n))
    blocks = (
        (s, similarity_rows(x, np.arange(s, min(n, s + step)), similarity, min_common,
                            backend=chosen, prepared=prepared))
        for s in range(0, n, step)
    )  # fmt: skip
    return blocks, math.ceil(n / step), None


@dataclass
class _Scan:
    """What one pass over the row blocks collects: global pairs, statistics, top-k kin."""

    n: int
    tau: float
    top_k: int
    keep_topk: bool
    first_row: tuple[int, np.ndarray] | None = None  # highest-S_pref model that has kin
    sim_best: tuple[float, int, int] = (-np.inf, -1, -1)
    n_kin: int = 0
    n_defined: int = 0
    total: float = 0.0
    topk: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add(self, start: int, block: np.ndarray) -> None:
        n, b = self.n, block.shape[0]
        rows = np.arange(start, start + b)
        defined = np.isfinite(block)
        defined[np.arange(b), rows] = False
        upper = np.arange(n)[None, :] > rows[:, None]
        kin = defined & (block >= self.tau)
        masked = np.where(kin, block, -np.inf)
        up_def = defined & upper
        self.n_defined += int(up_def.sum())
        self.total += float(block[up_def].sum())
        self.n_kin += int((kin & upper).sum())
        if self.first_row is None:
            has = np.nonzero(kin.any(axis=1))[0]
            if len(has):
                self.first_row = (start + int(has[0]), masked[has[0]].copy())
        up_masked = np.where(upper, masked, -np.inf)
        r, c = divmod(int(np.argmax(up_masked)), n)
        if up_masked[r, c] > self.sim_best[0]:
            self.sim_best = (float(up_masked[r, c]), start + r, c)
        if self.keep_topk:
            self.topk.append(_topk_rows(masked, start, self.top_k))


def _no_kin_error(
    scan: _Scan, similarity: str, tau: float, min_common: int, n_benches: int
) -> None:
    if scan.first_row is None and scan.n_defined == 0:
        raise KarmaError(
            "no pair of models shares enough benchmarks: every kinship is undefined",
            field="similarity.min_common",
            value=min_common,
            expected=f"at most {n_benches} (the benchmarks left after normalisation)",
        )
    if scan.first_row is None:
        mean = "undefined" if scan.n_defined == 0 else f"{scan.total / scan.n_defined:.3g}"
        raise KarmaError(
            "no pair of models is kin (kinship >= tau)",
            field="similarity.tau",
            value=tau,
            expected=f"a lower tau; the mean {similarity} kinship here is {mean}",
        )


def _kinship_frame(names: list[str], matrix: np.ndarray | None, scan: _Scan) -> pl.DataFrame:
    if matrix is not None:
        n = len(names)
        ia, ib = np.nonzero(~np.eye(n, dtype=bool))
        vals = matrix[ia, ib]
    else:
        ia, ib, vals = (np.concatenate([t[i] for t in scan.topk]) for i in range(3))
    name_s = pl.Series("name", names, dtype=pl.String)
    return pl.DataFrame(
        {
            "model_a": name_s.gather(ia),
            "model_b": name_s.gather(ib),
            "kinship": pl.Series(vals, dtype=pl.Float64).fill_nan(None),
        }
    )


def compute_kinship(
    scores: pl.DataFrame,
    *,
    similarity: str = "cosine",
    tau: float = 0.1,
    min_common: int = 2,
    dense_max_models: int = 2000,
    top_k: int = 50,
    backend: str = "auto",
) -> KinshipResult:
    """S_pref, kinship and the global kin pairs of a canonical score frame.

    ``scores``: ``model`` + one numeric column per benchmark (see
    :func:`karma.kinship.scores.read_scores`).
    Pools larger than ``dense_max_models`` are processed block by block and only the ``top_k``
    kin of each model are kept. Raises :class:`KarmaError` when no pair is kin (kinship >= tau).
    """
    _check_scores(scores, similarity)
    models, dropped = normalise(scores)
    benches = [c for c in models.columns if c not in ("model", "s_pref")]
    names = models["model"].to_list()
    n = len(names)
    x = np.ascontiguousarray(models.select(benches).to_numpy(), dtype=np.float64)
    dense = n <= dense_max_models
    blocks, n_blocks, matrix = _row_blocks(
        x, similarity, min_common, dense, resolve_backend(x, backend)
    )
    if not dense:
        log.info("pool of %d models > dense_max_models=%d: keeping top-%d kin",
                 n, dense_max_models, top_k)  # fmt: skip
    scan = _Scan(n=n, tau=tau, top_k=top_k, keep_topk=not dense)
    progress = _progress(n_blocks, enabled=n_blocks > 4)
    for start, block in blocks:
        scan.add(start, block)
        progress.update(1)
    progress.close()
    _no_kin_error(scan, similarity, tau, min_common, len(benches))
    assert scan.first_row is not None
    top, row = scan.first_row
    score_partner = int(np.nonzero(np.isfinite(row))[0][0])
    sim_partner = int(np.argmax(row))  # first max -> the higher-S_pref partner among ties
    pairs_idx = {
        "score": _ordered(top, score_partner),
        "sim": _ordered(scan.sim_best[1], scan.sim_best[2]),
        "score_sim": _ordered(top, sim_partner),
    }
    stats = {
        "n_models": n,
        "n_benchmarks": len(benches),
        "n_dropped_benchmarks": len(dropped),
        "n_pairs_defined": scan.n_defined,
        "n_kin_pairs": scan.n_kin,
        "mean_kinship": (scan.total / scan.n_defined) if scan.n_defined else None,
    }
    return KinshipResult(
        models=models,
        kinship=_kinship_frame(names, matrix, scan),
        pairs={k: [names[i], names[j]] for k, (i, j) in pairs_idx.items()},
        metric=similarity,
        tau=float(tau),
        min_common=int(min_common),
        mode="dense" if dense else "top_k",
        benchmarks=benches,
        dropped=dropped,
        stats=stats,
        matrix=matrix,
    )


def _ordered(i: int, j: int) -> tuple[int, int]:
    """Pair in rank order: the higher-S_pref model (lower index) first."""
    return (i, j) if i < j else (j, i)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="kinship blocks", unit="block", disable=not enabled)


def write_kinship(result: KinshipResult, out_dir: str | os.PathLike[str]) -> None:
    """Write ``models.parquet``, ``kinship.parquet`` and ``pairs.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.models.write_parquet(out / "models.parquet", statistics=False)
    result.kinship.write_parquet(out / "kinship.parquet", statistics=False)
    (out / "pairs.json").write_text(dumps_json(result.pairs))


def summary(result: KinshipResult, top: int = 10) -> str:
    """A readable plain-text summary: S_pref ranking, global kin pairs, closest kin pairs."""
    lines = [
        f"{result.stats['n_models']} models x {len(result.benchmarks)} benchmarks "
        f"({', '.join(result.benchmarks)}); similarity={result.metric}, tau={result.tau:g}, "
        f"mode={result.mode}",
    ]
    if result.dropped:
        lines.append(f"dropped constant benchmarks: {', '.join(result.dropped)}")
    lines += ["", "S_pref ranking:"]
    ranking = result.models.select("model", "s_pref").head(max(top, 20)).rows()
    width = max(len(m) for m, _ in ranking)
    for rank, (model, s) in enumerate(ranking, 1):
        shown = "   n/a" if s is None else f"{s:.4f}"
        lines.append(f"  {rank:>3}. {model:<{width}}  {shown}")
    if result.models.height > len(ranking):
        lines.append(f"  ... {result.models.height - len(ranking)} more")
    lines += ["", f"global kin pairs (kinship >= {result.tau:g}; higher S_pref first):"]
    for key in PAIR_STRATEGIES:
        a, b = result.pairs[key]
        lines.append(f"  {key:<10} {a} > {b}")
    rank = {m: i for i, m in enumerate(result.names)}
    kin = (
        result.kinship.lazy()
        .with_columns(
            pl.col("model_a").replace_strict(rank, return_dtype=pl.Int64).alias("_ra"),
            pl.col("model_b").replace_strict(rank, return_dtype=pl.Int64).alias("_rb"),
        )
        .filter(pl.col("_ra") < pl.col("_rb"))
        .drop_nulls("kinship")
        .sort(["kinship", "_ra", "_rb"], descending=[True, False, False])
        .select("model_a", "model_b", "kinship")
        .head(top)
        .collect()
    )
    lines += [
        "",
        f"top kin pairs ({result.stats['n_kin_pairs']} kin of "
        f"{result.stats['n_pairs_defined']} defined pairs):",
    ]
    lines += [f"  {v:.4f}  {a} ~ {b}" for a, b, v in kin.rows()]
    return "\n".join(lines)


def kinship_metrics(
    result: KinshipResult, protocols: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The flat metrics of ``metrics/kinship.json``; with ``protocols`` (``{model: protocol}``,
    the scores stage's) also ``meta.protocol.<model>`` and ``meta.protocols`` (the distinct
    ones, comma-separated)."""
    st = result.stats
    mean = st["mean_kinship"]
    meta: dict[str, Any] = {}
    if protocols is not None:
        names = result.models["model"].to_list()
        meta = {f"meta.protocol.{m}": protocols.get(m, "unknown") for m in names}
        meta["meta.protocols"] = ",".join(sorted(set(meta.values())))
    return {
        "n_models": st["n_models"],
        "n_benchmarks": st["n_benchmarks"],
        "n_dropped_benchmarks": st["n_dropped_benchmarks"],
        "n_kin_pairs": st["n_kin_pairs"],
        "kin_fraction": round(st["n_kin_pairs"] / max(st["n_pairs_defined"], 1), 6),
        "mean_kinship": None if mean is None else round(mean, 6),
        **{f"pair_{k}": " > ".join(result.pairs[k]) for k in PAIR_STRATEGIES},
        **meta,
    }


def leave_one_out(scores: pl.DataFrame, result: KinshipResult, **settings: Any) -> dict[str, Any]:
    """How the pool depends on each benchmark: for every benchmark, ``compute_kinship`` without
    it (same ``settings``), the S_pref ranking, its Spearman correlation with the full ranking,
    the models whose rank moved, and the global kin pairs that changed.

    A benchmark whose removal leaves no kin pair (or no usable benchmark) is reported with its
    ``error``.
    """
    from scipy import stats

    full_rank = {m: i + 1 for i, m in enumerate(result.names)}
    full_sp = dict(result.models.select("model", "s_pref").iter_rows())
    out: dict[str, Any] = {}
    for bench in result.benchmarks + result.dropped:
        try:
            sub = compute_kinship(scores.drop(bench), **settings)
        except KarmaError as err:
            out[bench] = {"error": str(err)}
            continue
        rank = {m: i + 1 for i, m in enumerate(sub.names)}
        sp = dict(sub.models.select("model", "s_pref").iter_rows())
        common = [m for m in result.names if full_sp[m] is not None and sp.get(m) is not None]
        rho = (
            float(stats.spearmanr([full_sp[m] for m in common], [sp[m] for m in common])[0])
            if len(common) > 2
            else math.nan
        )
        moved = {m: rank[m] - full_rank[m] for m in result.names if rank[m] != full_rank[m]}
        out[bench] = {
            "ranking": sub.names,
            "rank_spearman": None if math.isnan(rho) else round(rho, 6),
            "rank_changes": moved,
            "max_rank_shift": max((abs(v) for v in moved.values()), default=0),
            "pairs": sub.pairs,
            "pairs_changed": [k for k in PAIR_STRATEGIES if sub.pairs[k] != result.pairs[k]],
        }
    return out


def sensitivity_metrics(loo: dict[str, Any]) -> dict[str, Any]:
    """Flat ``loo.*`` metrics of :func:`leave_one_out`."""
    out: dict[str, Any] = {}
    changing = 0
    for bench, entry in loo.items():
        if "error" in entry:
            out[f"loo.{bench}.pairs_changed"] = None
            continue
        out[f"loo.{bench}.rank_spearman"] = entry["rank_spearman"]
        out[f"loo.{bench}.max_rank_shift"] = entry["max_rank_shift"]
        out[f"loo.{bench}.pairs_changed"] = len(entry["pairs_changed"])
        changing += bool(entry["pairs_changed"])
    rhos = [e["rank_spearman"] for e in loo.values() if e.get("rank_spearman") is not None]
    out["loo.min_rank_spearman"] = min(rhos) if rhos else None
    out["loo.benchmarks_changing_pairs"] = changing
    return out


def cluster_report(result: KinshipResult, cfg: Any) -> dict[str, Any]:
    """The dendrograms' clusters (all benchmarks, then each capability group)."""
    from karma.kinship.clusters import clusters, group_columns

    x = result.models.select(result.benchmarks).to_numpy().astype(np.float64)
    return {
        group: clusters(
            x[:, cols],
            result.names,
            distance=cfg.cluster_distance,
            linkage=cfg.cluster_linkage,
            threshold=cfg.cluster_threshold,
        )
        for group, cols in group_columns(result, cfg.groups).items()
    }


@dataclass(frozen=True, kw_only=True)
class KinshipPaths:
    """Paths of the ``kinship`` stage."""

    scores: Path = input_path("benchmark table: CSV/TSV/Parquet/JSON, wide or long")
    protocols: Path | None = input_path(
        "the protocol of each row ({model: protocol}, the scores stage's)", required=False
    )
    out: Path = output_path(
        "models.parquet, kinship.parquet, pairs.json, sensitivity.json, clusters.json",
        is_dir=True,
    )
    plots: Path | None = output_path(
        "figures: heatmap, PCA, dendrograms", is_dir=True, required=False
    )
    metrics: Path | None = output_path("flat metrics", ".json", required=False)


def run_kinship(params: Params, paths: KinshipPaths) -> dict[str, Any]:
    """Stage ``kinship``: score table -> S_pref, kinship, global kin pairs, figures, metrics."""
    from karma.kinship.scores import read_scores

    cfg = params.similarity
    scores = read_scores(paths.scores)
    settings = {
        "similarity": cfg.metric,
        "tau": cfg.tau,
        "min_common": cfg.min_common,
        "dense_max_models": cfg.dense_max_models,
        "top_k": cfg.top_k,
    }
    result = compute_kinship(scores, **settings)
    write_kinship(result, paths.out)
    loo = leave_one_out(scores, result, **settings)
    (Path(paths.out) / "sensitivity.json").write_text(dumps_json(loo))
    groups = cluster_report(result, cfg) if result.matrix is not None else {}
    (Path(paths.out) / "clusters.json").write_text(dumps_json(groups))
    if paths.plots is not None:
        from karma.kinship.figures import kinship_figures

        kinship_figures(
            result, paths.plots, groups=cfg.groups, threshold=cfg.cluster_threshold,
            distance=cfg.cluster_distance, linkage=cfg.cluster_linkage,
            quadrant=cfg.pca_quadrant,
        )  # fmt: skip
    protocols = read_json(paths.protocols) if paths.protocols is not None else None
    metrics = kinship_metrics(result, protocols)
    metrics.update(sensitivity_metrics(loo))
    for group, info in groups.items():
        metrics[f"clusters.{group}.n"] = info["n_clusters"]
        metrics[f"clusters.{group}.cophenetic"] = info["cophenetic"]
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    log.info("%s", summary(result, top=5))
    return metrics


STAGE = Stage(
    name="kinship",
    settings=("similarity",),
    paths=KinshipPaths,
    run=run_kinship,
    help="Min-max normalise each benchmark, S_pref = mean normalised score, kinship = cosine "
    "(or pearson, euclidean) of the normalised vectors; global kin pairs by strategy.",
    exit_fast=True,
)
