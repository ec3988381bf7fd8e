"""karma figures (kinship, selection): the figures are real pictures, deterministic, and show what
they claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from karma.core.settings import DEFAULT_GROUPS
from karma.core.stage import execute
from karma.kinship.clusters import cluster_order, clusters, rms_distance
from karma.kinship.figures import dendrogram, kinship_figures, pca
from karma.kinship.kinship import STAGE, KinshipPaths, compute_kinship
from karma.kinship.scores import read_scores
from karma.kinship.settings import SimilarityConfig
from karma.params import Params
from karma.selection.figures import margins_scatter

REPO = Path(__file__).resolve().parents[1]
ORIGIN = REPO / "data" / "origin" / "scores.csv"


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return (img[..., :3] * 255).round().astype(np.uint8)


def _n_colours(img: np.ndarray) -> int:
    rgb = img.reshape(-1, 3).astype(np.int32)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    res = compute_kinship(read_scores(ORIGIN))
    out = tmp_path_factory.mktemp("fig")
    paths = kinship_figures(res, out, groups=DEFAULT_GROUPS, threshold=0.4)
    return {p.stem: p for p in paths if p.suffix == ".png"}


def test_all_figures_written_and_non_trivial(figures: dict[str, Path]) -> None:
    assert set(figures) == {
        "kinship_heatmap",
        "pca",
        "dendrogram_all",
        "dendrogram_knowledge",
        "dendrogram_reasoning",
        "dendrogram_instruction_following",
    }
    for name, path in figures.items():
        img = _pixels(path)
        h, w, _ = img.shape
        assert h >= 500 and w >= 800, name  # readable size
        assert _n_colours(img) > 50, name  # not blank: text, lines, colour maps
        white = (img == 255).all(axis=-1).mean()
        assert 0.2 < white < 0.97, (name, white)  # drawn on, but not a solid block


def test_heatmap_shows_a_colour_map(figures: dict[str, Path]) -> None:
    img = _pixels(figures["kinship_heatmap"]).astype(int)
    # viridis cells: many saturated (non-grey) pixels with a real spread of hues
    chroma = img.max(axis=-1) - img.min(axis=-1)
    assert (chroma > 80).mean() > 0.3
    assert _n_colours(img) > 300


def test_dendrogram_colours_clusters_below_threshold(tmp_path: Path) -> None:
    # three tight, well separated groups -> three coloured clusters at threshold 0.4
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    x = np.vstack([c + 0.02 * rng.standard_normal((4, 3)) for c in centres])
    names = [f"model-{i}" for i in range(len(x))]
    coloured = dendrogram(x, names, tmp_path / "d.png", title="t", threshold=0.4)
    one = dendrogram(x, names, tmp_path / "one.png", title="t", threshold=5.0)
    hues = {}
    for key, p in (("three", coloured), ("one", one)):
        img = _pixels(p).astype(int)
        chroma = img.max(axis=-1) - img.min(axis=-1)
        q = img[chroma > 100] // 64
        _, counts = np.unique(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], return_counts=True)
        hues[key] = int((counts > 150).sum())  # saturated colours with real line length
    assert hues["three"] >= 3
    assert hues["three"] > hues["one"]


def test_figures_are_byte_identical_across_runs(tmp_path: Path, figures: dict[str, Path]) -> None:
    # the kinship stage draws them again, with the settings' groups and threshold (defaults)
    assert SimilarityConfig().groups == DEFAULT_GROUPS
    assert SimilarityConfig().cluster_threshold == 0.4
    paths = KinshipPaths(scores=ORIGIN, out=tmp_path / "k", plots=tmp_path / "plots")
    execute(STAGE, Params(), paths)
    from karma.core.io import MARKER  # a staged directory output carries karma's marker

    again = sorted(p for p in (tmp_path / "plots").glob("*.png") if p.name != MARKER)
    assert {p.stem for p in again} == set(figures)
    for p in again:
        assert p.read_bytes() == figures[p.stem].read_bytes(), p.name
        assert b"Software" not in p.read_bytes()[:4096]


def test_cluster_order_puts_kin_together() -> None:
    # models 0, 2, 4 are one family, 1, 3, 5 another: clustering must keep families adjacent
    fam = np.array([0, 1, 0, 1, 0, 1])
    sim = np.where(fam[:, None] == fam[None, :], 0.95, 0.1)
    np.fill_diagonal(sim, 1.0)
    order = cluster_order(1.0 - sim)
    assert sorted(order) == list(range(6))
    groups = fam[order]
    assert (groups[:3] == groups[0]).all() and (groups[3:] == groups[3]).all()


def test_rms_distance_nan_aware() -> None:
    nan = math.nan
    x = np.array([[0.0, 1.0, nan], [1.0, 1.0, 1.0], [nan, nan, 0.5]])
    d = rms_distance(x)
    assert d[0, 1] == pytest.approx(math.sqrt(1.0 / 2))  # common: first two
    assert math.isnan(d[0, 2])  # nothing in common
    assert d[1, 2] == pytest.approx(0.5)
    assert np.allclose(np.diag(d), 0.0)


def test_large_pool_skips_unreadable_figures(tmp_path: Path) -> None:
    import polars as pl

    rng = np.random.default_rng(3)
    n = 150
    df = pl.DataFrame({"model": [f"m{i}" for i in range(n)]}).with_columns(
        pl.Series(f"b{j}", rng.random(n)) for j in range(4)
    )
    res = compute_kinship(df, dense_max_models=100, top_k=3)
    paths = kinship_figures(res, tmp_path, groups=DEFAULT_GROUPS)
    assert [p.name for p in paths] == ["pca.png", "pca_loadings.csv"]
    assert _n_colours(_pixels(paths[0])) > 50


def _scored(kept: list[bool], implicit: list[float | None]) -> pl.DataFrame:
    n = len(kept)
    return pl.DataFrame(
        {
            "margin_explicit": np.linspace(-1.0, 1.0, n),
            "margin_implicit": pl.Series(implicit, dtype=pl.Float64),
            "kept": kept,
        }
    )


def _count(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly this colour (marker interiors; antialiased text rarely hits it)."""
    return int((img.astype(int) == np.array(rgb)).all(axis=-1).sum())


