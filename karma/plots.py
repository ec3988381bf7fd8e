"""Figures as PNG files (matplotlib, Agg backend, deterministic bytes: no timestamps/versions).

A module of functions; each takes data (frames, arrays) and an output path and returns the path.
Kinship figures: :func:`kinship_heatmap`, :func:`pca_scatter` (the KARMA paper's Figure 4),
:func:`dendrogram` (its Figure 7) and :func:`kinship_figures`, which draws all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from karma.kinship import KinshipResult

log = logging.getLogger(__name__)

#: above this many models, figures drop per-model labels (heatmap, dendrograms are skipped)
MAX_LABELLED_MODELS = 120
_DPI = 150
_PAIR_STYLE = {
    "score": ("#d62728", "-"),
    "sim": ("#1f77b4", "--"),
    "score_sim": ("#2ca02c", ":"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"svg.hashsalt": "karma", "font.size": 9, "axes.titlesize": 11, "figure.dpi": _DPI}
    )
    return plt


def save_figure(fig: Figure, path: str | os.PathLike[str], *, tight: bool = True) -> Path:
    """Save ``fig`` as PNG with fixed metadata (byte-identical across runs)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None}, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


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


def kinship_heatmap(
    matrix: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    metric: str = "cosine",
    tau: float | None = None,
) -> Path:
    """Kinship matrix as a heatmap, models ordered by hierarchical clustering of 1 - kinship."""
    plt = _pyplot()
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
    plt = _pyplot()
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
            color, style = _PAIR_STYLE.get(key, ("black", "-"))
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
        _place_labels(fig, ax, coords[:, :2], names)
    return save_figure(fig, path)


_LABEL_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (5, 13), (-5, 13), (5, -20), (-5, -20)]


def _place_labels(fig: Figure, ax: Any, xy: np.ndarray, names: Sequence[str]) -> None:
    """Annotate points, trying a few offsets per label so that labels do not overlap."""
    fig.canvas.draw()  # settle limits and layout first, so that text extents are real
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for i in np.lexsort((xy[:, 0], -xy[:, 1])):  # top to bottom, deterministic
        for k, (dx, dy) in enumerate(_LABEL_OFFSETS):
            text = ax.annotate(
                names[i], xy[i], xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                ha="left" if dx > 0 else "right",
            )  # fmt: skip
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if k == len(_LABEL_OFFSETS) - 1 or not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            text.remove()


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
            from karma.kinship import pairwise_similarity

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
    plt = _pyplot()
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


def tau_sweep_plot(
    table: Any, path: str | os.PathLike[str], *, title: str, tau: float | None = None
) -> Path:
    """The tau sweep (:func:`karma.preferences.sweep_table`): per KARMA strategy, the share of
    instructions whose pair tau changed / dropped, and the mean kinship / |S_pref gap| of the
    pairs used against the whole candidate pool (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [
        ("changed_by_tau", "share of instructions whose pair changed\n(vs no threshold)", None),
        ("dropped_by_tau", "share of instructions dropped by tau\n(no kin pair)", None),
        ("mean_kinship", "mean kinship of the pairs used", "pool_mean_kinship"),
        ("mean_abs_s_pref_gap", "mean |S_pref gap| of the pairs used",
         "pool_mean_abs_s_pref_gap"),
    ]  # fmt: skip
    strategies = list(dict.fromkeys(table["strategy"].to_list()))
    for ax, (col, label, pool_col) in zip(axes.flat, panels, strict=True):
        for s in strategies:
            rows = table.filter(table["strategy"] == s)
            color, style = _PAIR_STYLE.get(s, ("black", "-"))
            ax.plot(rows["tau"].to_numpy(), rows[col].cast(float).to_numpy(), color=color,
                    ls=style, lw=1.8, label=s, marker=".", ms=4)  # fmt: skip
        if pool_col is not None and table.height:
            ax.axhline(float(table[pool_col][0]), color="black", ls="--", lw=1,
                       label="every candidate pair")  # fmt: skip
        if tau is not None:
            ax.axvline(tau, color="#888888", ls=":", lw=1)
            ax.text(tau, 1.0, f" tau={tau:g}", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=7.5, color="#555555")  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("tau (two models are kin when kinship >= tau)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[1, 0].legend(loc="best", fontsize=8)
    rho = table["pool_spearman_kinship_gap"][0] if table.height else None
    fig.suptitle(f"{title}\nSpearman(kinship, |S_pref gap|) over the pool: "
                 f"{'n/a' if rho is None else f'{rho:.3f}'}")  # fmt: skip
    return save_figure(fig, path)


def pair_usage_heatmap(
    pairs: Mapping[tuple[str, str], int],
    path: str | os.PathLike[str],
    *,
    order: Sequence[str] | None = None,
    title: str = "Model pairs used",
) -> Path:
    """Heatmap of how often each (chosen model, rejected model) pair was used (preferences):
    ``pairs`` maps the pair to its count.

    ``order``: model order of both axes (e.g. by S_pref); models not in it are appended sorted.
    """
    plt = _pyplot()
    seen = sorted({m for pair in pairs for m in pair})
    names = list(dict.fromkeys(order or []))  # every ordered model, so strategies compare
    names += [m for m in seen if m not in set(names)]
    index = {m: i for i, m in enumerate(names)}
    n = max(len(names), 1)
    counts = np.zeros((n, n), dtype=np.int64)
    for (c, r), k in pairs.items():
        counts[index[c], index[r]] += k
    total = int(counts.sum())
    size = min(4.0 + 0.38 * n, 30.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = np.ma.masked_where(counts == 0, counts)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#f4f4f4")
    im = ax.imshow(
        shown, cmap=cmap, vmin=0, vmax=max(int(counts.max()), 1), interpolation="nearest"
    )
    if len(names) <= MAX_LABELLED_MODELS:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(names)), names)
    if len(names) <= 24:
        top = max(int(counts.max()), 1)
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    txt = "white" if counts[i, j] > 0.6 * top else "black"
                    ax.text(
                        j, i, str(counts[i, j]), ha="center", va="center", fontsize=6.5, color=txt
                    )
    ax.set_xlabel("rejected model")
    ax.set_ylabel("chosen model")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("pairs")
    ax.set_title(f"{title} ({total} pairs)")
    return save_figure(fig, path)


def margins_scatter(
    scored: Any,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    explicit_label: str = "explicit margin",
) -> Path:
    """Explicit vs implicit margin of every pair (MAP's select stage), kept pairs highlighted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    e, i = scored["margin_explicit"], scored["margin_implicit"]
    if scored.height and e.null_count() == 0 and i.null_count() == 0:
        kept = scored["kept"].to_numpy().astype(bool)
        x, y = e.to_numpy(), i.to_numpy()
        ax.scatter(x[~kept], y[~kept], s=14, c="#b0b0b0", label=f"dropped ({int((~kept).sum())})")
        ax.scatter(x[kept], y[kept], s=18, c="#d62728", label=f"kept ({int(kept.sum())})")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no implicit margins (select.method: none)", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel(explicit_label)
    ax.set_ylabel("implicit margin (mean logp chosen - rejected)")
    ax.set_title(title or "MAP selection", fontsize=10)
    return save_figure(fig, path, tight=False)
