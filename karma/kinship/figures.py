"""The kinship stage's figures: heatmap, PCA scatter and loadings, dendrograms."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from karma.kinship.result import KinshipResult


from karma.core.plotting import MAX_LABELLED_MODELS, PAIR_STYLE, pyplot, save_figure
from karma.kinship.clusters import (
    DISTANCE_LABELS,
    cluster_order,
    cluster_tree,
    clusters,
    group_columns,
)

log = logging.getLogger(__name__)


def kinship_heatmap(
    matrix: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    metric: str = "cosine",
    tau: float | None = None,
) -> Path:
    """Kinship matrix as a heatmap, models ordered by hierarchical clustering of 1 - kinship."""
    plt = pyplot()
    n = len(names)
    order = cluster_order(1.0 - matrix)
    mat = matrix[np.ix_(order, order)]
    labels = [names[i] for i in order]
    size = min(4.0 + 0.38 * n, 30.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = np.ma.masked_invalid(mat)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    lo = 0.0 if np.nanmin(mat) >= 0 else -1.0
    im = ax.imshow(shown, cmap=cmap, vmin=lo, vmax=1.0, interpolation="nearest")
    if n <= MAX_LABELLED_MODELS:
        ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= 24:
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                if np.isfinite(v):
                    txt = "white" if v < lo + 0.6 * (1.0 - lo) else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color=txt)
    if tau is not None and n <= MAX_LABELLED_MODELS:
        # outline pairs that are NOT kin (kinship < tau): they are never paired
        for i in range(n):
            for j in range(n):
                if i != j and np.isfinite(mat[i, j]) and mat[i, j] < tau:
                    ax.add_patch(
                        plt.Rectangle(
                            (j - 0.46, i - 0.46), 0.92, 0.92, fill=False, ec="red", lw=1.8
                        )
                    )
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(f"kinship ({metric})")
    title = f"Kinship of {n} origin models ({metric}), clustered order"
    if tau is not None:
        title += f"\nred outline: not kin (kinship < tau = {tau:g}); grey: undefined"
    ax.set_title(title)
    return save_figure(fig, path)


#: Target signs (PC1, PC2) of the highest-S_pref model per quadrant of the PCA plane.
QUADRANT_SIGNS = {1: (1.0, 1.0), 2: (-1.0, 1.0), 3: (-1.0, -1.0), 4: (1.0, -1.0)}


def pca(
    normalised: np.ndarray, s_pref: np.ndarray, *, quadrant: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of the normalised scores: ``(coords (n, 2), loadings (2, B),
    explained variance ratio (2,))``.

    Missing scores are imputed with the benchmark mean. SVD signs are arbitrary; here each
    component's sign puts the highest-S_pref model (the first after it with a non-zero
    coordinate) in ``quadrant`` (the KARMA paper's Figure 4 shows the strongest models in II).
    """
    x = np.array(normalised, dtype=np.float64)
    col_mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), col_mean[None, :], x)
    x = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = u * s
    if coords.shape[1] < 2:
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
        vt = np.vstack([vt, np.zeros_like(vt)])
        s = np.append(s, 0.0)
    coords, vt = coords[:, :2].copy(), vt[:2].copy()
    order = np.lexsort((np.arange(len(s_pref)), -np.nan_to_num(s_pref, nan=-np.inf)))
    for k, target in enumerate(QUADRANT_SIGNS[quadrant]):
        nonzero = [i for i in order if abs(coords[i, k]) > 1e-12]
        if nonzero and np.sign(coords[nonzero[0], k]) != target:
            coords[:, k] *= -1.0
            vt[k] *= -1.0
    var = s**2 / max(float((s**2).sum()), 1e-300)
    return coords, vt, var[:2]


