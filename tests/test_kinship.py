"""karma.kinship: kernels vs numpy reference, hand-checked cases, global pairs, top-k, CLI."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from karma.config import from_dict
from karma.errors import KarmaError
from karma.kinship import (
    METRICS,
    SimilarityConfig,
    compute_kinship,
    normalise,
    pairwise_similarity,
    pairwise_similarity_numpy,
    similarity_rows,
    write_kinship,
)
from karma.scores import read_scores

REPO = Path(__file__).resolve().parents[1]
ORIGIN = REPO / "data" / "origin" / "scores.csv"


def naive(a: np.ndarray, b: np.ndarray, metric: str, min_common: int) -> float:
    """Textbook definition on the common benchmarks, one pair at a time (pure Python)."""
    common = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(common) < min_common:
        return math.nan
    xs = [x for x, _ in common]
    ys = [y for _, y in common]
    if metric == "euclidean":
        return 1.0 / (1.0 + math.sqrt(sum((x - y) ** 2 for x, y in common)))
    if metric == "pearson":
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        xs = [x - mx for x in xs]
        ys = [y - my for y in ys]
    num = sum(x * y for x, y in zip(xs, ys, strict=True))
    den = math.sqrt(sum(x * x for x in xs) * sum(y * y for y in ys))
    return math.nan if den == 0 else max(-1.0, min(1.0, num / den))


def random_table(n: int, d: int, missing: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    x[rng.random((n, d)) < missing] = np.nan
    return x


# --------------------------------------------------------------------------- hand-checked


@pytest.mark.parametrize("backend", ["kernel", "numpy"])
def test_hand_checked_values(backend: str) -> None:
    nan = math.nan
    x = np.array([[1.0, 0.0, nan], [1.0, 1.0, 1.0], [0.0, 0.0, 5.0], [nan, 3.0, 4.0]])
    cos = pairwise_similarity(x, "cosine", 2, backend=backend)
    assert cos[0, 1] == pytest.approx(1 / math.sqrt(2))  # common: first two benchmarks
    assert math.isnan(cos[0, 2])  # common (1, 0) vs (0, 0): zero vector -> undefined
    assert math.isnan(cos[0, 3])  # one common benchmark < min_common
    assert cos[1, 3] == pytest.approx(7 / (math.sqrt(2) * 5))
    assert cos[2, 3] == pytest.approx(20 / 25)
    one = pairwise_similarity(x, "cosine", 1, backend=backend)
    assert math.isnan(one[0, 3])  # single common benchmark: (0) vs (3), a zero vector
    eu = pairwise_similarity(x, "euclidean", 2, backend=backend)
    assert eu[2, 3] == pytest.approx(1 / (1 + math.sqrt(9 + 1)))
    assert eu[0, 1] == pytest.approx(1 / 2)
    y = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    pe = pairwise_similarity(y, "pearson", 2, backend=backend)
    assert pe[0, 1] == pytest.approx(1.0)
    assert pe[0, 2] == pytest.approx(-1.0)
    assert math.isnan(pe[0, 3])  # constant vector -> undefined


def test_cosine_single_benchmark_zero() -> None:
    # on a single common benchmark, a zero value makes cosine undefined, not 0
    x = np.array([[0.0, math.nan], [math.nan, 1.0], [3.0, 2.0]])
    k = pairwise_similarity(x, "cosine", 1, backend="kernel")
    assert math.isnan(k[0, 2])
    assert k[1, 2] == pytest.approx(1.0)
    assert math.isnan(k[0, 1])  # nothing in common


def test_normalise_and_s_pref(caplog: pytest.LogCaptureFixture) -> None:
    df = pl.DataFrame(
        {
            "model": ["a", "b", "c"],
            "x": [10.0, 20.0, 30.0],
            "const": [5.0, 5.0, 5.0],
            "y": [1.0, None, 0.0],
        }
    )
    with caplog.at_level(logging.WARNING):
        out, dropped = normalise(df)
    assert dropped == ["const"]
    assert "const" in caplog.text
    assert out.columns == ["model", "s_pref", "x", "y"]
    rows = {m: (s, x, y) for m, s, x, y in out.rows()}
    assert rows["a"] == (0.5, 0.0, 1.0)
    assert rows["b"] == (0.5, 0.5, None)  # mean over the available benchmark only
    assert rows["c"] == (0.5, 1.0, 0.0)
    assert out["model"].to_list() == ["a", "b", "c"]  # equal S_pref: by id
    with pytest.raises(KarmaError, match="every benchmark is constant"):
        normalise(df.select("model", "const"))
    with pytest.raises(KarmaError, match="reserved column name"):
        normalise(df.rename({"x": "s_pref"}))


def test_s_pref_is_papers_eq2_on_origin_table() -> None:
    raw = read_scores(ORIGIN)
    res = compute_kinship(raw)
    benches = raw.columns[1:]
    lo = {b: raw[b].min() for b in benches}
    hi = {b: raw[b].max() for b in benches}
    for model, s in res.models.select("model", "s_pref").rows():
        r = raw.filter(pl.col("model") == model).row(0, named=True)
        expect = sum((r[b] - lo[b]) / (hi[b] - lo[b]) for b in benches) / len(benches)
        assert s == pytest.approx(expect, abs=1e-12)
    assert res.names[:3] == ["gpt-4", "bard", "gpt-3.5-turbo"]
    assert res.names[-1] == "starchat"


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("n", "d", "missing"), [(40, 6, 0.2), (25, 64, 0.5), (30, 3, 0.0)])
@pytest.mark.parametrize("min_common", [1, 2, 4])
def test_kernel_matches_reference(
    metric: str, n: int, d: int, missing: float, min_common: int
) -> None:
    x = random_table(n, d, missing, seed=n * d)
    ref = pairwise_similarity_numpy(x, metric, min_common)
    got = pairwise_similarity(x, metric, min_common, backend="kernel")
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got, got.T, equal_nan=True)  # each pair computed once, mirrored
    rows = np.array([n - 1, 0, 3])
    part = similarity_rows(x, rows, metric, min_common, backend="kernel")
    assert np.array_equal(part, got[rows], equal_nan=True)  # bit-identical to the dense kernel
    ref_rows = similarity_rows(x, rows, metric, min_common, backend="numpy")
    np.testing.assert_allclose(part, ref_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_blas_path_matches_reference_on_complete_data(metric: str) -> None:
    x = random_table(90, 7, 0.0, seed=1)
    x[5] = x[4]  # identical vectors: euclidean cancellation is recomputed exactly
    x[6] = x[4] + 1e-9
    ref = pairwise_similarity_numpy(x, metric, 2)
    got = pairwise_similarity(x, metric, 2, backend="blas")
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    auto = pairwise_similarity(x, metric, 2)  # complete and >= BLAS_MIN_MODELS -> BLAS
    assert np.array_equal(auto, got, equal_nan=True)
    rows = np.array([4, 5, 80])
    np.testing.assert_allclose(
        similarity_rows(x, rows, metric, 2, backend="blas"), ref[rows], rtol=1e-12, atol=1e-12
    )
    with pytest.raises(KarmaError, match="BLAS backend needs a table without missing"):
        pairwise_similarity(random_table(5, 3, 0.5, 0), metric, backend="blas")


# Scores on a grid (like published percentages) keep pearson well-conditioned: with arbitrary
# floats a nearly-constant vector makes r ill-conditioned and any two summation orders differ.
GRID = st.one_of(st.integers(0, 200).map(lambda k: k / 200.0), st.just(math.nan))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=st.tuples(st.integers(2, 12), st.integers(1, 9)).flatmap(
        lambda s: hnp.arrays(np.float64, s, elements=GRID)
    ),
    metric=st.sampled_from(METRICS),
    min_common=st.integers(1, 4),
)
def test_hypothesis_kernel_vs_reference_vs_naive(
    x: np.ndarray, metric: str, min_common: int
) -> None:
    ref = pairwise_similarity_numpy(x, metric, min_common)
    got = pairwise_similarity(x, metric, min_common, backend="kernel")
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    n = x.shape[0]
    for i in range(n):
        for j in range(n):
            want = naive(x[i], x[j], metric, min_common)
            if math.isnan(want):
                assert math.isnan(ref[i, j]), (i, j)
            else:
                assert ref[i, j] == pytest.approx(want, rel=1e-9, abs=1e-12), (i, j)


# --------------------------------------------------------------------------- global pairs


def test_origin_global_pairs_and_frames() -> None:
    res = compute_kinship(read_scores(ORIGIN))
    assert res.pairs == {
        "score": ["gpt-4", "bard"],
        "sim": ["llama-2-13b-chat", "llama-2-7b-chat"],
        "score_sim": ["gpt-4", "bard"],
    }
    k = res.kinship
    assert k.columns == ["model_a", "model_b", "kinship"]
    assert k.height == 16 * 15
    assert k.filter(pl.col("model_a") == pl.col("model_b")).height == 0
    assert k.select(pl.struct("model_a", "model_b").n_unique()).item() == 240
    sym = k.join(k, left_on=["model_a", "model_b"], right_on=["model_b", "model_a"])
    assert (sym["kinship"] == sym["kinship_right"]).all()
    assert res.models.columns[:2] == ["model", "s_pref"]
    assert res.stats["n_kin_pairs"] == 119  # only starchat ~ pythia-12b (0.02) is not kin
    top = k.sort("kinship", descending=True).row(0)
    assert set(top[:2]) == {"llama-2-13b-chat", "llama-2-7b-chat"}


def test_pearson_and_tau_change_the_pairs() -> None:
    raw = read_scores(ORIGIN)
    pe = compute_kinship(raw, similarity="pearson")
    assert pe.pairs["score"][0] == "gpt-4"
    m = pe.matrix
    assert m is not None
    # score: the highest-S_pref model's highest-S_pref kin (pearson >= tau)
    kin_of_top = [j for j in range(1, 16) if m[0, j] >= 0.1]
    assert pe.pairs["score"][1] == pe.names[kin_of_top[0]]
    assert pe.pairs["score_sim"][1] == pe.names[max(kin_of_top, key=lambda j: m[0, j])]
    hi = compute_kinship(raw, tau=0.995)  # only llama-2-13b-chat ~ llama-2-7b-chat (0.9961)
    assert hi.stats["n_kin_pairs"] == 1
    assert all(v == ["llama-2-13b-chat", "llama-2-7b-chat"] for v in hi.pairs.values())
    with pytest.raises(KarmaError, match="no pair of models is kin"):
        compute_kinship(raw, tau=1.0, similarity="euclidean")


def test_ties_are_broken_deterministically_and_independent_of_row_order() -> None:
    # c and d are identical (kinship 1 with each other), as are a and b: a sim tie at 1.0.
    # a/b have the higher S_pref, so the sim pair is (a, b); a and b tie on S_pref -> by id.
    df = pl.DataFrame(
        {
            "model": ["d", "b", "c", "a", "e"],
            "x": [0.2, 0.9, 0.2, 0.9, 0.0],
            "y": [0.4, 0.8, 0.4, 0.8, 1.0],
            "z": [0.1, 0.5, 0.1, 0.5, 0.0],
        }
    )
    res = compute_kinship(df)
    assert res.names[:2] == ["a", "b"]
    assert res.pairs == {"score": ["a", "b"], "sim": ["a", "b"], "score_sim": ["a", "b"]}
    shuffled = compute_kinship(df.reverse())
    assert shuffled.pairs == res.pairs
    assert shuffled.kinship.equals(res.kinship)
    assert shuffled.models.equals(res.models)
    # with a and b removed, the tie moves to c ~ d; c precedes d by id
    rest = compute_kinship(df.filter(~pl.col("model").is_in(["a", "b"])))
    assert rest.pairs["sim"] == ["c", "d"]


def test_nan_kinship_is_null_and_models_without_scores() -> None:
    nan = math.nan
    df = pl.DataFrame(
        {
            "model": ["a", "b", "c", "ghost"],
            "x": [1.0, 0.0, 0.5, nan],
            "y": [0.0, 1.0, nan, nan],
            "z": [1.0, 0.5, 0.0, None],
        }
    )
    res = compute_kinship(df, min_common=2)
    k = res.kinship
    assert k.filter(pl.col("model_a") == "ghost")["kinship"].null_count() == 3
    assert k["kinship"].is_nan().sum() == 0
    ghost = res.models.filter(pl.col("model") == "ghost")
    assert ghost["s_pref"].item() is None
    assert res.names[-1] == "ghost"


# --------------------------------------------------------------------------- top-k mode


@pytest.mark.parametrize("missing", [0.0, 0.3])
@pytest.mark.parametrize("metric", METRICS)
def test_topk_mode_matches_dense(missing: float, metric: str) -> None:
    x = random_table(150, 6, missing, seed=7)
    df = pl.DataFrame({"model": [f"m{i:03d}" for i in range(150)]}).with_columns(
        pl.Series(f"b{j}", x[:, j]) for j in range(6)
    )
    tau = 0.5
    dense = compute_kinship(df, similarity=metric, tau=tau, dense_max_models=1000)
    topk = compute_kinship(df, similarity=metric, tau=tau, dense_max_models=100, top_k=7)
    assert topk.mode == "top_k" and topk.matrix is None and dense.mode == "dense"
    assert topk.pairs == dense.pairs
    assert topk.stats["n_kin_pairs"] == dense.stats["n_kin_pairs"]
    assert topk.stats["mean_kinship"] == pytest.approx(dense.stats["mean_kinship"], rel=1e-12)
    rank = {m: i for i, m in enumerate(dense.names)}
    expect = (
        dense.kinship.drop_nulls()
        .filter(pl.col("kinship") >= tau)
        .with_columns(pl.col("model_b").replace_strict(rank).alias("rb"))
        .sort(["kinship", "rb"], descending=[True, False])
        .group_by("model_a", maintain_order=True)
        .head(7)
        .drop("rb")
    )
    got = topk.kinship
    assert got.group_by("model_a").len()["len"].max() <= 7
    joined = got.join(expect, on=["model_a", "model_b"], how="full", coalesce=True)
    assert joined.height == got.height == expect.height
    np.testing.assert_allclose(joined["kinship"], joined["kinship_right"], rtol=1e-12)


# --------------------------------------------------------------------------- output and config


def test_write_kinship_is_deterministic(tmp_path: Path) -> None:
    res = compute_kinship(read_scores(ORIGIN))
    write_kinship(res, tmp_path / "a")
    write_kinship(compute_kinship(read_scores(ORIGIN)), tmp_path / "b")
    for name in ("models.parquet", "kinship.parquet", "pairs.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "pairs.json").read_text()) == res.pairs
    assert pl.read_parquet(tmp_path / "a" / "kinship.parquet").equals(res.kinship)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "kinship.parquet",
        "models.parquet",
        "pairs.json",
    ]


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"metric": "manhattan"}, "field 'metric'"),
        ({"tau": 1.5}, "field 'tau': out of range"),
        ({"min_common": 0}, "field 'min_common'"),
        ({"top_k": 0}, "field 'top_k'"),
        ({"dense_max_models": 1}, "field 'dense_max_models'"),
        ({"cluster_threshold": -1.0}, "field 'cluster_threshold'"),
        ({"groups": {"knowledge": []}}, "field 'groups.knowledge'"),
        ({"tua": 0.1}, "did you mean 'tau'"),
    ],
)
def test_config_errors(params: dict, pattern: str) -> None:
    with pytest.raises(KarmaError, match=pattern):
        from_dict(SimilarityConfig, params, where="params.yaml:similarity")


def test_config_defaults_match_params_yaml() -> None:
    from karma.config import load_params, section

    cfg = from_dict(
        SimilarityConfig,
        section(load_params(REPO / "params.yaml"), "similarity"),
        where="params.yaml:similarity",
    )
    assert cfg == SimilarityConfig()


# --------------------------------------------------------------------------- CLI


def _karma(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "karma.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_writes_outputs_and_summary(tmp_path: Path) -> None:
    proc = _karma("kinship", str(ORIGIN), "--out", str(tmp_path / "k"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "S_pref ranking" in proc.stdout and "gpt-4" in proc.stdout
    assert "score      gpt-4 > bard" in proc.stdout
    assert json.loads((tmp_path / "k" / "pairs.json").read_text())["score"] == ["gpt-4", "bard"]
    assert pl.read_parquet(tmp_path / "k" / "kinship.parquet").height == 240
    models = pl.read_parquet(tmp_path / "k" / "models.parquet")
    assert models.columns == ["model", "s_pref", *read_scores(ORIGIN).columns[1:]]


@pytest.mark.parametrize(
    ("table", "extra", "pattern"),
    [
        ("model,x\na,1\nA,2\n", [], "duplicate model"),
        ("model,x,y\na,1,2\nb,x,3\n", [], "non-numeric score"),
        ("model,x,y\na,1,2\nb,2,3\n", ["--tau", "7"], "field 'tau'"),
        ("model,x,y\na,1,2\nb,2,3\n", ["--alias", "oops"], "ALIAS=MODEL"),
    ],
)
def test_cli_bad_input_one_line_exit_1(
    tmp_path: Path, table: str, extra: list[str], pattern: str
) -> None:
    p = tmp_path / "t.csv"
    p.write_text(table)
    proc = _karma("kinship", str(p), "--out", str(tmp_path / "o"), *extra, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("karma: error:"), proc.stderr
    assert pattern in lines[0]
    assert not (tmp_path / "o").exists()
