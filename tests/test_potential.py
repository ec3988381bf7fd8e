"""MAP selection: z-scores and top-k by hand, ratio edge cases, implicit margins vs a direct
per-example computation on the tiny model, the margin cache, determinism, CLI and stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from karma import potential
from karma.config import from_dict
from karma.errors import KarmaError
from karma.potential import (
    SCORE_COLUMNS,
    SelectConfig,
    encode_sequence,
    implicit_margins,
    method_scores,
    n_keep,
    run_select,
    select,
    selection_metrics,
    synthetic_pairs,
    top_k,
    zscore,
)

REPO = Path(__file__).resolve().parents[1]

# Hand-made example (worked out on paper):
# explicit = [3, 1, 2, 2]: mean 2, population var (1+1+0+0)/4 = 0.5, std 0.707107
#   -> z_explicit = [1.414214, -1.414214, 0, 0]
# |implicit| = [0.5, 0.1, 2.0, 0.1]: mean 0.675, var (0.030625+0.330625+1.755625+0.330625)/4
#   = 0.611875, std 0.782224 -> z_implicit_abs = [-0.223721, -0.735083, 1.693887, -0.735083]
EXPLICIT = np.array([3.0, 1.0, 2.0, 2.0])
IMPLICIT = np.array([0.5, -0.1, -2.0, 0.1])
Z_E = [1.414214, -1.414214, 0.0, 0.0]
Z_I = [-0.223721, -0.735083, 1.693887, -0.735083]


def test_zscore_by_hand() -> None:
    # [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25) = 1.118034
    np.testing.assert_allclose(
        zscore([1.0, 2.0, 3.0, 4.0]), [-1.341641, -0.447214, 0.447214, 1.341641], atol=1e-6
    )
    np.testing.assert_allclose(zscore(EXPLICIT), Z_E, atol=1e-6)
    np.testing.assert_allclose(zscore(np.abs(IMPLICIT)), Z_I, atol=1e-6)


def test_zscore_constant_is_zero_and_nan_rejected() -> None:
    assert zscore([0.3, 0.3, 0.3]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(KarmaError, match="non-finite"):
        zscore([1.0, float("nan")])


def test_float_noise_is_not_signal() -> None:
    # 0.3 - 0.1 and 0.4 - 0.2 differ in the last bit; z-scoring that noise would rank by it
    noisy = np.array([0.3 - 0.1, 0.4 - 0.2, 0.2])
    assert noisy[0] != noisy[1]
    assert zscore(noisy).tolist() == [0.0, 0.0, 0.0]
    pairs = synthetic_pairs(3).with_columns(
        s_pref_chosen=pl.Series([0.3, 0.4, 0.5]), s_pref_rejected=pl.Series([0.1, 0.2, 0.3])
    )
    gaps = potential.explicit_margins(pairs, "s_pref_gap")
    assert gaps.tolist() == [0.2, 0.2, 0.2]  # exact ties -> row order decides
    rank, _ = top_k(method_scores("explicit", gaps, None)["score"], ratio=0.4)
    assert rank.tolist() == [1, 2, 3]


def test_map_scores_and_top_k_by_hand() -> None:
    out = method_scores("map", EXPLICIT, IMPLICIT, beta=1.0)
    np.testing.assert_allclose(out["z_explicit"], Z_E, atol=1e-6)
    np.testing.assert_allclose(out["z_implicit_abs"], Z_I, atol=1e-6)
    # map = z_e - z_i = [1.637935, -0.679131, -1.693887, 0.735083]
    np.testing.assert_allclose(out["score"], [1.637935, -0.679131, -1.693887, 0.735083], atol=1e-6)
    rank, kept = top_k(out["score"], ratio=0.5)
    assert rank.tolist() == [1, 3, 4, 2]
    assert kept.tolist() == [True, False, False, True]


def test_beta_weights_implicit_term() -> None:
    # beta = 2: z_e - 2 z_i = [1.861656, 0.055952, -3.387774, 1.470166]
    out = method_scores("map", EXPLICIT, IMPLICIT, beta=2.0)
    np.testing.assert_allclose(out["score"], [1.861656, 0.055952, -3.387774, 1.470166], atol=1e-6)
    # beta = 0 reduces map to the explicit ranking
    out0 = method_scores("map", EXPLICIT, IMPLICIT, beta=0.0)
    np.testing.assert_allclose(out0["score"], Z_E, atol=1e-6)


def test_explicit_and_implicit_methods_break_ties_by_row() -> None:
    # explicit: z = [1.41, -1.41, 0, 0]: rows 2 and 3 tie -> the earlier row ranks higher
    rank, kept = top_k(method_scores("explicit", EXPLICIT, IMPLICIT)["score"], ratio=0.5)
    assert rank.tolist() == [1, 4, 2, 3]
    assert kept.tolist() == [True, False, True, False]
    # implicit: -z_i = [0.22, 0.74, -1.69, 0.74]: rows 1 and 3 tie (|margin| 0.1 both)
    rank, kept = top_k(method_scores("implicit", EXPLICIT, IMPLICIT)["score"], ratio=0.5)
    assert rank.tolist() == [3, 1, 4, 2]
    assert kept.tolist() == [False, True, False, True]


def test_top_k_all_ties_keeps_first_rows() -> None:
    rank, kept = top_k([1.0] * 5, ratio=0.4)
    assert rank.tolist() == [1, 2, 3, 4, 5]
    assert kept.tolist() == [True, True, False, False, False]


def test_random_method_is_seeded() -> None:
    a = method_scores("random", EXPLICIT, IMPLICIT, seed=3)["score"]
    b = method_scores("random", EXPLICIT, IMPLICIT, seed=3)["score"]
    c = method_scores("random", EXPLICIT, IMPLICIT, seed=4)["score"]
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [(10, 0.4, 4), (10, 1.0, 10), (3, 0.5, 1), (100, 0.29, 29), (7, 0.4, 2), (1, 1.0, 1)],
)
def test_n_keep_floor(n: int, ratio: float, k: int) -> None:
    assert n_keep(n, ratio) == k


def test_ratio_keeping_zero_pairs_is_a_clear_error() -> None:
    with pytest.raises(
        KarmaError,
        match=r"field 'ratio': keeps zero of 10 pairs \(got 0.05; expected ratio >= 1/10",
    ):
        n_keep(10, 0.05)
    with pytest.raises(KarmaError, match="keeps zero"):
        top_k([1.0, 2.0], ratio=0.4)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(KarmaError, match=r"params.yaml:select: field 'ratio'"):
        SelectConfig(ratio=ratio)


def test_config_validation_names_field() -> None:
    with pytest.raises(KarmaError, match="'method'"):
        from_dict(SelectConfig, {"method": "mapp"}, where="params.yaml:select")
    with pytest.raises(KarmaError, match="did you mean 'ratio'"):
        from_dict(SelectConfig, {"ratoi": 0.3}, where="params.yaml:select")
    with pytest.raises(KarmaError, match="'beta'"):
        SelectConfig(beta=-1.0)
    with pytest.raises(KarmaError, match="'batch_size'"):
        SelectConfig(batch_size=0)
    cfg = from_dict(SelectConfig, {"method": "map", "ratio": 1}, where="params.yaml:select")
    assert cfg.ratio == 1.0


def _implicit_frame(margins: np.ndarray) -> pl.DataFrame:
    n = len(margins)
    return pl.DataFrame(
        {
            "logp_chosen": np.zeros(n),
            "logp_rejected": -margins,
            "n_tokens_chosen": np.ones(n, dtype=np.int64),
            "n_tokens_rejected": np.ones(n, dtype=np.int64),
            "margin_implicit": margins,
        }
    )


def _hand_pairs() -> pl.DataFrame:
    base = synthetic_pairs(4, seed=1)
    return base.with_columns(
        s_pref_chosen=pl.Series(EXPLICIT + 1.0), s_pref_rejected=pl.Series([1.0] * 4)
    )


def test_select_frame_and_metrics_by_hand() -> None:
    cfg = SelectConfig(method="map", ratio=0.5)
    scored = select(_hand_pairs(), cfg, implicit=_implicit_frame(IMPLICIT))
    assert scored.columns[-len(SCORE_COLUMNS) :] == list(SCORE_COLUMNS)
    assert scored["margin_explicit"].to_list() == EXPLICIT.tolist()
    assert scored["rank"].to_list() == [1, 3, 4, 2]
    assert scored["kept"].to_list() == [True, False, False, True]
    m = selection_metrics(scored)
    assert (m["pairs_in"], m["pairs_kept"], m["kept_fraction"]) == (4, 2, 0.5)
    assert m["explicit_margin_mean_kept"] == 2.5  # rows 0, 3: (3 + 2) / 2
    assert m["explicit_margin_mean_dropped"] == 1.5  # rows 1, 2: (1 + 2) / 2
    assert m["implicit_margin_mean_kept"] == pytest.approx(0.3)  # (0.5 + 0.1) / 2
    assert m["implicit_abs_mean_dropped"] == pytest.approx(1.05)  # (0.1 + 2.0) / 2
    r = np.corrcoef(EXPLICIT, IMPLICIT)[0, 1]
    assert m["pearson_explicit_implicit"] == pytest.approx(r, abs=1e-6)
    # Spearman: ranks of explicit [4, 1, 2.5, 2.5] vs implicit [4, 2, 1, 3]
    rs = np.corrcoef([4, 1, 2.5, 2.5], [4, 2, 1, 3])[0, 1]
    assert m["spearman_explicit_implicit"] == pytest.approx(rs, abs=1e-6)


def test_rating_gap_without_ratings_errors(tmp_path: Path) -> None:
    pairs = synthetic_pairs(6, ratings=False)
    cfg = SelectConfig(method="map", explicit="rating_gap")
    with pytest.raises(KarmaError, match=r"'chosen_rating'.*6 of 6 pairs have no value"):
        select(pairs, cfg, implicit=_implicit_frame(np.zeros(6)))
    # in the full run it fails before any model is loaded (the model path does not exist)
    path = tmp_path / "pairs.parquet"
    pairs.drop("chosen_rating", "rejected_rating").write_parquet(path)
    with pytest.raises(KarmaError, match=r"pairs.parquet: field 'chosen_rating': column missing"):
        run_select(path, tmp_path / "no-model", tmp_path / "out", cfg, cache_dir=None)


def test_rating_gap_with_ratings() -> None:
    pairs = synthetic_pairs(6)
    cfg = SelectConfig(method="explicit", explicit="rating_gap", ratio=0.5)
    scored = select(pairs, cfg, implicit=_implicit_frame(np.zeros(6)))
    gap = (pairs["chosen_rating"] - pairs["rejected_rating"]).to_list()
    assert scored["margin_explicit"].to_list() == gap


def test_method_none_keeps_all_without_model(tmp_path: Path) -> None:
    pairs = synthetic_pairs(9)
    src = tmp_path / "pairs.parquet"
    pairs.write_parquet(src)
    metrics = run_select(
        src,
        tmp_path / "no-such-model",
        tmp_path / "out",
        SelectConfig(method="none"),
        metrics_path=tmp_path / "m.json",
        plot_path=tmp_path / "p.png",
        cache_dir=None,
    )
    kept = pl.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert kept.height == 9
    assert kept.columns == pairs.columns + list(SCORE_COLUMNS)
    assert kept.drop(list(SCORE_COLUMNS)).equals(pairs)
    assert kept["kept"].all()
    assert kept["rank"].to_list() == list(range(1, 10))
    assert kept["margin_implicit"].null_count() == 9
    assert kept["margin_explicit"].null_count() == 0  # the explicit margin is free
    assert metrics["pairs_kept"] == 9
    assert metrics["pearson_explicit_implicit"] is None
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- tiny model


def _direct_mean_logps(model_dir: Path, pairs: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One sequence at a time, no padding: log_softmax over full logits, response tokens only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {"chosen": [], "rejected": []}
    for row in pairs.iter_rows(named=True):
        for field in ("chosen", "rejected"):
            prompt = tok.apply_chat_template(
                row["prompt"], add_generation_prompt=True, tokenize=False
            )
            full = tok.apply_chat_template(row["prompt"] + row[field], tokenize=False)
            assert full.startswith(prompt)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tok(full, add_special_tokens=False)["input_ids"]
            assert f_ids[: len(p_ids)] == p_ids
            ids = torch.tensor([f_ids])
            with torch.no_grad():
                logp = model(ids).logits[0].double().log_softmax(-1)
            targets = ids[0, len(p_ids) :]
            lp = logp[len(p_ids) - 1 : -1].gather(-1, targets[:, None])[:, 0]
            out[field].append(lp.mean().item())
    return np.array(out["chosen"]), np.array(out["rejected"])


def test_implicit_margins_match_direct_computation(tiny_model_dir: Path) -> None:
    pairs = synthetic_pairs(11, seed=5)
    cfg = SelectConfig(method="map", batch_size=3, max_tokens=400)  # several padded batches
    got = implicit_margins(pairs, tiny_model_dir, config=cfg, cache_dir=None, progress=False)
    chosen, rejected = _direct_mean_logps(tiny_model_dir, pairs)
    np.testing.assert_allclose(got["logp_chosen"].to_numpy(), chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["logp_rejected"].to_numpy(), rejected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        got["margin_implicit"].to_numpy(), chosen - rejected, atol=1e-5, rtol=0
    )
    assert np.ptp(got["margin_implicit"].to_numpy()) > 1e-4  # not trivially constant


def test_hidden_and_full_logit_paths_agree(tiny_model_dir: Path) -> None:
    import torch

    model, tok = potential.load_model(tiny_model_dir, device="cpu")
    pairs = synthetic_pairs(5, seed=2)
    seqs = [
        encode_sequence(tok, row["prompt"], row["chosen"]) for row in pairs.iter_rows(named=True)
    ]
    with torch.inference_mode():
        kw = {"pad_id": tok.pad_token_id, "device": torch.device("cpu")}
        s_h, c_h = potential._batch_logps(model, seqs, head="hidden", chunk=7, **kw)
        s_f, c_f = potential._batch_logps(model, seqs, head="full", **kw)
    assert c_h.tolist() == c_f.tolist() == [len(ids) - start for ids, start in seqs]
    np.testing.assert_allclose(s_h, s_f, rtol=1e-6, atol=1e-5)


def test_fast_path_falls_back_when_logits_are_post_processed(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    model, tok = potential.load_model(tiny_model_dir, device="cpu")
    seqs = [
        encode_sequence(tok, row["prompt"], row["rejected"])
        for row in synthetic_pairs(6, seed=8).iter_rows(named=True)
    ]
    kw = {"pad_id": tok.pad_token_id, "batch_size": 4, "progress": False}
    good, _ = potential.sequence_logps(model, seqs, **kw)
    head = model.get_output_embeddings()
    # a model whose own forward post-processes logits differently from decoder + LM head
    model.get_output_embeddings = lambda: lambda h: 2.0 * head(h)  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="karma.potential"):
        got, _ = potential.sequence_logps(model, seqs, **kw)
    assert "using logits" in caplog.text
    np.testing.assert_allclose(got, good, rtol=1e-6, atol=1e-5)
    with torch.inference_mode():
        wrong, _ = potential._batch_logps(
            model, seqs, pad_id=tok.pad_token_id, device=torch.device("cpu"), head="hidden"
        )
    assert np.abs(wrong - good).max() > 1e-2  # the check had something to catch


def test_encode_sequence_scores_only_the_response(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "what is the capital of france?"}]
    resp = [{"role": "assistant", "content": "paris is the capital."}]
    ids, start = encode_sequence(tok, prompt, resp)
    assert tok.decode(ids[start:]) == "paris is the capital.<|im_end|>\n"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    short, s2 = encode_sequence(tok, prompt, resp, max_length=12)
    assert len(short) == 12
    assert 0 < s2 < 12
    assert short[s2:] == ids[start : start + 12 - s2]  # response head kept
    assert short[:s2] == ids[start - s2 : start]  # prompt tail kept


def test_batches_respect_caps() -> None:
    lengths = [5, 50, 7, 50, 3, 20, 20]
    batches = potential._batches(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_cache_hit_returns_identical_values_without_recomputation(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = synthetic_pairs(6, seed=9)
    cfg = SelectConfig(method="map", batch_size=4)
    cache = tmp_path / "cache"
    first = implicit_margins(pairs, tiny_model_dir, config=cfg, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.parquet"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(potential, "_score_model", boom)
    again = implicit_margins(pairs, tiny_model_dir, config=cfg, cache_dir=cache, progress=False)
    assert again.equals(first)
    # other data, other settings or cache disabled -> a miss, which would recompute
    changed = pairs.with_columns(pl.col("chosen").reverse())
    with pytest.raises(AssertionError, match="recomputed"):
        implicit_margins(changed, tiny_model_dir, config=cfg, cache_dir=cache, progress=False)
    other = SelectConfig(method="map", batch_size=5)
    with pytest.raises(AssertionError, match="recomputed"):
        implicit_margins(pairs, tiny_model_dir, config=other, cache_dir=cache, progress=False)
    off = SelectConfig(method="map", batch_size=4, cache=False)
    with pytest.raises(AssertionError, match="recomputed"):
        implicit_margins(pairs, tiny_model_dir, config=off, cache_dir=cache, progress=False)


def test_dpo_form_with_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    from karma.tiny import build_tiny_model

    ref_dir = build_tiny_model(tmp_path / "ref", seed=1)
    pairs = synthetic_pairs(5, seed=4)
    kw = {"config": SelectConfig(method="map"), "cache_dir": None, "progress": False}
    same = implicit_margins(pairs, tiny_model_dir, reference_dir=tiny_model_dir, **kw)
    np.testing.assert_allclose(same["margin_implicit"].to_numpy(), 0.0, atol=1e-9)
    dpo = implicit_margins(pairs, tiny_model_dir, reference_dir=ref_dir, dpo_beta=0.5, **kw)
    pi = implicit_margins(pairs, tiny_model_dir, **kw)
    ref = implicit_margins(pairs, ref_dir, **kw)

    def sums(f: pl.DataFrame, side: str) -> np.ndarray:
        return (f[f"logp_{side}"] * f[f"n_tokens_{side}"]).to_numpy()

    expected = 0.5 * (
        (sums(pi, "chosen") - sums(ref, "chosen")) - (sums(pi, "rejected") - sums(ref, "rejected"))
    )
    np.testing.assert_allclose(dpo["margin_implicit"].to_numpy(), expected, atol=1e-4)
    assert np.abs(expected).max() > 1e-3


def _read_outputs(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("method", ["map", "explicit", "implicit", "random"])
def test_run_select_outputs_are_deterministic(
    tiny_model_dir: Path, tmp_path: Path, method: str
) -> None:
    pairs = synthetic_pairs(20, seed=7)
    src = tmp_path / "pairs.parquet"
    pairs.write_parquet(src)
    cfg = SelectConfig(method=method, ratio=0.4)  # type: ignore[arg-type]
    outputs = []
    for run, cache in (
        ("a", None),
        ("b", None),
        ("c", tmp_path / "cache"),
        ("d", tmp_path / "cache"),
    ):
        root = tmp_path / run
        run_select(
            src,
            tiny_model_dir,
            root / "data",
            cfg,
            seed=1,
            metrics_path=root / "m.json",
            plot_path=root / "p.png",
            cache_dir=cache,
            progress=False,
        )
        outputs.append(_read_outputs(root))
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    assert set(outputs[0]) == {"data/pairs.parquet", "data/scores.parquet", "m.json", "p.png"}
    kept = pl.read_parquet(tmp_path / "a" / "data" / "pairs.parquet")
    scores = pl.read_parquet(tmp_path / "a" / "data" / "scores.parquet")
    assert kept.height == 8 and scores.height == 20
    assert kept.equals(scores.filter("kept"))
    assert sorted(kept["rank"].to_list()) == list(range(1, 9))
    assert scores.drop(list(SCORE_COLUMNS)).equals(pairs)
    m = json.loads((tmp_path / "a" / "m.json").read_text())
    assert m["pairs_in"] == 20 and m["pairs_kept"] == 8
    assert all(v is None or math.isfinite(v) for v in m.values())
    if method == "map":
        assert m["map_score_mean_kept"] > m["map_score_mean_dropped"]


def test_cli_select(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from karma.cli import main

    src = tmp_path / "pairs.parquet"
    synthetic_pairs(10).write_parquet(src)
    args = ["select", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    main([*args, "--method", "implicit", "--ratio", "0.3", "--no-cache"])
    assert json.loads(capsys.readouterr().out)["pairs_kept"] == 3
    with pytest.raises(SystemExit) as exc:
        main([*args, "--ratio", "0.05"])
    assert exc.value.code == 1
    assert "karma: error:" in capsys.readouterr().err


def test_stage_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``python stages/select_pairs.py`` from a repo-like directory with the tiny model as base."""
    (tmp_path / "data" / "preferences").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "models" / "base")
    synthetic_pairs(15).write_parquet(tmp_path / "data" / "preferences" / "pairs.parquet")
    params = "seed: 3\nselect:\n  method: map\n  ratio: 0.4\n  beta: 1.0\n  explicit: s_pref_gap\n"
    (tmp_path / "params.yaml").write_text(params)
    env = {**os.environ, "KARMA_MARGIN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(REPO / "stages" / "select_pairs.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(tmp_path / "data" / "selected" / "pairs.parquet").height == 6
    assert json.loads((tmp_path / "metrics" / "select.json").read_text())["pairs_kept"] == 6
    assert (tmp_path / "plots" / "select" / "margins.png").stat().st_size > 1000
    assert list((tmp_path / "cache").glob("*.parquet"))
    (tmp_path / "params.yaml").write_text(params.replace("0.4", "0.01"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("karma: error: params.yaml:select")