def test_margins_scatter_marks_kept_and_dropped_pairs(tmp_path: Path) -> None:
    red, grey = (0xD6, 0x27, 0x28), (0xB0, 0xB0, 0xB0)
    rng = np.random.default_rng(0)
    implicit = rng.normal(size=30).tolist()
    mixed = _pixels(
        margins_scatter(_scored([True] * 10 + [False] * 20, implicit), tmp_path / "m.png")
    )
    all_kept = _pixels(margins_scatter(_scored([True] * 30, implicit), tmp_path / "k.png"))
    none = _pixels(margins_scatter(_scored([True] * 30, [None] * 30), tmp_path / "n.png"))
    assert mixed.shape[:2] == (450, 600)  # 6 x 4.5 inches at 100 dpi
    assert _count(mixed, red) > 200 and _count(mixed, grey) > 200
    assert _count(all_kept, red) > 2 * _count(mixed, red)  # three times the kept pairs
    assert _count(all_kept, grey) < _count(mixed, grey) / 4  # only the legend's marker is grey
    # no implicit margins (method none): a message, no points
    assert _count(none, red) == 0 and _count(none, grey) < _count(mixed, grey) / 10
    assert margins_scatter(_scored([True] * 30, implicit), tmp_path / "k2.png").read_bytes() == (
        (tmp_path / "k.png").read_bytes()
    )


# --------------------------------------------------------------------------- PCA, clusters


@pytest.mark.parametrize("quadrant", [1, 2, 3, 4])
def test_pca_puts_the_strongest_model_in_the_quadrant(quadrant: int) -> None:
    res = compute_kinship(read_scores(ORIGIN))
    x = res.models.select(res.benchmarks).to_numpy()
    s_pref = res.models["s_pref"].to_numpy()
    coords, loadings, var = pca(x, s_pref, quadrant=quadrant)
    want = {1: (1, 1), 2: (-1, 1), 3: (-1, -1), 4: (1, -1)}[quadrant]
    top = int(np.argmax(s_pref))
    assert res.names[top] == "gpt-4"
    assert tuple(np.sign(coords[top])) == want
    # the coordinates are the centred scores on the (signed) loadings; loadings orthonormal
    assert np.allclose(coords, (x - x.mean(axis=0)) @ loadings.T)
    assert np.allclose(loadings @ loadings.T, np.eye(2))
    assert var[0] > var[1] > 0 and var.sum() <= 1
    # only the signs depend on the quadrant
    ref, _, _ = pca(x, s_pref, quadrant=1)
    assert np.allclose(np.abs(coords), np.abs(ref))
    if quadrant == 2:  # the paper's reading: the three strongest models upper left
        assert all(coords[i, 0] < 0 < coords[i, 1] for i in range(3)), res.names[:3]


