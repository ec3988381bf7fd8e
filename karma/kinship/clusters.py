"""Hierarchical clustering of models by their benchmark profiles (kinship's dendrograms)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from karma.kinship.result import KinshipResult

log = logging.getLogger(__name__)


def _fill_distance(dist: np.ndarray) -> np.ndarray:
    """Symmetric distance matrix with undefined entries set to the largest defined distance."""
    d = np.array(dist, dtype=np.float64)
    finite = np.isfinite(d)
    fill = float(d[finite].max()) if finite.any() else 1.0
    d[~finite] = fill
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def cluster_order(dist: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering (optimal leaf ordering) of a distance matrix."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    n = dist.shape[0]
    if n < 3:
        return np.arange(n)
    condensed = squareform(_fill_distance(dist), checks=False)
    link = linkage(condensed, method="average")
    return leaves_list(optimal_leaf_ordering(link, condensed))


def rms_distance(x: np.ndarray) -> np.ndarray:
    """Root-mean-square distance between rows over their common (non-NaN) columns (NaN if none)."""
    return _distance(x, "rms")


DISTANCE_LABELS = {
    "rms": "RMS distance of normalised scores",
    "euclidean": "Euclidean distance of normalised scores",
    "cityblock": "city-block distance of normalised scores",
    "cosine": "cosine distance (1 - kinship) of normalised scores",
    "correlation": "correlation distance (1 - r) of normalised scores",
}


def _distance(x: np.ndarray, distance: str) -> np.ndarray:
    """Pairwise distance of rows over their common (non-NaN) columns (NaN if undefined)."""
    x = np.asarray(x, dtype=np.float64)
    present = ~np.isnan(x)
    x0 = np.where(present, x, 0.0)
    m = present.astype(np.float64)
    count = m @ m.T
    with np.errstate(divide="ignore", invalid="ignore"):
        if distance in ("rms", "euclidean"):
            sq = (x0**2) @ m.T
            d2 = np.maximum(sq + sq.T - 2.0 * (x0 @ x0.T), 0.0)
            out = np.sqrt(d2 / count) if distance == "rms" else np.sqrt(d2)
        elif distance == "cityblock":
            out = np.abs(x0[:, None, :] - x0[None, :, :]) * (m[:, None, :] * m[None, :, :])
            out = out.sum(axis=-1)
        elif distance in ("cosine", "correlation"):
            from karma.kinship.similarity import pairwise_similarity

            metric = "cosine" if distance == "cosine" else "pearson"
            out = 1.0 - pairwise_similarity(x, metric, min_common=1, backend="numpy")
        else:
            raise ValueError(f"unknown distance {distance!r}")
    out[count == 0] = np.nan
    np.fill_diagonal(out, 0.0)
    return out


def cluster_tree(
    normalised: np.ndarray, *, distance: str = "rms", linkage: str = "average"
) -> tuple[np.ndarray, np.ndarray]:
    """``(linkage matrix, condensed distances)`` of the models (optimal leaf ordering)."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.cluster.hierarchy import optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    condensed = squareform(_fill_distance(_distance(normalised, distance)), checks=False)
    link = scipy_linkage(condensed, method=linkage)
    return optimal_leaf_ordering(link, condensed), condensed


def clusters(
    normalised: np.ndarray,
    names: Sequence[str],
    *,
    distance: str = "rms",
    linkage: str = "average",
    threshold: float = 0.4,
) -> dict[str, Any]:
    """The dendrogram's clusters at ``threshold`` and how faithful the tree is.

    ``cophenetic``: correlation of the tree's (cophenetic) distances with the distances it was
    built from; ``members``: model -> cluster number, clusters numbered by their leftmost leaf.
    """
    from scipy.cluster.hierarchy import cophenet, fcluster, leaves_list

    n = len(names)
    if n < 2:
        return {"distance": distance, "linkage": linkage, "threshold": threshold,
                "cophenetic": None, "n_clusters": n, "members": {m: 1 for m in names}}  # fmt: skip
    link, condensed = cluster_tree(normalised, distance=distance, linkage=linkage)
    coph = float(cophenet(link, condensed)[0]) if n > 2 else None
    labels = fcluster(link, t=threshold, criterion="distance")
    renumber: dict[int, int] = {}
    for leaf in leaves_list(link):
        renumber.setdefault(int(labels[leaf]), len(renumber) + 1)
    return {
        "distance": distance,
        "linkage": linkage,
        "threshold": threshold,
        "cophenetic": None if coph is None or not np.isfinite(coph) else round(coph, 6),
        "n_clusters": len(renumber),
        "members": {m: renumber[int(labels[i])] for i, m in enumerate(names)},
    }


def group_columns(result: KinshipResult, groups: dict[str, list[str]] | None) -> dict[str, Any]:
    """``{"all": all benchmark columns, <group>: its columns present in the table}``."""
    out = {"all": list(range(len(result.benchmarks)))}
    for group, members in (groups or {}).items():
        cols = [result.benchmarks.index(b) for b in members if b in result.benchmarks]
        missing = [b for b in members if b not in result.benchmarks]
        if missing:
            log.warning("group %r: benchmark(s) %s not in the table", group, ", ".join(missing))
        if cols:
            out[group] = cols
    return out
