"""Self-play rounds: markers, best-vs-worst pairs with MAP, and two reduced rounds end to end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from karma.core.errors import KarmaError
from karma.core.io import read_json
from karma.core.stage import execute
from karma.params import build_params
from karma.selfplay import markers, pairs, policy, rounds
from karma.selfplay.settings import MAX_ROUNDS

REPO = Path(__file__).resolve().parents[1]


def _params(**values: Any) -> Any:
    return build_params(overrides=[(k.replace("__", "."), v, k) for k, v in values.items()])


def test_markers_change_only_for_the_round_switched(tmp_path: Path) -> None:
    def plan(n: int) -> dict[int, bytes]:
        out = {}
        for k in range(1, MAX_ROUNDS + 1):
            path = tmp_path / f"r{n}_{k}.json"
            execute(rounds.PLAN, _params(rounds=n), rounds.PlanPaths(round=str(k), out=path))
            out[k] = path.read_bytes()
        return out

    two, three = plan(2), plan(3)
    assert two[1] == three[1] and two[2] == three[2]  # rounds 1-2 stay cached
    assert two[3] != three[3]
    assert markers.read_marker(tmp_path / "r3_3.json", 3) is True
    assert markers.read_marker(tmp_path / "r2_3.json", 3) is False
    with pytest.raises(KarmaError, match="not the marker of this round"):
        markers.read_marker(tmp_path / "r2_3.json", 2)
    with pytest.raises(KarmaError, match="--round"):
        markers.round_number(str(MAX_ROUNDS + 1))


def test_best_worst_pairs_and_map_keeps_small_implicit_gaps() -> None:
    rows = []
    for p in range(6):
        for s, (score, lp) in enumerate([(4.0, -1.0), (1.0, -1.0 - p * 0.5), (2.0, -0.3)]):
            rows.append({"prompt_id": f"p{p}", "prompt": f"q{p}", "model": "base", "sample": s,
                         "text": f"t{p}{s}", "score": score, "logprob_mean": lp,
                         "status": "ok", "round": 1})  # fmt: skip
    rows.append({**rows[0], "prompt_id": "tie", "sample": 0, "text": "same"})
    rows.append({**rows[0], "prompt_id": "tie", "sample": 1, "text": "same"})
    made = pairs.best_worst(pl.DataFrame(rows))
    assert made.height == 6  # identical texts make no pair
    assert made["chosen_sample"].to_list() == [0] * 6
    assert made["rejected_sample"].to_list() == [1] * 6
    assert made["margin_logp"].to_list() == pytest.approx([p * 0.5 for p in range(6)])
    params = _params(select__ratio=0.5, select__weight=1.0)
    scored = pairs.map_select(made, params, "test")
    kept = scored.filter(pl.col("kept"))["prompt_id"].to_list()
    # equal judge gaps: MAP keeps the pairs the policy separates least
    assert sorted(kept) == ["p0", "p1", "p2"]


def test_base_reference_is_refused_for_a_non_dpo_reference_objective() -> None:
    params = _params(selfplay__reference_model="base", train__method="kto")
    assert policy.needs_base_reference(params, 1) is False
    with pytest.raises(KarmaError, match=r"selfplay\.reference_model"):
        policy.needs_base_reference(params, 2)
    assert policy.needs_base_reference(_params(selfplay__reference_model="base"), 2) is True
    assert policy.needs_base_reference(_params(train__method="simpo"), 2) is False


def test_rounds_in_the_registry_list_only_their_own_params() -> None:
    from karma.dvcyaml import stage_entry
    from karma.registry import SP_ROUNDS, wiring

    assert [r["round"] for r in SP_ROUNDS.values()] == list(range(1, MAX_ROUNDS + 1))
    train = stage_entry(wiring("sp_train"))
    assert "selfplay.n" not in train["params"]  # sampling settings do not retrain
    assert "train.method" in train["params"]
    for step in ("generate", "judge", "select"):  # switching the objective keeps them cached
        entry = stage_entry(wiring(f"sp_{step}"))
        assert not any(k.startswith("train.") for k in entry["params"]), step
        assert "rounds" not in entry["params"]  # only their marker says whether they run
    assert stage_entry(wiring("sp_plan"))["params"] == ["rounds"]


def _round(k: int, params: Any, work: Path, base: Path, prompts: Path, held: Path) -> Path:
    d = work / f"round_{k}"
    marker, prev = d / "plan.json", base if k == 1 else work / f"policy_{k - 1}"
    execute(rounds.PLAN, params, rounds.PlanPaths(round=str(k), out=marker))
    execute(
        rounds.GENERATE,
        params,
        rounds.GeneratePaths(
            round=str(k), marker=marker, model=prev, prompts=prompts, out=d / "samples.parquet"
        ),
    )
    execute(
        rounds.JUDGE,
        params,
        rounds.JudgePaths(
            round=str(k),
            marker=marker,
            samples=d / "samples.parquet",
            out=d / "judged.parquet",
            scores=d / "scores.parquet",
        ),
    )
    execute(
        pairs.STAGE,
        params,
        pairs.SelectPaths(
            round=str(k), marker=marker, judged=d / "judged.parquet", out=d / "select"
        ),
    )
    execute(
        policy.TRAIN,
        params,
        policy.TrainPaths(
            round=str(k),
            marker=marker,
            pairs=d / "select",
            previous=prev,
            base=base,
            eval_data=held,
            out=work / f"policy_{k}",
            checkpoints=d / "ckpt",
            metrics=d / "train.json",
        ),
    )
    execute(policy.EVALUATE, params, policy.EvaluatePaths(
        round=str(k), marker=marker, judged=d / "judged.parquet", pairs=d / "select",
        train_metrics=d / "train.json", model=work / f"policy_{k}", baseline=base,
        out=d / "eval", metrics=d / "round.json"))  # fmt: skip
    return d


def test_two_reduced_rounds_then_an_inactive_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures import synthetic_pairs

    prompts = tmp_path / "prompts.parquet"
    texts = [f"write the capital of country number {i}" for i in range(6)]
    pl.DataFrame({"prompt_id": [f"p{i}" for i in range(6)], "prompt": texts}).write_parquet(prompts)
    held = tmp_path / "held.parquet"
    synthetic_pairs(6, seed=1).write_parquet(held)
    params = _params(
        rounds=2, selfplay__n=3, selfplay__prompt_limit=6, selfplay__max_new_tokens=8,
        selfplay__max_steps=2, selfplay__evaluate=False, selfplay__temperature=1.5,
        judge__kind="reward", judge__model=str(tiny_model_dir), judge__max_length=64,
        selfplay__reference_model="base", select__ratio=0.5, train__global_batch_size=2,
        train__trl={"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                    "max_length": 64, "logging_steps": 1},
    )  # fmt: skip
    work = tmp_path / "work"
    dirs = [_round(k, params, work, tiny_model_dir, prompts, held) for k in (1, 2, 3)]
    base_hash = markers.weights_digest(tiny_model_dir)
    p1, p2 = (markers.weights_digest(work / f"policy_{k}") for k in (1, 2))
    assert len({base_hash, p1, p2}) == 3  # each round changed the weights
    s1 = pl.read_parquet(dirs[0] / "samples.parquet")
    s2 = pl.read_parquet(dirs[1] / "samples.parquet")
    assert set(s1["model"]) == {"base"} and set(s1["weights"]) == {base_hash}
    assert set(s2["model"]) == {"policy_1"} and set(s2["weights"]) == {p1}
    assert s2.height == 18 and s2["logprob_mean"].null_count() == 0
    for d in dirs[:2]:
        train = read_json(d / "train.json")
        assert train["steps"] == 2 and math.isfinite(train["loss"])
        head = read_json(d / "round.json")
        assert head["active"] == 1 and 1 <= head["pairs.kept"] <= head["pairs.made"] <= 6
        assert head["judge.ci_low"] <= head["judge.mean"] <= head["judge.ci_high"]
        assert "heldout.reward_accuracy" in head
    assert read_json(dirs[1] / "round.json")["meta.policy_weights"] == p2
    # round 2 starts from policy 1 and trains against the base's stored log-probs
    assert read_json(dirs[1] / "train.json")["meta.reference"] == "base"
    assert read_json(dirs[1] / "train.json")["meta.start"] == "policy_1"
    assert read_json(dirs[2] / "round.json") == {"round": 3, "active": 0}
    assert (work / "policy_3" / policy.INACTIVE).is_file()
    assert pl.read_parquet(dirs[2] / "samples.parquet").height == 0
