"""MAP selection: z-scores and top-k by hand, ratio edge cases, the settings through params and
the CLI, implicit margins vs a direct per-example computation on the tiny model, the margin
cache (a hit loads no model; the key does not re-read the model), determinism, CLI and stage."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from karma.core.errors import KarmaError
from karma.core.io import cache_root
from karma.core.stage import execute
from karma.params import Params, build_params
from karma.selection import margins
from karma.selection import select as potential
from karma.selection.margins import encode_sequence, implicit_margins
from karma.selection.select import (
    SCORE_COLUMNS,
    SelectPaths,
    method_scores,
    n_keep,
    read_pairs,
    run_select,
    select,
    selection_metrics,
    top_k,
    zscore,
)
from karma.selection.settings import SelectConfig
from tests.fixtures import build_tiny_model, synthetic_pairs
from tests.fixtures import run_karma as _cli

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


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every cache (margins, digest memo) of these tests lives in the test's tmp dir."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KARMA_CACHE_DIR", str(root))
    return root


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was loaded")


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
    out = method_scores("map", EXPLICIT, IMPLICIT, weight=1.0)
    np.testing.assert_allclose(out["z_explicit"], Z_E, atol=1e-6)
    np.testing.assert_allclose(out["z_implicit_abs"], Z_I, atol=1e-6)
    # map = z_e - z_i = [1.637935, -0.679131, -1.693887, 0.735083]
    np.testing.assert_allclose(out["score"], [1.637935, -0.679131, -1.693887, 0.735083], atol=1e-6)
    rank, kept = top_k(out["score"], ratio=0.5)
    assert rank.tolist() == [1, 3, 4, 2]
    assert kept.tolist() == [True, False, False, True]


def test_beta_weights_implicit_term() -> None:
    # w = 2: z_e - 2 z_i = [1.861656, 0.055952, -3.387774, 1.470166]
    out = method_scores("map", EXPLICIT, IMPLICIT, weight=2.0)
    np.testing.assert_allclose(out["score"], [1.861656, 0.055952, -3.387774, 1.470166], atol=1e-6)
    # w = 0 reduces map to the explicit ranking
    out0 = method_scores("map", EXPLICIT, IMPLICIT, weight=0.0)
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


def test_method_scores_refuses_none_and_missing_margins() -> None:
    with pytest.raises(KarmaError, match="no ranking score"):
        method_scores("none", EXPLICIT, IMPLICIT)
    with pytest.raises(KarmaError, match="'map' needs margins that were not computed"):
        method_scores("map", EXPLICIT, None)


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [(10, 0.4, 4), (10, 1.0, 10), (3, 0.5, 1), (100, 0.29, 29), (7, 0.4, 2), (1, 1.0, 1)],
)
def test_n_keep_floor(n: int, ratio: float, k: int) -> None:
    assert n_keep(n, ratio) == k


def test_ratio_keeping_zero_pairs_is_a_clear_error() -> None:
    with pytest.raises(
        KarmaError,
        match=r"field 'select.ratio': keeps zero of 10 pairs \(got 0.05; expected ratio >= 1/10",
    ):
        n_keep(10, 0.05)
    with pytest.raises(KarmaError, match="keeps zero"):
        top_k([1.0, 2.0], ratio=0.4)
    with pytest.raises(KarmaError, match="expected a non-empty preference dataset"):
        n_keep(0, 0.5)
    with pytest.raises(KarmaError, match="field 'ratio': out of range"):
        n_keep(10, 0.0)  # the library function checks its argument too


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range_names_the_flag(ratio: float) -> None:
    with pytest.raises(KarmaError, match=r"^--ratio: out of range \(got .*expected 0 < ratio <= 1"):
        build_params(None, [("select.ratio", ratio, "--ratio")])


@pytest.mark.parametrize(
    ("key", "value", "label", "message"),
    [
        ("select.method", "mapp", "--method", "--method: not one of the choices; did you mean"
         " 'map'? (got 'mapp'; expected none | map | explicit | implicit | random)"),
        ("select.ratoi", 0.3, "-S select.ratoi", "-S select.ratoi: unknown key; did you mean"
         " 'ratio'?"),
        ("select.weight", -1.0, "--weight",
         "--weight: out of range (got -1.0; expected 0 <= weight)"),
        ("select.weight", math.inf, "--weight", "--weight: a finite number (got inf)"),
        ("select.dpo_beta", 0, "--dpo-beta", "--dpo-beta: out of range (got 0; expected 0 <"),
        ("select.batch_size", 0, "--batch-size", "--batch-size: out of range (got 0; expected"
         " 1 <= batch_size)"),
        ("select.max_tokens", 8, "--max-tokens", "--max-tokens: out of range"),
        ("select.max_length", 4, "--max-length", "--max-length: out of range"),
        ("select.explicit", "gap", "--explicit", "--explicit: not one of the choices"),
    ],
)  # fmt: skip
def test_select_settings_errors_name_the_flag(
    key: str, value: object, label: str, message: str
) -> None:
    with pytest.raises(KarmaError) as info:
        build_params(None, [(key, value, label)])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_select_settings_from_a_params_file_name_file_and_key(tmp_path: Path) -> None:
    good = build_params(None, [("select.ratio", 1, "--ratio"), ("select.method", "map", "--m")])
    assert good.select.ratio == 1.0 and isinstance(good.select.ratio, float)
    assert good.select.method == "map"
    f = tmp_path / "params.yaml"
    f.write_text("select:\n  method: map\n  ratio: 0\n")
    with pytest.raises(KarmaError, match=r"params.yaml: field 'select.ratio': out of range"):
        build_params(f)
    # a flag overrides the file, and then the error (if any) names the flag
    assert build_params(f, [("select.ratio", 0.5, "--ratio")]).select.ratio == 0.5
    with pytest.raises(KarmaError, match=r"^--ratio: out of range"):
        build_params(f, [("select.ratio", 2, "--ratio")])


# --------------------------------------------------------------------------- selection frame


def _implicit_frame(values: np.ndarray) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame(
        {
            "logp_chosen": np.zeros(n),
            "logp_rejected": -values,
            "n_tokens_chosen": np.ones(n, dtype=np.int64),
            "n_tokens_rejected": np.ones(n, dtype=np.int64),
            "margin_implicit": values,
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
    # map = [1.637935, -0.679131, -1.693887, 0.735083] (worked out above)
    assert m["map_score_mean_kept"] == pytest.approx((1.637935 + 0.735083) / 2, abs=1e-6)
    assert m["map_score_mean_dropped"] == pytest.approx((-0.679131 - 1.693887) / 2, abs=1e-6)
    r = np.corrcoef(EXPLICIT, IMPLICIT)[0, 1]
    assert m["pearson_explicit_implicit"] == pytest.approx(r, abs=1e-6)
    # Spearman: ranks of explicit [4, 1, 2.5, 2.5] vs implicit [4, 2, 1, 3]
    rs = np.corrcoef([4, 1, 2.5, 2.5], [4, 2, 1, 3])[0, 1]
    assert m["spearman_explicit_implicit"] == pytest.approx(rs, abs=1e-6)


def test_select_refuses_existing_score_columns_and_short_implicit() -> None:
    cfg = SelectConfig(method="map", ratio=0.5)
    with pytest.raises(KarmaError, match="field 'rank': already has score columns"):
        select(_hand_pairs().with_columns(rank=pl.lit(1)), cfg, implicit=_implicit_frame(IMPLICIT))
    with pytest.raises(KarmaError, match="needs implicit margins for all 4 pairs"):
        select(_hand_pairs(), cfg, implicit=_implicit_frame(IMPLICIT[:3]))


def test_rating_gap_without_ratings_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = synthetic_pairs(6, ratings=False)
    cfg = SelectConfig(method="map", explicit="rating_gap")
    with pytest.raises(KarmaError, match=r"'chosen_rating'.*6 of 6 pairs have no value"):
        select(pairs, cfg, implicit=_implicit_frame(np.zeros(6)))
    # in the full run it fails before any model is loaded
    monkeypatch.setattr(margins, "load_scorer", _no_model)
    path = tmp_path / "pairs.parquet"
    pairs.drop("chosen_rating", "rejected_rating").write_parquet(path)
    paths = SelectPaths(pairs=path, model=tmp_path / "no-model", out=tmp_path / "out")
    with pytest.raises(KarmaError, match=r"pairs.parquet: field 'chosen_rating': column missing"):
        run_select(Params(select=cfg), paths)


def test_rating_gap_with_ratings() -> None:
    pairs = synthetic_pairs(6)
    cfg = SelectConfig(method="explicit", explicit="rating_gap", ratio=0.5)
    scored = select(pairs, cfg, implicit=_implicit_frame(np.zeros(6)))
    gap = (pairs["chosen_rating"] - pairs["rejected_rating"]).to_list()
    assert scored["margin_explicit"].to_list() == gap


def test_read_pairs_errors(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="preference pairs not found"):
        read_pairs(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(KarmaError, match=r"junk\.parquet: not a readable parquet file"):
        read_pairs(tmp_path / "junk.parquet")
    synthetic_pairs(3).drop("chosen").write_parquet(tmp_path / "p.parquet")
    with pytest.raises(KarmaError, match=r"p.parquet: field 'chosen': column missing"):
        read_pairs(tmp_path / "p.parquet")
    synthetic_pairs(3).head(0).write_parquet(tmp_path / "empty.parquet")
    paths = SelectPaths(pairs=tmp_path / "empty.parquet", model=tmp_path, out=tmp_path / "o")
    with pytest.raises(KarmaError, match=r"empty\.parquet: no preference pairs"):
        run_select(Params(), paths)


def test_method_none_keeps_all_without_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(margins, "load_scorer", _no_model)
    pairs = synthetic_pairs(9)
    src = tmp_path / "pairs.parquet"
    pairs.write_parquet(src)
    paths = SelectPaths(
        pairs=src,
        model=tmp_path / "no-such-model",
        out=tmp_path / "out",
        metrics=tmp_path / "m.json",
        plot=tmp_path / "p.png",
    )
    metrics = run_select(Params(select=SelectConfig(method="none")), paths)
    kept = pl.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert kept.height == 9
    assert kept.columns == pairs.columns + list(SCORE_COLUMNS)
    assert kept.drop(list(SCORE_COLUMNS)).equals(pairs)
    assert kept["kept"].all()
    assert kept["rank"].to_list() == list(range(1, 10))
    assert kept["margin_implicit"].null_count() == 9
    gap = (pairs["s_pref_chosen"] - pairs["s_pref_rejected"]).to_numpy()
    np.testing.assert_allclose(kept["margin_explicit"].to_numpy(), gap, atol=1e-12)  # free
    assert metrics["pairs_kept"] == 9
    assert metrics["explicit_margin_mean_kept"] == pytest.approx(gap.mean(), abs=1e-6)
    assert metrics["explicit_margin_mean_dropped"] is None  # nothing dropped
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
    out: dict[str, list[float]] = {"chosen": [], "rejected": []}
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
    # several padded batches; cache off so the values are computed here
    cfg = SelectConfig(method="map", batch_size=3, max_tokens=400, cache=False)
    got = implicit_margins(pairs, tiny_model_dir, config=cfg, progress=False)
    chosen, rejected = _direct_mean_logps(tiny_model_dir, pairs)
    np.testing.assert_allclose(got["logp_chosen"].to_numpy(), chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["logp_rejected"].to_numpy(), rejected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        got["margin_implicit"].to_numpy(), chosen - rejected, atol=1e-5, rtol=0
    )
    assert np.ptp(got["margin_implicit"].to_numpy()) > 1e-4  # not trivially constant
    assert not cache_root("margins").exists()  # cache: false writes nothing


def test_hidden_and_full_logit_paths_agree(tiny_model_dir: Path) -> None:
    import torch

    model, tok = margins.load_scorer(tiny_model_dir, device="cpu")
    pairs = synthetic_pairs(5, seed=2)
    seqs = [
        encode_sequence(tok, row["prompt"], row["chosen"]) for row in pairs.iter_rows(named=True)
    ]
    with torch.inference_mode():
        kw: dict[str, Any] = {"pad_id": tok.pad_token_id, "device": torch.device("cpu")}
        s_h, c_h = margins._batch_logps(model, seqs, head="hidden", chunk=7, **kw)
        s_f, c_f = margins._batch_logps(model, seqs, head="full", **kw)
    assert c_h.tolist() == c_f.tolist() == [len(ids) - start for ids, start in seqs]
    np.testing.assert_allclose(s_h, s_f, rtol=1e-6, atol=1e-5)


def test_fast_path_falls_back_when_logits_are_post_processed(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    model, tok = margins.load_scorer(tiny_model_dir, device="cpu")
    seqs = [
        encode_sequence(tok, row["prompt"], row["rejected"])
        for row in synthetic_pairs(6, seed=8).iter_rows(named=True)
    ]
    kw: dict[str, Any] = {"pad_id": tok.pad_token_id, "batch_size": 4, "progress": False}
    good, _ = margins.sequence_logps(model, seqs, **kw)
    head = model.get_output_embeddings()
    # a model whose own forward post-processes logits differently from decoder + LM head
    model.get_output_embeddings = lambda: lambda h: 2.0 * head(h)  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="karma.selection.margins"):
        got, _ = margins.sequence_logps(model, seqs, **kw)
    assert "using logits" in caplog.text
    np.testing.assert_allclose(got, good, rtol=1e-6, atol=1e-5)
    with torch.inference_mode():
        wrong, _ = margins._batch_logps(
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
    batches = margins._batches(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_cache_hit_loads_no_model_and_returns_identical_values(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real = margins.load_scorer

    def load_once(path: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        if len(loads) > 1:
            raise AssertionError("model loaded again")
        return real(path, **kwargs)

    monkeypatch.setattr(margins, "load_scorer", load_once)
    pairs = synthetic_pairs(6, seed=9)
    cfg = SelectConfig(method="map", batch_size=4)
    first = implicit_margins(pairs, tiny_model_dir, config=cfg, progress=False)
    assert loads == [str(tiny_model_dir)]
    entries = list(cache_root("margins").glob("*.parquet"))  # the default: $KARMA_CACHE_DIR
    assert len(entries) == 1
    again = implicit_margins(pairs, tiny_model_dir, config=cfg, progress=False)
    assert again.equals(first)
    assert np.ptp(first["margin_implicit"].to_numpy()) > 1e-4  # real margins were cached
    # ranking settings are not part of the key: ratio / weight / method reuse the scores
    ranking = SelectConfig(method="explicit", ratio=0.9, weight=3.0, batch_size=4)
    assert implicit_margins(pairs, tiny_model_dir, config=ranking, progress=False).equals(first)
    assert len(loads) == 1
    # other data, other scoring settings, a reference model or cache off -> a miss (a load)
    misses: list[tuple[pl.DataFrame, SelectConfig, dict[str, Any]]] = [
        (pairs.with_columns(pl.col("chosen").reverse()), cfg, {}),
        (pairs, SelectConfig(method="map", batch_size=5), {}),
        (pairs, SelectConfig(method="map", batch_size=4, max_length=512), {}),
        (pairs, cfg, {"reference_dir": tiny_model_dir}),
        (pairs, SelectConfig(method="map", batch_size=4, cache=False), {}),
    ]
    for data, config, extra in misses:
        with pytest.raises(AssertionError, match="model loaded again"):
            implicit_margins(data, tiny_model_dir, config=config, progress=False, **extra)
    assert len(list(cache_root("margins").glob("*.parquet"))) == 1


def test_corrupt_cache_entry_is_recomputed(tiny_model_dir: Path) -> None:
    pairs = synthetic_pairs(4, seed=3)
    cfg = SelectConfig(method="map")
    first = implicit_margins(pairs, tiny_model_dir, config=cfg, progress=False)
    (entry,) = cache_root("margins").glob("*.parquet")
    entry.write_bytes(b"garbage")
    again = implicit_margins(pairs, tiny_model_dir, config=cfg, progress=False)
    assert again.equals(first)
    assert pl.read_parquet(entry).height == 4  # rewritten


def test_cache_key_reads_the_model_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache_key`` digests the model with the stat-keyed memo: no re-read while unchanged."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\x01" * 4096)
    pairs = synthetic_pairs(3)
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        if model in self.parents:
            opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    key = margins.cache_key(pairs, model)
    assert sorted(opened) == ["config.json", "model.safetensors"]  # first call: hashed
    assert len([p for p in cache_root("digests").rglob("*") if p.is_file()]) == 1  # memo entry
    opened.clear()
    assert margins.cache_key(pairs, model) == key
    assert opened == []  # second call: the memo answers, no model file is read
    # a new mtime (same content) -> digested again, same key
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert margins.cache_key(pairs, model) == key
    assert sorted(opened) == ["config.json", "model.safetensors"]
    # new content -> a new key
    opened.clear()
    (model / "model.safetensors").write_bytes(b"\x02" * 4096)
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert margins.cache_key(pairs, model) != key
    assert "model.safetensors" in opened
    # the data and the scoring settings are part of the key, ranking settings are not
    new = margins.cache_key(pairs, model)
    assert margins.cache_key(pairs.reverse(), model) != new
    assert margins.cache_key(pairs, model, config=SelectConfig(max_tokens=4096)) != new
    assert margins.cache_key(pairs, model, config=SelectConfig(ratio=0.9, weight=2.0)) == new


def test_dpo_form_with_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref_dir = build_tiny_model(tmp_path / "ref", seed=1)
    pairs = synthetic_pairs(5, seed=4)
    kw: dict[str, Any] = {"config": SelectConfig(method="map", cache=False), "progress": False}
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
    # the logp columns stay those of the scored model (the policy), token-averaged
    assert dpo["logp_chosen"].equals(pi["logp_chosen"])


# --------------------------------------------------------------------------- stage


def _read_outputs(root: Path) -> dict[str, bytes]:
    from karma.core.io import MARKER  # a staged directory output carries karma's marker

    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _reference_selection(scores: pl.DataFrame, method: str, *, seed: int) -> np.ndarray:
    """Ranking score of every pair, recomputed with plain numpy from the raw columns."""
    gap = np.round((scores["s_pref_chosen"] - scores["s_pref_rejected"]).to_numpy(), 12)
    implicit = (scores["logp_chosen"] - scores["logp_rejected"]).to_numpy()

    def z(x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / x.std()

    if method == "map":
        return z(gap) - 1.0 * z(np.abs(implicit))
    if method == "explicit":
        return z(gap)
    if method == "implicit":
        return -z(np.abs(implicit))
    return np.random.default_rng(seed).random(len(gap))


@pytest.mark.parametrize("method", ["map", "explicit", "implicit", "random"])
def test_select_stage_matches_numpy_reference_and_is_deterministic(
    tiny_model_dir: Path, tmp_path: Path, method: str
) -> None:
    from scipy.stats import rankdata

    pairs = synthetic_pairs(20, seed=7)
    src = tmp_path / "pairs.parquet"
    pairs.write_parquet(src)
    outputs = []
    # a cache miss and a cache hit (and for map also two runs without the cache, which score
    # the pairs twice): all byte-identical
    runs = [("a", True), ("b", True)]
    if method == "map":
        runs += [("c", False), ("d", False)]
    for run, cache in runs:
        root = tmp_path / run
        cfg = SelectConfig(method=method, ratio=0.4, cache=cache)  # type: ignore[arg-type]
        paths = SelectPaths(
            pairs=src,
            model=tiny_model_dir,
            out=root / "data",
            metrics=root / "m.json",
            plot=root / "p.png",
        )
        execute(potential.STAGE, Params(seed=1, select=cfg), paths)
        outputs.append(_read_outputs(root))
    assert all(out == outputs[0] for out in outputs[1:])
    assert len(list(cache_root("margins").glob("*.parquet"))) == 1  # run b reused run a's
    assert set(outputs[0]) == {"data/pairs.parquet", "data/scores.parquet", "m.json", "p.png"}
    kept = pl.read_parquet(tmp_path / "a" / "data" / "pairs.parquet")
    scores = pl.read_parquet(tmp_path / "a" / "data" / "scores.parquet")
    assert kept.height == 8 and scores.height == 20
    assert kept.equals(scores.filter("kept"))
    assert scores.drop(list(SCORE_COLUMNS)).equals(pairs)

    # the selection, recomputed independently: numpy z-scores, stable sort (ties: row order)
    ref = _reference_selection(scores, method, seed=1)
    order = np.argsort(-ref, kind="stable")
    want_rank = np.empty(20, dtype=np.int64)
    want_rank[order] = np.arange(1, 21)
    np.testing.assert_allclose(scores["score"].to_numpy(), ref, rtol=1e-9, atol=1e-12)
    assert scores["rank"].to_list() == want_rank.tolist()
    keep = want_rank <= 8
    assert scores["kept"].to_list() == keep.tolist()
    if method != "random":  # a real ranking: keeping the top 8 is not keeping the first 8
        assert keep.tolist() != [True] * 8 + [False] * 12

    # the metrics, recomputed from the same raw columns
    m = json.loads((tmp_path / "a" / "m.json").read_text())
    gap = (scores["s_pref_chosen"] - scores["s_pref_rejected"]).to_numpy()
    implicit = (scores["logp_chosen"] - scores["logp_rejected"]).to_numpy()
    z_map = _reference_selection(scores, "map", seed=1)
    assert m["pairs_in"] == 20 and m["pairs_kept"] == 8 and m["kept_fraction"] == 0.4
    for name, values in (("explicit_margin", gap), ("implicit_abs", np.abs(implicit)),
                         ("implicit_margin", implicit), ("map_score", z_map)):  # fmt: skip
        assert m[f"{name}_mean_kept"] == pytest.approx(values[keep].mean(), abs=2e-6), name
        assert m[f"{name}_mean_dropped"] == pytest.approx(values[~keep].mean(), abs=2e-6), name
    assert m["pearson_explicit_implicit"] == pytest.approx(
        np.corrcoef(gap, implicit)[0, 1], abs=2e-6
    )
    assert m["spearman_explicit_implicit"] == pytest.approx(
        np.corrcoef(rankdata(gap), rankdata(implicit))[0, 1], abs=2e-6
    )
    assert all(v is None or math.isfinite(v) for v in m.values())


def test_cli_select(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "pairs.parquet"
    synthetic_pairs(10).write_parquet(src)
    out = tmp_path / "o"
    args = ["select", "--pairs", str(src), "--model", str(tiny_model_dir), "--out", str(out)]
    code, stdout, err = _cli(
        [*args, "--method", "implicit", "--ratio", "0.3", "--no-cache"], capsys
    )
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["pairs_kept"] == 3 and metrics["pairs_in"] == 10
    assert pl.read_parquet(out / "pairs.parquet")["rank"].sort().to_list() == [1, 2, 3]
    assert not cache_root("margins").exists()  # --no-cache
    # the default method keeps every pair, in input order
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["pairs_kept"] == 10
    # errors: one line, exit 1, no model loaded, the previous output left as it was
    before = _read_outputs(out)
    monkeypatch.setattr(margins, "load_scorer", _no_model)
    cases = [
        (["--method", "map", "--ratio", "0.05"], "--ratio: keeps zero of 10 pairs"),
        (["--ratio", "0"], "--ratio: out of range (got 0; expected 0 < ratio <= 1)"),
        (["--method", "mapp"], "--method: not one of the choices; did you mean 'map'?"),
        (["-S", "select.wieght=2"], "-S select.wieght: unknown key; did you mean 'weight'?"),
    ]
    for extra, needle in cases:
        code, stdout, err = _cli([*args, *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 1, (extra, err)
        assert stdout == ""
        assert len(lines) == 1 and lines[0].startswith("karma: error: "), err
        assert needle in lines[0], lines[0]
        assert _read_outputs(out) == before
    # --no-cache touched no cache at all (not even the model digest memo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "pairs.parquet"]


@pytest.mark.slow
def test_stage_script_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``python stages/select.py`` (dvc.yaml: -m stages.select), settings from params.yaml."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    (tmp_path / "data" / "preferences").mkdir(parents=True)
    synthetic_pairs(15).write_parquet(tmp_path / "data" / "preferences" / "pairs.parquet")
    params = (
        "seed: 3\nselect:\n  method: map\n  ratio: 0.4\n  weight: 1.0\n  explicit: s_pref_gap\n"
    )
    (tmp_path / "params.yaml").write_text(params)
    env = {**os.environ, "KARMA_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(REPO / "stages" / "select.py"),
        "--pairs", "data/preferences/pairs.parquet",
        "--model", "models/base",
        "--out", "data/selected",
        "--metrics", "metrics/select.json",
        "--plot", "plots/select/margins.png",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(tmp_path / "data" / "selected" / "pairs.parquet").height == 6
    assert json.loads((tmp_path / "metrics" / "select.json").read_text())["pairs_kept"] == 6
    plot = (tmp_path / "plots" / "select" / "margins.png").read_bytes()
    assert plot[:4] == b"\x89PNG" and len(plot) > 1000
    assert len(list((tmp_path / "cache" / "margins").glob("*.parquet"))) == 1
    # a bad value in params.yaml: one line naming the file and the key
    (tmp_path / "params.yaml").write_text(params.replace("0.4", "0"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "karma: error: params.yaml: field 'select.ratio': out of range "
        "(got 0; expected 0 < ratio <= 1)"
    ]
    # a ratio that keeps no pair of this data set
    (tmp_path / "params.yaml").write_text(params.replace("0.4", "0.01"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "karma: error: params.yaml: field 'select.ratio': keeps zero of 15 pairs"
    )
    assert "Traceback" not in proc.stderr


def test_stored_logps_skip_the_forward_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairs carrying the policy's stored mean log-probs get the logp_mean margin from them,
    with no model loaded; the ranking is MAP's on that margin."""
    monkeypatch.setattr(margins, "load_scorer", _no_model)
    pairs = synthetic_pairs(8).with_columns(
        chosen_logp_mean=pl.Series([-1.0, -2.0, -0.5, -3.0, -1.5, -2.5, -0.7, -1.1]),
        rejected_logp_mean=pl.Series([-1.2, -1.0, -0.6, -3.5, -1.5, -2.0, -2.7, -1.0]),
    )
    src = tmp_path / "pairs.parquet"
    pairs.write_parquet(src)
    paths = SelectPaths(pairs=src, model=tmp_path / "no-model", out=tmp_path / "out")
    cfg = SelectConfig(method="map", ratio=0.5, weight=2.0)
    run_select(Params(select=cfg), paths)
    scored = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    gap = (pairs["chosen_logp_mean"] - pairs["rejected_logp_mean"]).to_numpy()
    np.testing.assert_allclose(scored["margin_implicit"].to_numpy(), gap)
    assert scored["n_tokens_chosen"].null_count() == 8
    expected = select(pairs, cfg, implicit=_implicit_frame(gap))
    assert scored["rank"].to_list() == expected["rank"].to_list()
    bad = pairs.with_columns(chosen_logp_mean=pl.lit(None, dtype=pl.Float64))
    with pytest.raises(KarmaError, match="field 'chosen_logp_mean': stored log-probs must be"):
        margins.stored_margins(bad)


def test_implicit_form_and_reference_must_agree(tmp_path: Path) -> None:
    """implicit_form dpo needs --reference; logp_mean refuses one (one line each)."""
    src = tmp_path / "pairs.parquet"
    synthetic_pairs(4).write_parquet(src)
    paths = SelectPaths(pairs=src, model=tmp_path, out=tmp_path / "out")
    dpo = SelectConfig(method="map", implicit_form="dpo", ratio=0.5)
    with pytest.raises(KarmaError, match=r"'select\.implicit_form': the DPO-form .* needs a ref"):
        run_select(Params(select=dpo), paths)
    with_ref = SelectPaths(pairs=src, model=tmp_path, reference=tmp_path, out=tmp_path / "out")
    with pytest.raises(KarmaError, match=r"'--reference': a reference model is used only by"):
        run_select(Params(select=SelectConfig(method="map", ratio=0.5)), with_ref)
