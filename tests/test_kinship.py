"""karma.kinship.kinship: kernels vs numpy reference, hand-checked cases, global pairs, top-k, the
settings through params and the CLI, the stage."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from karma.core.errors import KarmaError
from karma.kinship.kinship import (
    KinshipPaths,
    compute_kinship,
    kinship_metrics,
    leave_one_out,
    normalise,
    run_kinship,
    sensitivity_metrics,
    summary,
    write_kinship,
)
from karma.kinship.scores import read_scores
from karma.kinship.settings import SimilarityConfig
from karma.kinship.similarity import (
    METRICS,
    pairwise_similarity,
    pairwise_similarity_numpy,
    similarity_rows,
)
from karma.params import Params, build_params, load_params
from tests.fixtures import run_karma as _cli

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


# --------------------------------------------------------------------------- output and metrics


def test_write_kinship_is_deterministic(tmp_path: Path) -> None:
    res = compute_kinship(read_scores(ORIGIN))
    write_kinship(res, tmp_path / "a")
    write_kinship(compute_kinship(read_scores(ORIGIN)), tmp_path / "b")
    for name in ("models.parquet", "kinship.parquet", "pairs.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "pairs.json").read_text()) == res.pairs
    assert pl.read_parquet(tmp_path / "a" / "kinship.parquet").equals(res.kinship)
    assert pl.read_parquet(tmp_path / "a" / "models.parquet").equals(res.models)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "kinship.parquet",
        "models.parquet",
        "pairs.json",
    ]


def test_summary_and_metrics_of_the_origin_table() -> None:
    res = compute_kinship(read_scores(ORIGIN))
    text = summary(res, top=3)
    lines = text.splitlines()
    assert lines[0].startswith("16 models x 6 benchmarks (ifeval, mmlu_stem,")
    assert "similarity=cosine, tau=0.1, mode=dense" in lines[0]
    ranking = lines[lines.index("S_pref ranking:") + 1 :][:16]
    assert [ln.split()[1] for ln in ranking] == res.names  # every model, in rank order
    assert ranking[0].split() == ["1.", "gpt-4", f"{res.models['s_pref'][0]:.4f}"]
    assert "  score      gpt-4 > bard" in lines
    assert "  sim        llama-2-13b-chat > llama-2-7b-chat" in lines
    assert "top kin pairs (119 kin of 120 defined pairs):" in lines
    top = lines[lines.index("top kin pairs (119 kin of 120 defined pairs):") + 1 :]
    assert len(top) == 3
    assert top[0].split() == ["0.9961", "llama-2-13b-chat", "~", "llama-2-7b-chat"]
    m = kinship_metrics(res)
    upper = res.matrix[np.triu_indices(16, k=1)]  # type: ignore[index]
    assert m == {
        "n_models": 16,
        "n_benchmarks": 6,
        "n_dropped_benchmarks": 0,
        "n_kin_pairs": int((upper >= 0.1).sum()),
        "kin_fraction": round(int((upper >= 0.1).sum()) / 120, 6),
        "mean_kinship": round(float(upper.mean()), 6),
        "pair_score": "gpt-4 > bard",
        "pair_sim": "llama-2-13b-chat > llama-2-7b-chat",
        "pair_score_sim": "gpt-4 > bard",
    }
    assert m["n_kin_pairs"] == 119


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("key", "value", "label", "message"),
    [
        ("metric", "manhattan", "--metric", "--metric: not one of the choices (got 'manhattan';"
         " expected cosine | pearson | euclidean)"),
        ("tau", 1.5, "--tau", "--tau: out of range (got 1.5; expected -1 <= tau <= 1)"),
        ("tau", -1.5, "--tau", "--tau: out of range (got -1.5; expected -1 <= tau <= 1)"),
        ("tau", "high", "--tau", "--tau: wrong type (got 'high'; expected float)"),
        ("min_common", 0, "--min-common", "--min-common: out of range (got 0; expected"
         " 1 <= min_common)"),
        ("top_k", 0, "--top-k", "--top-k: out of range (got 0; expected 1 <= top_k)"),
        ("dense_max_models", 1, "--dense-max-models", "--dense-max-models: out of range"),
        ("cluster_threshold", -1.0, "--cluster-threshold", "--cluster-threshold: out of range"
         " (got -1.0; expected 0 < cluster_threshold)"),
        ("groups", {"knowledge": []}, "--groups", "--groups: field 'knowledge': List should have"
         " at least 1"),
        ("tua", 0.1, "-S similarity.tua", "-S similarity.tua: unknown key; did you mean 'tau'?"),
    ],
)  # fmt: skip
def test_similarity_settings_errors_name_the_flag(
    key: str, value: object, label: str, message: str
) -> None:
    with pytest.raises(KarmaError) as info:
        build_params(None, [(f"similarity.{key}", value, label)])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_similarity_settings_from_a_params_file(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("similarity:\n  metric: pearson\n  tau: -0.5\n  groups: {all: [ifeval]}\n")
    cfg = build_params(f).similarity
    assert (cfg.metric, cfg.tau, cfg.groups) == ("pearson", -0.5, {"all": ["ifeval"]})
    assert cfg.min_common == SimilarityConfig().min_common  # the rest keeps the defaults
    f.write_text("similarity:\n  tau: 2\n")
    with pytest.raises(KarmaError, match=r"params.yaml: field 'similarity.tau': out of range"):
        build_params(f)
    f.write_text("similarity:\n  metirc: cosine\n")
    with pytest.raises(KarmaError, match=r"field 'similarity.metirc': unknown key; did you mean"):
        build_params(f)


def test_config_defaults_match_params_yaml() -> None:
    assert load_params(REPO / "params.yaml").similarity == SimilarityConfig()


# --------------------------------------------------------------------------- stage and CLI


def test_run_kinship_follows_the_settings(tmp_path: Path) -> None:
    params = Params(similarity=SimilarityConfig(metric="pearson", tau=0.3))
    paths = KinshipPaths(scores=ORIGIN, out=tmp_path / "k", metrics=tmp_path / "m.json")
    metrics = run_kinship(params, paths)
    want = compute_kinship(read_scores(ORIGIN), similarity="pearson", tau=0.3)
    loo = leave_one_out(read_scores(ORIGIN), want, similarity="pearson", tau=0.3)
    assert json.loads((tmp_path / "k" / "sensitivity.json").read_text()) == loo
    assert {k: v for k, v in metrics.items() if not k.startswith(("loo.", "clusters."))} == (
        kinship_metrics(want)
    )
    assert {k: v for k, v in metrics.items() if k.startswith("loo.")} == sensitivity_metrics(loo)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert json.loads((tmp_path / "k" / "pairs.json").read_text()) == want.pairs
    assert pl.read_parquet(tmp_path / "k" / "kinship.parquet").equals(want.kinship)
    assert want.stats["n_kin_pairs"] != compute_kinship(read_scores(ORIGIN)).stats["n_kin_pairs"]


def test_leave_one_benchmark_out_on_the_papers_table(tmp_path: Path) -> None:
    """Dropping a benchmark is the same as computing from a table without its column; the
    ranking and global pairs it changes are the ones reported."""
    scores = read_scores(ORIGIN)
    full = compute_kinship(scores)
    loo = leave_one_out(scores, full)
    assert set(loo) == set(full.benchmarks)
    for bench, entry in loo.items():
        csv = tmp_path / f"no_{bench}.csv"
        scores.drop(bench).write_csv(csv)
        sub = compute_kinship(read_scores(csv))
        assert entry["ranking"] == sub.names and entry["pairs"] == sub.pairs
        assert entry["pairs_changed"] == [k for k in sub.pairs if sub.pairs[k] != full.pairs[k]]
        moved = {m: sub.names.index(m) - full.names.index(m) for m in full.names}
        assert entry["rank_changes"] == {m: v for m, v in moved.items() if v}
        assert entry["max_rank_shift"] == max(abs(v) for v in moved.values())
        assert 0.9 < entry["rank_spearman"] <= 1.0
    # on the paper's table: hellaswag moves the ranking most; the score pair never moves,
    # the sim pair without ifeval or hellaswag, the score_sim pair without mmlu_pro
    assert min(loo, key=lambda b: loo[b]["rank_spearman"]) == "hellaswag"
    assert {b: e["pairs_changed"] for b, e in loo.items() if e["pairs_changed"]} == {
        "ifeval": ["sim"],
        "hellaswag": ["sim"],
        "mmlu_pro": ["score_sim"],
    }
    assert loo["mmlu_pro"]["pairs"]["score_sim"] == ["gpt-4", "gpt-3.5-turbo"]
    m = sensitivity_metrics(loo)
    assert m["loo.benchmarks_changing_pairs"] == sum(bool(e["pairs_changed"]) for e in loo.values())
    assert m["loo.benchmarks_changing_pairs"] == 3
    # a benchmark without which nothing is kin is reported, not fatal
    two = pl.DataFrame({"model": ["a", "b", "c"], "x": [0.0, 1.0, 0.5], "y": [1.0, 0.0, 0.5]})
    res = compute_kinship(two, tau=-1.0)
    out = leave_one_out(two, res, tau=-1.0, min_common=2)
    assert set(out) == {"x", "y"} and all("error" in e for e in out.values())


def test_cli_writes_outputs_and_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, m = tmp_path / "k", tmp_path / "m.json"
    argv = ["kinship", "--scores", str(ORIGIN), "--out", str(out), "--metrics", str(m)]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics == json.loads(m.read_text())
    want = kinship_metrics(compute_kinship(read_scores(ORIGIN)))
    assert {k: metrics[k] for k in want} == want
    assert "S_pref ranking" in err and "score      gpt-4 > bard" in err  # the summary is logged
    assert json.loads((out / "pairs.json").read_text())["score"] == ["gpt-4", "bard"]
    assert pl.read_parquet(out / "kinship.parquet").height == 240
    models = pl.read_parquet(out / "models.parquet")
    assert models.columns == ["model", "s_pref", *read_scores(ORIGIN).columns[1:]]
    # a setting flag reaches the computation
    code, stdout, err = _cli([*argv, "--tau", "0.995"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n_kin_pairs"] == 1
    assert json.loads((out / "pairs.json").read_text())["score"] == [
        "llama-2-13b-chat",
        "llama-2-7b-chat",
    ]


@pytest.mark.parametrize(
    ("table", "extra", "pattern"),
    [
        ("model,x\na,1\nA,2\n", [], "t.csv: field 'model': line 3: duplicate model 'a'"),
        ("model,x,y\na,1,2\nb,x,3\n", [], "t.csv: field 'x': line 3 (model 'b'): non-numeric"),
        ("model,x,y\na,1,2\nb,2,3\n", ["--tau", "7"], "--tau: out of range (got 7; expected"),
        ("model,x,y\na,1,2\nb,2,3\n", ["--metric", "cosin"], "--metric: not one of the choices;"
         " did you mean 'cosine'?"),
        ("model,x,y\na,1,2\nb,2,3\n", ["-S", "oops"], "field '-S': expects KEY=VALUE"),
        # kin at the default tau (max cosine 0.894), none at 0.95
        ("model,x,y\na,1,2\nb,2,3\nc,3,1\n", ["--tau", "0.95"], "--tau: no pair of models"
         " is kin (kinship >= tau) (got 0.95; expected a lower tau"),
    ],
)  # fmt: skip
def test_cli_bad_input_one_line_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    table: str,
    extra: list[str],
    pattern: str,
) -> None:
    p = tmp_path / "t.csv"
    p.write_text(table)
    code, stdout, err = _cli(["kinship", "--scores", str(p), "--out", str(tmp_path / "o"), *extra],
                             capsys)  # fmt: skip
    assert code == 1
    assert stdout == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("karma: error:"), err
    assert pattern in lines[0]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["t.csv"]  # no output, no temporaries
