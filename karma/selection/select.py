"""MAP: select preference pairs by alignment potential (Huang et al., ICML 2025, arXiv 2503.01864).

A pair is most useful when the annotation says chosen is much better (large *explicit* margin) and
the model does not yet separate the two responses (small *implicit* margin)::

    map = z(explicit margin) - w * z(|implicit margin|)

The top ``ratio`` of pairs by the method's score are kept.

Matched against the authors' code (Hesse73/Alignment-Potential-Metric):

* ``metric_selection.py::get_top_score_idx``: z-scores use the population std (``np.std``, ddof=0)
  over the whole dataset; ``rm-xlogp`` = ``z(rm_margin) - logp_weight * z(logp_margin_norm_abs)``
  (our ``map`` with ``w``, ``select.weight``); ``rm_margin`` ranks by ``z(rm_margin)`` (our
  ``explicit``);
  ``logp_margin_norm_abs`` ranks by ``-z(|logp margin|)`` ("negative logp margin is better",
  our ``implicit``); ``rand`` is a seeded random choice (our ``random``); the number kept is
  ``int(select_ratio * len(ds))`` (floor) and the top-k are the k largest scores.
* ``cal_logps.py::cal_logp`` and ``infer_scripts/infer_dataset.py::logp_margin``: the implicit
  margin is ``chosen_logps_norm - rejected_logps_norm`` where ``*_norm`` is the *mean* log-prob of
  the response tokens given the chat-templated prompt (SimPO-style, no reference model).

Deliberate differences: ties are broken by row order (earlier row first) instead of
``np.argsort``'s unspecified order; a margin with zero spread gets z = 0 (the authors' code gives
NaN); the response starts after the prompt rendered *with* the generation prompt, so the
assistant header is context, not scored (``cal_logp`` scores it as part of the response).

Example::

    >>> import polars as pl
    >>> from karma.selection.select import top_k, zscore
    >>> zscore([1.0, 2.0, 3.0]).round(4).tolist()
    [-1.2247, 0.0, 1.2247]
    >>> rank, kept = top_k([0.5, 2.0, 0.5, -1.0], ratio=0.5)
    >>> rank.tolist(), kept.tolist()
    ([2, 1, 3, 4], [True, True, False, False])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from karma.core.errors import KarmaError
from karma.core.stage import Stage, input_path, output_path
from karma.selection.settings import SelectConfig

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("none", "map", "explicit", "implicit", "random")
EXPLICIT_SOURCES: tuple[str, ...] = ("s_pref_gap", "rating_gap")

#: Columns appended to the preference schema, in order.
SCORE_COLUMNS: dict[str, Any] = {
    "margin_explicit": pl.Float64,
    "logp_chosen": pl.Float64,
    "logp_rejected": pl.Float64,
    "n_tokens_chosen": pl.Int64,
    "n_tokens_rejected": pl.Int64,
    "margin_implicit": pl.Float64,
    "z_explicit": pl.Float64,
    "z_implicit_abs": pl.Float64,
    "map_score": pl.Float64,
    "score": pl.Float64,
    "rank": pl.Int64,
    "kept": pl.Boolean,
}


# --------------------------------------------------------------------------- scores (numpy)


def zscore(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with the population std (ddof=0), as the authors' code.

    A constant column carries no ranking information and gets z = 0 everywhere; "constant"
    includes a spread at float-noise level (std <= 1e-12 * max(1, |mean|)), which would otherwise
    blow noise up to unit scale.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    if not np.all(np.isfinite(x)):
        raise KarmaError("cannot z-score non-finite margins", value=int(np.sum(~np.isfinite(x))))
    std = float(x.std())
    if not math.isfinite(std) or std <= 1e-12 * max(1.0, abs(float(x.mean()))):
        return np.zeros_like(x)
    return (x - x.mean()) / std


def n_keep(n: int, ratio: float) -> int:
    """Pairs kept: ``floor(ratio * n)`` (the authors' ``int(select_ratio * len(ds))``).

    A tiny epsilon absorbs binary-float noise (``0.29 * 100 = 28.999999999999996`` keeps 29).
    Raises :class:`KarmaError` when that keeps no pair.
    """
    if not 0.0 < ratio <= 1.0:
        raise KarmaError("out of range", field="ratio", value=ratio, expected="0 < ratio <= 1")
    k = min(n, math.floor(ratio * n + 1e-9))
    if k < 1:
        need = f"ratio >= 1/{n} = {1 / n:.4g}" if n else "a non-empty preference dataset"
        raise KarmaError(
            f"keeps zero of {n} pairs", field="select.ratio", value=ratio, expected=need
        )
    return k


def top_k(scores: Sequence[float] | np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank by score, highest first (1-based); ties go to the earlier row. Keep the top ``ratio``.

    Returns ``(rank, kept)`` aligned with ``scores``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size and not np.all(np.isfinite(s)):
        raise KarmaError("cannot rank non-finite scores", value=int(np.sum(~np.isfinite(s))))
    k = n_keep(s.size, ratio)
    order = np.lexsort((np.arange(s.size), -s))  # primary: score desc; secondary: row asc
    rank = np.empty(s.size, dtype=np.int64)
    rank[order] = np.arange(1, s.size + 1)
    return rank, rank <= k


def method_scores(
    method: str,
    explicit: np.ndarray | None,
    implicit: np.ndarray | None,
    *,
    weight: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Z-scores, the MAP score and the ranking ``score`` of ``method`` (not for ``none``).

    ``implicit`` is the signed implicit margin; its absolute value is z-scored.
    """
    if method not in METHODS or method == "none":
        raise KarmaError(
            "no ranking score",
            field="method",
            value=method,
            expected="map | explicit | implicit | random",
        )
    out: dict[str, np.ndarray] = {}
    if explicit is not None:
        out["z_explicit"] = zscore(explicit)
    if implicit is not None:
        out["z_implicit_abs"] = zscore(np.abs(np.asarray(implicit, dtype=np.float64)))
    if "z_explicit" in out and "z_implicit_abs" in out:
        out["map_score"] = out["z_explicit"] - weight * out["z_implicit_abs"]
    need = {"map": "map_score", "explicit": "z_explicit", "implicit": "z_implicit_abs"}
    if method in need and need[method] not in out:
        raise KarmaError(f"method {method!r} needs margins that were not computed", field="method")
    if method == "map":
        out["score"] = out["map_score"].copy()
    elif method == "explicit":
        out["score"] = out["z_explicit"].copy()
    elif method == "implicit":
        out["score"] = -out["z_implicit_abs"]
    else:  # random
        n = len(explicit) if explicit is not None else len(implicit)  # type: ignore[arg-type]
        out["score"] = np.random.default_rng(seed).random(n)
    return out


# --------------------------------------------------------------------------- explicit margins


def explicit_margins(
    pairs: pl.DataFrame, source: str, *, file: object = "pairs", required: bool = True
) -> np.ndarray | None:
    """Explicit margin per pair: ``s_pref_chosen - s_pref_rejected`` or the rating gap.

    Rounded to 12 decimals so gaps that are equal on paper (0.3 - 0.1 vs 0.4 - 0.2) tie exactly
    and their order is decided by the row-order tie-break, not by float noise.
    With ``required=False`` a missing source gives ``None`` instead of an error.
    """
    cols = {
        "s_pref_gap": ("s_pref_chosen", "s_pref_rejected"),
        "rating_gap": ("chosen_rating", "rejected_rating"),
    }
    hint = (
        "instance ratings (an UltraFeedback-style dataset with ratings), or select.explicit: "
        "s_pref_gap"
        if source == "rating_gap"
        else "the preferences stage's S_pref columns"
    )
    for col in cols[source]:
        if col not in pairs.columns:
            if not required:
                return None
            raise KarmaError(f"column missing; {source} needs {hint}", file=file, field=col)
        nulls = pairs[col].null_count()
        if nulls:
            if not required:
                return None
            raise KarmaError(
                f"{nulls} of {pairs.height} pairs have no value; {source} needs {hint}",
                file=file,
                field=col,
            )
    a, b = cols[source]
    try:
        gap = (pairs[a].cast(pl.Float64) - pairs[b].cast(pl.Float64)).to_numpy()
    except pl.exceptions.PolarsError as err:
        raise KarmaError(f"not numeric: {err}", file=file, field=a) from None
    return np.ascontiguousarray(np.round(gap, 12), dtype=np.float64)


# --------------------------------------------------------------------------- implicit margins


# --------------------------------------------------------------------------- selection


def select(
    pairs: pl.DataFrame,
    config: SelectConfig,
    *,
    seed: int = 0,
    implicit: pl.DataFrame | None = None,
    file: object = "pairs",
) -> pl.DataFrame:
    """Every pair with its margins, z-scores, scores, ``rank`` (1 = best) and ``kept`` flag.

    ``implicit`` is :func:`implicit_margins`' frame (row-aligned with ``pairs``); required unless
    ``config.method == "none"``, which keeps every pair in input order.
    """
    n = pairs.height
    clash = [c for c in SCORE_COLUMNS if c in pairs.columns]
    if clash:
        raise KarmaError("already has score columns", file=file, field=clash[0])
    cols: dict[str, Any] = {c: None for c in SCORE_COLUMNS}
    if config.method == "none":
        cols["margin_explicit"] = explicit_margins(
            pairs, config.explicit, file=file, required=False
        )
        cols["rank"] = np.arange(1, n + 1, dtype=np.int64)
        cols["kept"] = np.ones(n, dtype=bool)
    else:
        explicit = explicit_margins(pairs, config.explicit, file=file)
        if implicit is None or implicit.height != n:
            raise KarmaError(
                f"method {config.method!r} needs implicit margins for all {n} pairs",
                field="implicit",
            )
        imp = implicit["margin_implicit"].to_numpy()
        scores = method_scores(config.method, explicit, imp, weight=config.weight, seed=seed)
        rank, kept = top_k(scores["score"], config.ratio)
        cols.update(scores)
        cols.update({c: implicit[c] for c in implicit.columns if c in SCORE_COLUMNS})
        cols["margin_explicit"] = explicit
        cols["rank"] = rank
        cols["kept"] = kept
    extra = pl.DataFrame(
        [
            pl.Series(c, cols[c] if cols[c] is not None else [None] * n, dtype=t)
            for c, t in SCORE_COLUMNS.items()
        ]
    )
    return pl.concat([pairs, extra], how="horizontal")


def _mean(x: np.ndarray) -> float | None:
    return round(float(np.mean(x)), 6) if x.size else None


def selection_metrics(scored: pl.DataFrame) -> dict[str, Any]:
    """Flat metrics: counts, mean margins of kept vs dropped, explicit-implicit correlations."""
    from scipy import stats

    kept = scored["kept"].to_numpy().astype(bool)
    out: dict[str, Any] = {
        "pairs_in": scored.height,
        "pairs_kept": int(kept.sum()),
        "kept_fraction": round(float(kept.mean()), 6) if scored.height else None,
    }
    series = {
        "explicit_margin": scored["margin_explicit"],
        "implicit_margin": scored["margin_implicit"],
        "implicit_abs": scored["margin_implicit"].abs(),
        "map_score": scored["map_score"],
    }
    for name, s in series.items():
        ok = s.null_count() == 0
        v = s.to_numpy().astype(np.float64) if ok else None
        out[f"{name}_mean_kept"] = _mean(v[kept]) if ok else None
        out[f"{name}_mean_dropped"] = _mean(v[~kept]) if ok else None
    e, i = scored["margin_explicit"], scored["margin_implicit"]
    pearson = spearman = None
    if scored.height >= 2 and e.null_count() == 0 and i.null_count() == 0:
        x, y = e.to_numpy().astype(np.float64), i.to_numpy().astype(np.float64)
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            pearson = round(float(stats.pearsonr(x, y).statistic), 6)
            spearman = round(float(stats.spearmanr(x, y).statistic), 6)
    out["pearson_explicit_implicit"] = pearson
    out["spearman_explicit_implicit"] = spearman
    return out


def read_pairs(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read the preference parquet (TRL or H4 layout) as TRL's, checking the columns."""
    from karma.core.io import check_record_bytes, read_parquet

    p = Path(path)
    if not p.is_file():
        raise KarmaError(
            "preference pairs not found", file=p, expected="the preferences stage's output"
        )
    from karma.pairing.layouts import to_trl

    pairs = to_trl(read_parquet(p, "parquet file"))  # either layout (TRL's or H4's)
    for col in ("prompt", "chosen", "rejected"):
        if col not in pairs.columns:
            raise KarmaError(
                "column missing",
                file=p,
                field=col,
                expected="TRL conversational preference format (prompt, chosen, rejected)",
            )
    check_record_bytes(pairs.select("prompt", "chosen", "rejected"), p, "pair")
    return pairs


def check_form(form: str, reference: object) -> None:
    """The DPO form needs ``--reference``; the reference-free form must not get one."""
    if form == "dpo" and reference is None:
        raise KarmaError("the DPO-form implicit margin needs a reference model",
                         field="select.implicit_form", value=form,
                         expected="--reference MODEL_DIR, or implicit_form logp_mean")  # fmt: skip
    if form == "logp_mean" and reference is not None:
        raise KarmaError("a reference model is used only by select.implicit_form dpo",
                         field="--reference", value=str(reference),
                         expected="no --reference, or -S select.implicit_form=dpo")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SelectPaths:
    """Paths of the ``select`` stage."""

    pairs: Path = input_path("preference pairs (the preferences stage's train_prefs.parquet)")
    model: Path = input_path("model that scores implicit margins (the policy with --reference)",
                             is_dir=True)  # fmt: skip
    reference: Path | None = input_path(
        "reference model: implicit margin in DPO form dpo_beta*log(pi/pi_ref)",
        is_dir=True,
        required=False,
    )
    out: Path = output_path("pairs.parquet (kept rows) + scores.parquet (all rows)", is_dir=True)
    metrics: Path | None = output_path("flat metrics", ".json", required=False)
    plot: Path | None = output_path("explicit vs implicit margin scatter", ".png", required=False)


def run_select(params: Params, paths: SelectPaths) -> dict[str, Any]:
    """Stage ``select``: score, rank and keep pairs; write kept and scored pairs, metrics, plot."""
    from karma.core.io import write_json

    config = params.select
    pairs = read_pairs(paths.pairs)
    if pairs.height == 0:
        raise KarmaError("no preference pairs", file=paths.pairs, expected="at least one pair")
    implicit = None
    if config.method != "none":
        from karma.selection.margins import implicit_margins

        explicit_margins(pairs, config.explicit, file=paths.pairs)  # fail fast, before the model
        n_keep(pairs.height, config.ratio)
        check_form(config.implicit_form, paths.reference)
        implicit = implicit_margins(
            pairs,
            paths.model,
            reference_dir=paths.reference if config.implicit_form == "dpo" else None,
            dpo_beta=config.dpo_beta,
            config=config,
            file=paths.pairs,
        )
    scored = select(pairs, config, seed=params.seed, implicit=implicit, file=paths.pairs)
    metrics = selection_metrics(scored)
    out = Path(paths.out)
    out.mkdir(parents=True, exist_ok=True)
    scored.filter(pl.col("kept")).write_parquet(out / "pairs.parquet")
    scored.write_parquet(out / "scores.parquet")
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    if paths.plot is not None:
        from karma.selection.figures import margins_scatter

        title = f"select.method={config.method} ratio={config.ratio} weight={config.weight}"
        margins_scatter(scored, paths.plot, title=title,
                        explicit_label=f"explicit margin ({config.explicit})")  # fmt: skip
    log.info("select: kept %d of %d pairs (%s)", metrics["pairs_kept"], pairs.height, config.method)
    return metrics


STAGE = Stage(
    name="select",
    settings=("select", "seed"),
    paths=SelectPaths,
    run=run_select,
    help="Rank pairs by map = z(explicit margin) - w * z(|implicit margin|) (or one of the "
    "margins, or at random) and keep the top ratio; method none keeps every pair.",
)
