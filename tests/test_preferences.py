"""Pairing rules on hand-made instructions, kernel vs the plain-Python reference, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma import preferences as P
from karma.errors import KarmaError
from karma.ultrafeedback import from_records, read_ultrafeedback

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo/ultrafeedback_demo.jsonl"
SCORES = REPO / "data/origin/scores.csv"

# Hand-made pool. S_pref: A .9, B .7, E .7 (ties B), C .5, F .5 (ties C), D .3.
S_PREF = {"A": 0.9, "B": 0.7, "C": 0.5, "D": 0.3, "E": 0.7, "F": 0.5, "G": 0.6}
KIN = {  # symmetric; pairs absent here are unknown (NaN) -> never eligible
    ("A", "B"): 0.05,  # not kin at tau 0.1
    ("A", "C"): 0.6,
    ("A", "D"): 0.8,
    ("B", "C"): 0.9,
    ("B", "D"): 0.5,
    ("C", "D"): 0.3,
    ("B", "E"): 0.95,
    ("C", "E"): 0.4,
    ("A", "F"): 0.6,
    ("C", "F"): 0.0,
    ("A", "G"): 0.8,
}


def _kin_frame(kin: dict[tuple[str, str], float] = KIN) -> pl.DataFrame:
    rows = [(a, b, v) for (a, b), v in kin.items()] + [(b, a, v) for (a, b), v in kin.items()]
    return pl.DataFrame(rows, schema=["model_a", "model_b", "kinship"], orient="row")


def _sp_frame(sp: dict[str, float] = S_PREF) -> pl.DataFrame:
    return pl.DataFrame({"model": list(sp), "s_pref": list(sp.values())})


def _rec(instruction: str, *comps: tuple) -> dict:
    """comps: (model, response[, overall_score])."""
    out = []
    for c in comps:
        d = {"model": c[0], "response": c[1]}
        if len(c) > 2:
            d["overall_score"] = c[2]
        out.append(d)
    return {"instruction": instruction, "completions": out}


HAND = [
    # 0: eligible A-C .6, A-D .8, B-C .9, B-D .5, C-D .3 (A-B .05 is not kin)
    #    score: max mean S_pref = A-C (.7) -> chosen A, rejected C
    #    sim: max kinship = B-C (.9) -> chosen B, rejected C
    #    score_sim: best candidate with a partner = A; its most-kin partner = D (.8)
    _rec("i0", ("A", "a0"), ("B", "b0"), ("C", "c0"), ("D", "d0")),
    # 1: B-E is the best pair for every strategy, and S_pref ties -> drop "tie"
    _rec("i1", ("B", "b1"), ("E", "e1"), ("C", "c1")),
    # 2: A-F and A-C tie on mean S_pref (.7) and kinship (.6) -> the first pair (A, F) wins
    _rec("i2", ("A", "a2"), ("F", "f2"), ("C", "c2")),
    # 3: only A-B, not kin -> "no_eligible_pair" (random ignores kinship: A over B)
    _rec("i3", ("A", "a3"), ("B", "b3")),
    # 4: one known model, three non-blank responses -> "unknown_models"
    _rec("i4", ("A", "a4"), ("zz", "z4"), ("yy-unknown", "y4")),
    # 5: B's response is blank -> one candidate, one non-blank -> "too_few_candidates"
    _rec("i5", ("A", "a5"), ("B", "   ")),
    # 6: identical text -> "identical_text"
    _rec("i6", ("A", "same"), ("C", "same")),
    # 7: names match case-insensitively; sim: C-D .3 vs A-C .6 -> A, C
    _rec("i7", (" a ", "a7"), ("c", "c7"), ("D", "d7")),
    # 8: A-D and A-G both .8 (D-G unknown): score -> A-G (mean .75); sim -> kinship tie ->
    #    higher mean S_pref -> A-G; score_sim -> A's partners tie on kinship -> higher S_pref G
    _rec("i8", ("A", "a8"), ("D", "d8"), ("G", "g8")),
]

EXPECTED = {  # instruction -> (chosen_model, rejected_model) or drop reason
    "score": [
        "A/C",
        "tie",
        "A/F",
        "no_eligible_pair",
        "unknown_models",
        "too_few_candidates",
        "identical_text",
        " a /c",
        "A/G",
    ],
    "sim": [
        "B/C",
        "tie",
        "A/F",
        "no_eligible_pair",
        "unknown_models",
        "too_few_candidates",
        "identical_text",
        " a /D",
        "A/G",
    ],
    "score_sim": [
        "A/D",
        "tie",
        "A/F",
        "no_eligible_pair",
        "unknown_models",
        "too_few_candidates",
        "identical_text",
        " a /D",
        "A/G",
    ],
}


def _outcomes(result: P.PreferenceResult, n: int) -> list[str]:
    by_prompt = {
        r["prompt"][0]["content"]: f"{r['chosen_model']}/{r['rejected_model']}"
        for r in result.pairs.iter_rows(named=True)
    }
    return [by_prompt.get(f"i{i}", "dropped") for i in range(n)]


@pytest.mark.parametrize("strategy", ["score", "sim", "score_sim"])
def test_hand_made_karma(strategy: str) -> None:
    data = from_records([(f"line {i}", r) for i, r in enumerate(HAND)], file="hand")
    res = P.make_pairs(data, _sp_frame(), _kin_frame(), strategy=strategy, tau=0.1, seed=0)
    got = _outcomes(res, len(HAND))
    want = EXPECTED[strategy]
    assert [g for g, w in zip(got, want, strict=True) if "/" in w] == [w for w in want if "/" in w]
    kept = [w for w in want if "/" in w]
    drops = [w for w in want if "/" not in w]
    assert res.counts["pairs"] == len(kept)
    for reason in P.REASONS[1:]:
        assert res.counts[f"drop_{reason}"] == drops.count(reason), reason
    for g, w in zip(got, want, strict=True):
        if "/" not in w:
            assert g == "dropped"
    # chosen always has the higher S_pref; kinship is that of the two models
    p = res.pairs
    assert (p["s_pref_chosen"] > p["s_pref_rejected"]).all()
    row = p.filter(pl.col("prompt").list.get(0).struct.field("content") == "i0").row(0, named=True)
    assert row["kinship"] == {"score": 0.6, "sim": 0.9, "score_sim": 0.8}[strategy]


def test_hand_made_tau_and_random() -> None:
    data = from_records([(f"line {i}", r) for i, r in enumerate(HAND)], file="hand")
    # tau 0.85: only B-C (.9) and B-E (.95) are kin
    res = P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="score", tau=0.85)
    got = _outcomes(res, len(HAND))
    assert got[0] == "B/C"  # A-C is no longer kin
    assert res.counts["drop_no_eligible_pair"] == 5  # i2, i3, i6, i7, i8
    # random ignores kinship: i3 (A-B, not kin) is paired, ordered by S_pref
    rnd = P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="random", seed=0)
    out = _outcomes(rnd, len(HAND))
    assert out[3] == "A/B"
    assert rnd.counts["drop_no_eligible_pair"] == 0
    assert (rnd.pairs["s_pref_chosen"] > rnd.pairs["s_pref_rejected"]).all()
    # i0 has 6 candidate pairs: across seeds every pair shows up, each seed is reproducible
    seen = set()
    for seed in range(60):
        r = P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="random", seed=seed)
        o = _outcomes(r, len(HAND))[0]
        assert (
            o
            == _outcomes(
                P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="random", seed=seed), 1
            )[0]
        )
        seen.add(o)
    assert seen == {"A/B", "A/C", "A/D", "B/C", "B/D", "C/D"}


def test_hand_made_rlaif() -> None:
    recs = [
        # chosen = the 9 (first of the two 9s), rejected = the only lower-rated one (8); N/A skipped
        _rec("r0", ("x", "a", 8), ("y", "b", 9), ("z", "c", "N/A"), ("w", "d", 9)),
        _rec("r1", ("x", "a", 7), ("y", "b", "7")),  # all tie -> "tie"
        _rec("r2", ("x", "a", 7), ("y", "b")),  # one rated -> "too_few_candidates"
        _rec("r3", ("x", "a", "6.5"), ("y", "", 9), ("z", "c", 3)),  # blank skipped: x over z
        _rec("r4", ("x", "t", 9), ("y", "t", 2)),  # identical text
    ]
    data = from_records([(f"line {i}", r) for i, r in enumerate(recs)], file="hand")
    res = P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="rlaif", seed=3)
    rows = {r["prompt"][0]["content"]: r for r in res.pairs.iter_rows(named=True)}
    assert set(rows) == {"r0", "r3"}
    assert rows["r0"]["chosen"][0]["content"] == "b"
    assert rows["r0"]["rejected"][0]["content"] == "a"
    assert (rows["r0"]["chosen_rating"], rows["r0"]["rejected_rating"]) == (9.0, 8.0)
    assert rows["r3"]["chosen_model"] == "x" and rows["r3"]["rejected_model"] == "z"
    assert rows["r3"]["kinship"] is None and rows["r3"]["s_pref_chosen"] is None
    c = res.counts
    assert (c["drop_tie"], c["drop_too_few_candidates"], c["drop_identical_text"]) == (1, 1, 1)
    assert res.metrics["rating_agree"] == 1.0
    # the rejected one is a seeded choice among the lower-rated ones
    many = _rec("r", ("a", "A", 9), ("b", "B", 1), ("c", "C", 2), ("d", "D", 3))
    d2 = from_records([("line 1", many)], file="m")
    picks = {
        P.make_pairs(d2, {}, _kin_frame(), strategy="rlaif", seed=s).pairs["rejected_model"][0]
        for s in range(40)
    }
    assert picks == {"b", "c", "d"}


def test_bad_args() -> None:
    data = from_records([("line 1", HAND[0])], file="hand")
    with pytest.raises(KarmaError, match="unknown pairing strategy; did you mean 'score_sim'"):
        P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="score-sim")
    with pytest.raises(KarmaError, match="seed"):
        P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="score", seed=-1)
    with pytest.raises(KarmaError, match="tau"):
        P.make_pairs(data, _sp_frame(), _kin_frame(), strategy="score", tau=math.nan)
    with pytest.raises(KarmaError, match="rating"):
        P.PreferencesConfig(rating="stars")


# --------------------------------------------------------------------------- kernel vs reference
@st.composite
def _pools(draw: st.DrawFn) -> tuple:
    m = draw(st.integers(2, 6))
    names = [f"m{i}" for i in range(m)]
    sp_vals = st.sampled_from([0.1, 0.4, 0.4, 0.7, 1.0, math.nan])
    sp = {n: draw(sp_vals) for n in names}
    kin: dict[tuple[str, str], float] = {}
    for i in range(m):
        for j in range(i + 1, m):
            v = draw(st.sampled_from([-0.2, 0.05, 0.1, 0.3, 0.3, 0.9, math.nan]))
            kin[(names[i], names[j])] = kin[(names[j], names[i])] = v
    comp = st.tuples(
        st.sampled_from([*names, "unknown"]),
        st.sampled_from(["x", "y", "z", "w", "", " "]),
        st.sampled_from([None, 1.0, 5.0, 5.0, 9.0]),
    )
    recs = draw(st.lists(st.lists(comp, min_size=0, max_size=5), min_size=1, max_size=25))
    return sp, kin, recs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=_pools(),
    strategy=st.sampled_from(P.STRATEGIES),
    seed=st.integers(0, 2**40),
    tau=st.sampled_from([0.1, 0.3, -1.0]),
)
def test_kernel_matches_reference(pool: tuple, strategy: str, seed: int, tau: float) -> None:
    sp, kin, recs = pool
    records = [
        {
            "instruction": f"q{i}",
            "completions": [{"model": m, "response": r, "overall_score": s} for m, r, s in comps],
        }
        for i, comps in enumerate(recs)
    ]
    data = from_records([(f"line {i}", r) for i, r in enumerate(records)], file="h")
    kin_frame = pl.DataFrame(
        [(a, b, v) for (a, b), v in kin.items()],
        schema=["model_a", "model_b", "kinship"],
        orient="row",
    )
    res = P.make_pairs(data, _sp_frame(sp), kin_frame, strategy=strategy, tau=tau, seed=seed)
    sp_ref = {k: v for k, v in sp.items() if not math.isnan(v)}
    got = {r["prompt"][0]["content"]: r for r in res.pairs.iter_rows(named=True)}
    reasons = {r: 0 for r in P.REASONS}
    for i, rec in enumerate(records):
        comps = rec["completions"]
        a, b, why = P.reference_pair(
            comps, sp_ref, kin, strategy=strategy, tau=tau, seed=seed, row=i
        )
        reasons[why] += 1
        row = got.get(f"q{i}")
        if why != "kept":
            assert row is None, (i, why)
            continue
        assert row is not None, (i, comps)
        assert row["chosen"][0]["content"] == comps[a]["response"]
        assert row["rejected"][0]["content"] == comps[b]["response"]
        assert row["chosen_model"] == comps[a]["model"]
        assert row["rejected_model"] == comps[b]["model"]
    assert res.counts["pairs"] == reasons["kept"]
    for r in P.REASONS[1:]:
        assert res.counts[f"drop_{r}"] == reasons[r], r


def test_splitmix_kernel_matches_python() -> None:
    offsets = np.array([0, 3], dtype=np.int64)
    for seed in (0, 1, 2**40 + 7):
        _, r, _ = P.pair_arrays(
            offsets,
            np.array([0, 1, 2]),
            np.ones(3, bool),
            np.array([9.0, 1.0, 2.0]),
            np.array([0.5, 0.4, 0.3]),
            np.full((3, 3), np.nan),
            strategy="rlaif",
            seed=seed,
        )
        assert r[0] == 1 + P.splitmix64(seed, 0) % 2


# --------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def demo_kinship() -> tuple[pl.DataFrame, pl.DataFrame]:
    return P.kinship_from_scores(SCORES)


def test_demo_all_strategies(demo_kinship: tuple, tmp_path: Path) -> None:
    models, kin = demo_kinship
    from trl.data_utils import is_conversational

    results = {}
    for strategy in P.STRATEGIES:
        res = P.run_preferences(DEMO, models, kin, strategy=strategy, seed=0)
        results[strategy] = res
        assert res.counts["pairs"] >= 250, (strategy, res.counts)
        assert (
            sum(v for k, v in res.counts.items() if k.startswith("drop_")) + res.counts["pairs"]
            == 480
        )
        assert res.counts["completions"] == 1920
        assert res.counts["completions_unknown_model"] > 0  # ultralm-65b
        ex = res.pairs.row(0, named=True)
        assert is_conversational(ex)
        assert [m["role"] for m in ex["prompt"]] == ["user"]
        assert [m["role"] for m in ex["chosen"]] == ["assistant"]
        assert [m["role"] for m in ex["rejected"]] == ["assistant"]
        assert list(res.pairs.columns) == list(P.OUTPUT_COLUMNS)
        assert res.pairs["prompt_id"].n_unique() == res.pairs.height
        assert "ultralm-65b" not in set(res.pairs["chosen_model"]) or strategy == "rlaif"
        if strategy != "rlaif":
            assert (res.pairs["s_pref_chosen"] > res.pairs["s_pref_rejected"]).all()
        if strategy in ("score", "sim", "score_sim"):
            assert (res.pairs["kinship"] >= 0.1).all()
    # strategies differ, and do what they say on average
    assert results["sim"].metrics["mean_kinship"] > results["score"].metrics["mean_kinship"]
    assert results["sim"].metrics["mean_kinship"] > results["random"].metrics["mean_kinship"]
    assert results["rlaif"].metrics["rating_agree"] == 1.0
    assert not results["sim"].pairs.equals(results["score"].pairs)


def test_byte_identical_and_hf_loadable(demo_kinship: tuple, tmp_path: Path) -> None:
    models, kin = demo_kinship
    paths = []
    for k in range(2):
        res = P.run_preferences(DEMO, models, kin, strategy="score_sim", seed=0)
        out = tmp_path / f"run{k}" / "pairs.parquet"
        P.write_outputs(
            res,
            pairs_path=out,
            dataset=str(DEMO),
            params={"kinship": "score_sim"},
            card_path=out.with_name("README.md"),
            metrics_path=out.with_name("m.json"),
            plot_path=out.with_name("p.png"),
        )
        paths.append(out)
    for name in ("pairs.parquet", "README.md", "m.json", "p.png"):
        a, b = (p.with_name(name).read_bytes() for p in paths)
        assert a == b, name
    card = paths[0].with_name("README.md").read_text()
    assert card.startswith("---\n") and "path: pairs.parquet" in card
    metrics = json.loads(paths[0].with_name("m.json").read_text())
    assert metrics["pairs"] == res.counts["pairs"] and metrics["strategy"] == "score_sim"
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(paths[0]), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(ds) == res.counts["pairs"]
    ex = ds[0]
    assert ex["prompt"][0]["role"] == "user" and isinstance(ex["chosen"][0]["content"], str)
    assert set(P.OUTPUT_COLUMNS) == set(ds.column_names)


def test_chat_template_applies(demo_kinship: tuple, tiny_model_dir: Path) -> None:
    """TRL's conversational preprocessing accepts a row unchanged."""
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    models, kin = demo_kinship
    res = P.run_preferences(DEMO, models, kin, strategy="sim")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = res.pairs.select("prompt", "chosen", "rejected").row(0, named=True)
    out = maybe_apply_chat_template(ex, tok)
    assert ex["chosen"][0]["content"] in out["chosen"]
    assert ex["prompt"][0]["content"] in out["prompt"]