def write_loadings(
    loadings: np.ndarray, var: np.ndarray, benchmarks: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """The PCA loadings as CSV: one row per component (explained variance, then one column
    per benchmark), in the signs of the plot."""
    path = Path(path)
    head = ",".join(["component", "explained_variance", *benchmarks])
    rows = [
        ",".join([f"PC{k + 1}", f"{var[k]:.6f}", *(f"{v:.6f}" for v in loadings[k])])
        for k in range(loadings.shape[0])
    ]
    path.write_text("\n".join([head, *rows]) + "\n")
    return path


def pca_scatter(
    normalised: np.ndarray,
    names: Sequence[str],
    s_pref: np.ndarray,
    path: str | os.PathLike[str],
    *,
    pairs: dict[str, list[str]] | None = None,
    benchmarks: Sequence[str] | None = None,
    quadrant: int = 2,
) -> Path:
    """Models in the plane of the first two principal components of their normalised scores
    (signs by :func:`pca`); colour = S_pref; lines = global kin pairs; the loadings of the
    ``benchmarks`` (when given) in a table under the axes."""
    plt = pyplot()
    coords, loadings, var = pca(normalised, s_pref, quadrant=quadrant)
    n = len(names)
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    ax.axhline(0.0, color="#999999", lw=0.8, zorder=1)
    ax.axvline(0.0, color="#999999", lw=0.8, zorder=1)
    sc = ax.scatter(
        coords[:, 0], coords[:, 1], c=s_pref, cmap="plasma", s=60 if n <= 200 else 8,
        edgecolors="black", linewidths=0.5, zorder=3,
    )  # fmt: skip
    if benchmarks is not None:  # the loadings, as a small table under the axes
        width = max(len(b) for b in benchmarks)
        rows = [f"{'loadings':<{width}}    PC1    PC2"]
        rows += [f"{b:<{width}} {lx:+.3f} {ly:+.3f}" for b, (lx, ly) in
                 zip(benchmarks, loadings.T, strict=True)]  # fmt: skip
        ax.text(1.0, -0.1, "\n".join(rows), transform=ax.transAxes, ha="right", va="top",
                family="monospace", fontsize=7.5, color="#444444")  # fmt: skip
    index = {name: i for i, name in enumerate(names)}
    for key, pair in (pairs or {}).items():
        if all(p in index for p in pair):
            i, j = index[pair[0]], index[pair[1]]
            color, style = PAIR_STYLE.get(key, ("black", "-"))
            ax.plot(
                coords[[i, j], 0], coords[[i, j], 1], color=color, ls=style, lw=2,
                label=f"{key}: {pair[0]} > {pair[1]}", zorder=2,
            )  # fmt: skip
    cbar = fig.colorbar(sc, ax=ax)
    cbar.set_label("S_pref (mean normalised score)")
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}% of variance)")
    ax.set_title(
        f"PCA of {n} models' normalised benchmark scores\n(signs: the highest S_pref in "
        f"quadrant {('I', 'II', 'III', 'IV')[quadrant - 1]})"
    )
    ax.grid(True, alpha=0.3)
    if pairs:
        ax.legend(title="global kin pairs", loc="best", fontsize=7.5)
    if n <= MAX_LABELLED_MODELS:
        place_labels(fig, ax, coords[:, :2], names)
    return save_figure(fig, path)


_LABEL_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (5, 13), (-5, 13), (5, -20), (-5, -20),
                  (18, 24), (-18, 24), (18, -32), (-18, -32), (30, 6), (-30, 6), (26, 40),
                  (-26, 40), (26, -48), (-26, -48)]  # fmt: skip


def place_labels(fig: Figure, ax: Any, xy: np.ndarray, names: Sequence[str]) -> None:
    """Annotate points, trying a few offsets per label so that labels do not overlap."""
    fig.canvas.draw()  # settle limits and layout first, so that text extents are real
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for i in np.lexsort((xy[:, 0], -xy[:, 1])):  # top to bottom, deterministic
        for k, (dx, dy) in enumerate(_LABEL_OFFSETS):
            far = abs(dx) > 12 or abs(dy) > 20  # far from its point: a leader line to it
            text = ax.annotate(
                names[i], xy[i], xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                ha="left" if dx > 0 else "right",
                arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.6} if far else None,
            )  # fmt: skip
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if k == len(_LABEL_OFFSETS) - 1 or not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            text.remove()


