"""The judge: strict parsing (counted, excluded), the probability-weighted rating, the reward
model (batched = per completion), remote code only when trusted, UltraFeedback records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from karma.judging.judge import SCORE_SCHEMA, records
from karma.judging.llm_judge import parse_rating

COMPS = pl.DataFrame(
    {
        "prompt_id": ["a", "a", "b"],
        "prompt": ["Name a color.", "Name a color.", "Count."],
        "model": ["m1", "m2", "m1"],
        "sample": [0, 0, 0],
        "text": ["Red.", "Blue sky", "1 2 3"],
        "logprob_mean": [-1.0, -2.0, -0.5],
    }
)


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("5", (5, "ok")),
        ("Rating: 3", (3, "ok")),
        ("rating=2.", (2, "ok")),
        ("4/5", (4, "ok")),
        ("0", (None, "out_of_range")),
        ("6", (None, "out_of_range")),
        ("10", (None, "out_of_range")),
        ("3.5", (None, "malformed")),
        ("I'd say 4", (None, "malformed")),
        ("4 because", (None, "malformed")),
        ("", (None, "missing")),
        (None, (None, "missing")),
        ("  \n", (None, "missing")),
    ],
)
def test_parse_rating_is_strict(reply: str | None, want: tuple[int | None, str]) -> None:
    assert parse_rating(reply) == want


def test_records_exclude_invalid_ratings_never_guess() -> None:
    rows = [
        ("a", "m1", "helpfulness", 4.0, "ok"),
        ("a", "m1", "honesty", None, "malformed"),
        ("a", "m1", "truthfulness", 2.0, "ok"),
        ("a", "m2", "helpfulness", None, "missing"),
        ("b", "m1", "helpfulness", 5.0, "ok"),
    ]
    scores = pl.DataFrame(
        [
            {
                "prompt_id": p,
                "model": m,
                "sample": 0,
                "aspect": a,
                "score": s,
                "mass": None,
                "reply": None,
                "status": st,
            }
            for p, m, a, s, st in rows
        ],
        schema=SCORE_SCHEMA,
    )
    recs = records(COMPS, scores)
    assert [r["instruction"] for r in recs] == ["Name a color.", "Count."]
    first = recs[0]["completions"]
    assert first[0]["overall_score"] == 3.0 and first[0]["raw"] == {
        "helpfulness": 4.0,
        "truthfulness": 2.0,
    }
    assert first[1]["overall_score"] is None and first[1]["fine-grained_score"] is None
    assert recs[0]["models"] == ["m1", "m2"]


def _gens(tmp_path: Path, names: list[str]) -> Path:
    from karma.generation.generate import SCHEMA

    d = tmp_path / "gens"
    d.mkdir()
    prompts = COMPS.unique("prompt_id", keep="first", maintain_order=True)
    for i, name in enumerate(names):
        rows = [
            {"prompt_id": p, "prompt": q, "model": name, "sample": 0, "text": t + " x" * i,
             "tokens": 3, "logprob_sum": -3.0, "logprob_mean": -1.0, "finish_reason": "stop",
             "status": "ok", "error": None, "engine": "hf", "engine_version": "t"}
            for p, q, t in prompts.select("prompt_id", "prompt", "text").iter_rows()
        ]  # fmt: skip
        pl.DataFrame(rows, schema=SCHEMA).write_parquet(d / f"{name}.parquet")
    return d


def _judge(karma_cli: Any, tmp_path: Path, gens: Path, *settings: str) -> tuple[int, str, dict]:
    pool = "scores.measured={m1: {model: x, modes: [pool]}, m2: {model: y, modes: [pool]}}"
    out = tmp_path / "judged.jsonl"
    args = [
        "judge",
        "--generations",
        str(gens),
        "--out",
        str(out),
        "--scores",
        str(tmp_path / "s.parquet"),
        "--metrics",
        str(tmp_path / "m.json"),
        "-S",
        pool,
        "-S",
        "completions=pool",
    ]
    for s in settings:
        args += ["-S", s]
    code, _, err = karma_cli(*args)
    metrics = json.loads((tmp_path / "m.json").read_text()) if code == 0 else {}
    return code, err, metrics


def test_llm_judge_weighted_and_generate(
    karma_cli: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    gens = _gens(tmp_path, ["m1", "m2"])
    code, err, m = _judge(
        karma_cli,
        tmp_path,
        gens,
        f"judge.model={tiny_model_dir}",
        "judge.aspects=[helpfulness, honesty]",
    )
    assert code == 0, err
    scores = pl.read_parquet(tmp_path / "s.parquet")
    assert scores.height == 4 * 2 and (scores["status"] == "ok").all()
    assert scores["score"].is_between(1, 5).all() and scores["mass"].is_between(0, 1).all()
    assert m["malformed"] == m["missing"] == m["out_of_range"] == 0
    recs = [json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and len(recs[0]["completions"]) == 2
    # the fetch stage reads them as the completions the preferences stage pairs (unchanged)
    fetched = tmp_path / "completions.parquet"
    code, _, err = karma_cli(
        "fetch",
        "--out",
        str(fetched),
        "--pool",
        str(tmp_path / "judged.jsonl"),
        "-S",
        "completions=pool",
    )
    assert code == 0, err
    frame = pl.read_parquet(fetched).explode("completions").unnest("completions")
    assert frame.height == 4 and frame["overall_score"].is_between(1, 5).all()
    # generate: the tiny judge's replies are parsed strictly; every score row is accounted for
    code, err, m = _judge(
        karma_cli,
        tmp_path,
        gens,
        f"judge.model={tiny_model_dir}",
        "judge.method=generate",
        "judge.max_new_tokens=3",
    )
    assert code == 0, err
    scores = pl.read_parquet(tmp_path / "s.parquet")
    ok = int((scores["status"] == "ok").sum())
    assert ok + m["malformed"] + m["missing"] + m["out_of_range"] == m["scores"] == 4 * 4
    assert scores.filter(pl.col("status") != "ok")["score"].is_null().all()


def _reward_model(path: Path, tiny: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_batched_equals_per_completion(tiny_model_dir: Path, tmp_path: Path) -> None:
    from karma.judging.llm_judge import load_reward_model, reward_scores, reward_texts
    from karma.judging.settings import JudgeConfig

    rm = _reward_model(tmp_path / "rm", tiny_model_dir)
    model, tok = load_reward_model(JudgeConfig(kind="reward", model=str(rm)))
    texts = reward_texts(tok, list(zip(COMPS["prompt"], COMPS["text"], strict=True)))
    batched = reward_scores(model, tok, texts, 8, 128)
    single = [reward_scores(model, tok, [t], 1, 128)[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(batched)) == 3


def test_reward_judge_stage_and_remote_code_needs_trust(
    karma_cli: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.fixtures import error_line

    rm = _reward_model(tmp_path / "rm", tiny_model_dir)
    gens = _gens(tmp_path, ["m1", "m2"])
    code, err, m = _judge(karma_cli, tmp_path, gens, "judge.kind=reward", f"judge.model={rm}")
    assert code == 0, err
    assert m["scores"] == 4 and m["meta.kind"] == "reward"
    remote = tmp_path / "remote"
    shutil.copytree(rm, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(
        model_type="karma-remote-test",
        auto_map={"AutoConfig": "x.C", "AutoModelForSequenceClassification": "x.M"},
    )
    (remote / "config.json").write_text(json.dumps(config))
    code, err, _ = _judge(karma_cli, tmp_path, gens, "judge.kind=reward", f"judge.model={remote}")
    line = error_line(code, err, logs_before=True)
    assert "judge.trust_remote_code" in line and "needs its own code" in line