# --------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from karma.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.parquet"
    code, stdout, _ = _cli(
        [
            "preferences",
            "--scores",
            str(SCORES),
            "--dataset",
            str(DEMO),
            "--kinship",
            "sim",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "strategy sim" in stdout and "pairs from 480 instructions" in stdout
    assert pl.read_parquet(out).height > 250


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"instruction": "a", "completions": []}\n{bad json\n', "malformed JSON on line 2"),
        ("", "empty file"),
        (
            '{"instruction": "a", "completions": [{"model": "gpt-4", "response": "r", '
            '"overall_score": "good"}]}\n',
            "rating is not a number",
        ),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, pattern: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    out = tmp_path / "out" / "p.parquet"
    code, _, err = _cli(
        [
            "preferences",
            "--scores",
            str(SCORES),
            "--dataset",
            str(bad),
            "--kinship",
            "score",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("karma: error:") and pattern in lines[0]
    assert not out.exists()
    assert not list(tmp_path.rglob("*.parquet*"))


def test_stage_config_defaults() -> None:
    from karma.config import from_dict, load_params, section

    params = load_params(REPO / "params.yaml")
    cfg = from_dict(
        P.PreferencesConfig, section(params, "preferences"), where="params.yaml:preferences"
    )
    assert Path(REPO / cfg.dataset).is_file()
    assert params["kinship"] in P.STRATEGIES
    with pytest.raises(KarmaError, match="unknown key"):
        from_dict(P.PreferencesConfig, {"datset": "x"}, where="params.yaml:preferences")


def test_reads_real_layout_all_strategies(tmp_path: Path, demo_kinship: tuple) -> None:
    """A local file in the real UltraFeedback layout gives valid pairs with every strategy."""
    aspect = {"Rating": "N/A", "Rationale": "..."}

    def comp(model: str, text: str, score: float) -> dict:
        return {
            "annotations": {"honesty": aspect, "helpfulness": {**aspect, "Type": ["1"]}},
            "critique": "...",
            "custom_system_prompt": "...",
            "fine-grained_score": 3.5,
            "model": model,
            "overall_score": score,
            "principle": "honesty",
            "response": text,
        }

    recs = [
        {
            "source": "flan_v2_niv2",
            "instruction": f"Task {i}",
            "models": ["..."],
            "completions": [
                comp("gpt-4", f"g{i}", 9.0),
                comp("llama-2-70b-chat", f"l{i}", 7.5),
                comp("ultralm-65b", f"u{i}", 6.0),
                comp("pythia-12b", f"p{i}", 2.0),
            ],
            "correct_answers": ["None"],
            "incorrect_answers": ["None"],
        }
        for i in range(6)
    ]
    path = tmp_path / "uf.parquet"
    pl.DataFrame(recs).write_parquet(path)
    models, kin = demo_kinship
    for strategy in P.STRATEGIES:
        res = P.run_preferences(path, models, kin, strategy=strategy)
        assert res.counts["pairs"] == 6, strategy
        assert "ultralm-65b" not in set(res.pairs["rejected_model"]) or strategy == "rlaif"
    assert read_ultrafeedback(path).completions.height == 24


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=0, max_size=20))
def test_prompt_ids_match_reference(texts: list[str]) -> None:
    s = pl.Series(texts, dtype=pl.String)
    got = P.prompt_ids(s).to_list()
    assert got == [P.prompt_id(t) for t in texts]
    assert all(len(h) == 32 for h in got)
    if len(texts) > 2:  # a slice (non-zero arrow offset) hashes the same
        assert P.prompt_ids(s.slice(1, 2)).to_list() == got[1:3]


def test_tau_outside_kinship_range_is_a_clear_error() -> None:
    from karma.preferences import check_args

    with pytest.raises(KarmaError, match=r"field 'similarity.tau': out of range.*got 2.5"):
        check_args("sim", 2.5, 0)


def test_no_pair_at_all_is_an_error_not_an_empty_dataset(tmp_path: Path) -> None:
    from karma.preferences import run_preferences

    data = tmp_path / "uf.jsonl"
    record = {
        "instruction": "Say hi.",
        "completions": [
            {"model": "a", "response": "hi", "overall_score": 5},
            {"model": "b", "response": "hello", "overall_score": 3},
        ],
    }
    data.write_text(json.dumps(record) + "\n")
    models = pl.DataFrame({"model": ["a", "b"], "s_pref": [0.9, 0.1]})
    kin = pl.DataFrame({"model_a": ["a", "b"], "model_b": ["b", "a"], "kinship": [0.05, 0.05]})
    with pytest.raises(KarmaError, match=r"no preference pair.*no_eligible_pair 1"):
        run_preferences(data, models, kin, strategy="score", tau=0.1)
    ok = run_preferences(data, models, kin, strategy="score", tau=0.0)
    assert ok.pairs["chosen_model"].to_list() == ["a"]