def dendrogram(
    normalised: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str,
    threshold: float = 0.4,
    distance: str = "rms",
    linkage: str = "average",
) -> Path:
    """Dendrogram of models by ``distance`` of their normalised scores (``linkage``).

    RMS distance (euclidean / sqrt(#benchmarks)) keeps distances on the [0, 1] scale of one
    benchmark, so one ``threshold`` fits every group; clusters joined below it get a colour.
    """
    plt = pyplot()
    from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram

    n = len(names)
    link, _ = cluster_tree(normalised, distance=distance, linkage=linkage)
    info = clusters(normalised, names, distance=distance, linkage=linkage, threshold=threshold)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * n + 2.0), 5.0))
    scipy_dendrogram(
        link,
        labels=list(names),
        color_threshold=threshold,
        above_threshold_color="#888888",
        leaf_rotation=60,
        leaf_font_size=8,
        ax=ax,
    )
    for label in ax.get_xticklabels():
        label.set_ha("right")
        label.set_rotation_mode("anchor")
    ax.axhline(threshold, color="black", ls="--", lw=1)
    ax.text(
        ax.get_xlim()[1],
        threshold,
        f" threshold {threshold:g}",
        va="bottom",
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(DISTANCE_LABELS[distance])
    coph = info["cophenetic"]
    ax.set_title(
        f"{title}: {info['n_clusters']} clusters at distance {threshold:g} (grey leaf: a "
        f"singleton)\n{linkage} linkage; cophenetic correlation "
        f"{'n/a' if coph is None else f'{coph:.3f}'}"
    )
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def kinship_figures(
    result: KinshipResult,
    out_dir: str | os.PathLike[str],
    *,
    groups: dict[str, list[str]] | None = None,
    threshold: float = 0.4,
    distance: str = "rms",
    linkage: str = "average",
    quadrant: int = 2,
) -> list[Path]:
    """Draw every kinship figure of ``result`` into ``out_dir``; return the written paths.

    ``kinship_heatmap.png``, ``pca.png`` (+ ``pca_loadings.csv``), ``dendrogram_all.png`` and
    ``dendrogram_<group>.png`` for each capability group (benchmarks absent from the table are
    skipped with a warning).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = result.names
    x = result.models.select(result.benchmarks).to_numpy().astype(np.float64)
    s_pref = result.models["s_pref"].to_numpy().astype(np.float64)
    pca_png = pca_scatter(
        x, names, s_pref, out / "pca.png", pairs=result.pairs, benchmarks=result.benchmarks,
        quadrant=quadrant,
    )  # fmt: skip
    written = [pca_png]
    _, loadings, var = pca(x, s_pref, quadrant=quadrant)
    written.append(write_loadings(loadings, var, result.benchmarks, out / "pca_loadings.csv"))
    if result.matrix is None or len(names) > MAX_LABELLED_MODELS:
        log.warning(
            "%d models: skipping heatmap and dendrograms (readable up to %d models)",
            len(names),
            MAX_LABELLED_MODELS,
        )
        return written
    written.append(
        kinship_heatmap(
            result.matrix, names, out / "kinship_heatmap.png", metric=result.metric, tau=result.tau
        )
    )
    for group, cols in group_columns(result, groups).items():
        label = (
            f"All benchmarks ({len(result.benchmarks)})"
            if group == "all"
            else f"{group.replace('_', ' ').capitalize()} "
            f"({', '.join(result.benchmarks[c] for c in cols)})"
        )
        written.append(
            dendrogram(
                x[:, cols],
                names,
                out / f"dendrogram_{group}.png",
                title=label,
                threshold=threshold,
                distance=distance,
                linkage=linkage,
            )
        )
    return written