def test_pca_loadings_are_written_next_to_the_plot(tmp_path: Path) -> None:
    paths = KinshipPaths(scores=ORIGIN, out=tmp_path / "k", plots=tmp_path / "plots")
    execute(STAGE, Params(similarity=SimilarityConfig(pca_quadrant=3)), paths)
    table = pl.read_csv(tmp_path / "plots" / "pca_loadings.csv")
    res = compute_kinship(read_scores(ORIGIN))
    x = res.models.select(res.benchmarks).to_numpy()
    _, loadings, var = pca(x, res.models["s_pref"].to_numpy(), quadrant=3)
    assert table["component"].to_list() == ["PC1", "PC2"]
    assert table.columns[2:] == res.benchmarks
    assert np.allclose(table.select(res.benchmarks).to_numpy(), loadings, atol=1e-6)
    assert np.allclose(table["explained_variance"].to_numpy(), var, atol=1e-6)


def test_clusters_match_scipy_and_follow_the_settings(tmp_path: Path) -> None:
    from scipy.cluster.hierarchy import cophenet, fcluster, linkage
    from scipy.spatial.distance import pdist

    res = compute_kinship(read_scores(ORIGIN))
    x = res.models.select(res.benchmarks).to_numpy()
    for method in ("average", "complete", "ward"):
        got = clusters(x, res.names, distance="euclidean", linkage=method, threshold=0.4)
        d = pdist(x)
        link = linkage(d, method=method)
        labels = fcluster(link, t=0.4, criterion="distance")
        assert got["n_clusters"] == len(set(labels))
        assert got["cophenetic"] == pytest.approx(cophenet(link, d)[0], abs=1e-6)
        # the same partition (numbering aside)
        pairs = {(a, b) for a in range(16) for b in range(16) if labels[a] == labels[b]}
        mine = [got["members"][m] for m in res.names]
        assert {(a, b) for a in range(16) for b in range(16) if mine[a] == mine[b]} == pairs
    # rms = euclidean / sqrt(6) on the complete table; cosine = 1 - kinship
    rms = clusters(x, res.names, distance="rms", threshold=0.4 / math.sqrt(6))
    euc = clusters(x, res.names, distance="euclidean", threshold=0.4)
    assert rms["members"] == euc["members"] and rms["cophenetic"] == euc["cophenetic"]
    # the stage writes them, with the settings, and reports them in the metrics
    cfg = SimilarityConfig(cluster_distance="cosine", cluster_linkage="complete")
    paths = KinshipPaths(scores=ORIGIN, out=tmp_path / "k", metrics=tmp_path / "m.json")
    metrics = execute(STAGE, Params(similarity=cfg), paths)
    written = json.loads((tmp_path / "k" / "clusters.json").read_text())
    assert set(written) == {"all", *DEFAULT_GROUPS}
    want = clusters(x, res.names, distance="cosine", linkage="complete", threshold=0.4)
    assert written["all"] == want
    assert metrics["clusters.all.n"] == want["n_clusters"]
    assert metrics["clusters.all.cophenetic"] == want["cophenetic"]
    # the number of clusters at 0.4 depends on these unstated choices (1 to 15 here)
    counts = {
        clusters(x, res.names, distance=d, linkage=m, threshold=0.4)["n_clusters"]
        for d in ("rms", "euclidean", "cosine", "correlation")
        for m in ("average", "complete", "single", "ward")
    }
    assert min(counts) == 1 and max(counts) == 11


def test_pca_labels_do_not_overlap_when_points_crowd() -> None:
    """Three models almost on one point (as llama-2-13b-chat, wizardlm-13b, llama-2-7b-chat in
    the default PCA) and a few neighbours: every label finds a place of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from karma.kinship.figures import place_labels

    xy = np.array([[0.0, -0.28], [0.01, -0.27], [0.02, -0.29], [-0.25, -0.34], [0.05, -0.26],
                   [-0.2, -0.1], [0.3, 0.1], [0.31, 0.11]])  # fmt: skip
    names = ["llama-2-13b-chat", "wizardlm-13b", "llama-2-7b-chat", "llama-2-70b-chat",
             "falcon-40b-instruct", "vicuna-33b", "alpaca-7b", "pythia-12b"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    ax.scatter(xy[:, 0], xy[:, 1])
    place_labels(fig, ax, xy, names)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(names)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    plt.close(fig)
