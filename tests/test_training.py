"""Training stage: DPO and SFT on the tiny offline model, the train settings through the CLI,
resume after a kill, the global batch, held-out metrics, two processes (torchrun, gloo)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from karma.core import stage as pipeline
from karma.core.errors import KarmaError
from karma.params import Params
from karma.training.checkpoints import (
    FINGERPRINT_FILE,
    drop_stale,
    fingerprint,
    last_checkpoint,
    prepare_run_dir,
)
from karma.training.data import load_pairs
from karma.training.heldout import heldout_logps, heldout_summary
from karma.training.objectives import OBJECTIVES, PairLogps, dpo_metrics
from karma.training.settings import TrainConfig
from karma.training.train import (
    STAGE,
    TrainPaths,
    launcher_prefix,
    make_trainer,
    run_train,
    save_policy,
)
from karma.training.trl_config import apply_recipe, batch_plan, build_trl_config, trl_kwargs
from tests.fixtures import CHAT_TEMPLATE
from tests.fixtures import error_line as one_line_error

REPO = Path(__file__).resolve().parents[1]
FAST_TRL = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "max_length": 96,
    "disable_tqdm": True,
}


def make_pairs(n: int, seed: int = 0, offset: int = 0) -> pl.DataFrame:
    """``n`` made-up pairs in the select stage's schema (TRL conversational + metadata);
    ``offset`` numbers the prompts (other offsets: other prompts)."""
    import random

    rng = random.Random(seed)
    topics = ["the sun", "water", "paris", "the moon", "atoms", "energy", "rome", "light"]
    rows = []
    for i in range(offset, offset + n):
        t = rng.choice(topics)
        rows.append(
            {
                "prompt_id": f"p{i:04d}",
                "prompt": [{"role": "user", "content": f"Explain {t} in one sentence. ({i})"}],
                "chosen": [{"role": "assistant", "content": f"{t} is a good science answer."}],
                "rejected": [{"role": "assistant", "content": rng.choice(["no.", "bad bad"])}],
                "chosen_model": "m1",
                "rejected_model": "m2",
                "kinship": 0.5,
                "s_pref_chosen": 0.8,
                "s_pref_rejected": 0.3,
                "chosen_rating": 5.0,
                "rejected_rating": 2.0,
            }
        )
    return pl.DataFrame(rows)


@pytest.fixture(autouse=True)
def karma_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every cache (the digest memo of the fingerprint) under this test's tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KARMA_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.parquet"
    make_pairs(16).write_parquet(path)
    return path


@pytest.fixture
def test_file(tmp_path: Path) -> Path:
    """Held-out pairs (other prompts, the same chosen/rejected pattern)."""
    path = tmp_path / "test_prefs.parquet"
    make_pairs(10, seed=7, offset=100).write_parquet(path)
    return path


@pytest.fixture
def dev_file(tmp_path: Path) -> Path:
    """Dev pairs (prompts of neither the training nor the test pairs)."""
    path = tmp_path / "dev_prefs.parquet"
    make_pairs(8, seed=11, offset=200).write_parquet(path)
    return path


def _paths(tmp_path: Path, data: Path, base: Path, name: str = "run") -> TrainPaths:
    root = tmp_path / name
    return TrainPaths(
        data=data,
        base=base,
        out=root / "policy",
        checkpoints=root / "checkpoints",
        live_dir=root / "live",
        metrics=root / "metrics.json",
    )


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def changed_tensors(base: Path, policy: Path) -> set[str]:
    """Names of the weight tensors that differ between two model directories (same keys)."""
    before, after = _state(base), _state(policy)
    assert before.keys() == after.keys()
    return {k for k in before if not (before[k] == after[k]).all()}


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, str)}


def _texts(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in metrics.items() if isinstance(v, str)}


def _curve(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, separator="\t")


def _leftovers(root: Path) -> list[str]:
    """Temporary or set-aside siblings that pipeline.execute must never leave behind."""
    return sorted(p.name for p in root.rglob("*") if ".karma-" in p.name)


# ------------------------------------------------------------------ training on the tiny model


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_tiny_model_trains(
    method: str, tiny_model_dir: Path, pairs_file: Path, test_file: Path, dev_file: Path,
    tmp_path: Path,
):  # fmt: skip
    paths = dataclasses.replace(_paths(tmp_path, pairs_file, tiny_model_dir), eval_data=test_file,
                                dev_data=dev_file)  # fmt: skip
    cfg = TrainConfig(method=method, global_batch_size=4, trl=FAST_TRL, checkpoint_steps=2)
    metrics = run_train(Params(seed=0, train=cfg), paths)

    assert metrics["steps"] == 4 and metrics["resumed_from_step"] == 0 and metrics["pairs"] == 16
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["train_loss"])
    assert metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0
    written = json.loads(paths.metrics.read_text())
    timings = {"wall_time_s", "tokens_per_second"}  # logged, never written (they vary per run)
    assert timings.isdisjoint(written)
    assert _numbers(written) == pytest.approx(
        {k: v for k, v in _numbers(metrics).items() if k not in timings}
    )
    assert _texts(written) == _texts(metrics)
    batch = {k: v for k, v in metrics.items() if k.startswith("batch.")}
    assert batch == {"batch.world_size": 1, "batch.per_device": 4, "batch.accumulation": 1,
                     "batch.global": 4}  # fmt: skip
    assert _texts(metrics) == {"meta.base_model": str(tiny_model_dir), "meta.train_method": method}
    assert metrics["meta.seed"] == 0
    assert json.loads((paths.out / "karma.json").read_text()) == {
        "source": str(tiny_model_dir), "base": {"source": str(tiny_model_dir)}, "method": method,
        "seed": 0, "recipe": None, "global_batch_size": 4, "lora": False,
    }  # fmt: skip
    changed = changed_tensors(tiny_model_dir, paths.out)
    assert len(changed) > len(_state(tiny_model_dir)) // 2, "most weight tensors must change"

    curves = paths.live_dir / "plots" / "metrics"
    loss = _curve(curves / "loss.tsv")
    assert loss.columns == ["step", "loss"] and loss["step"].to_list() == [1, 2, 3, 4]
    assert loss["loss"][-1] == pytest.approx(metrics["loss"])
    assert loss["loss"][-1] < loss["loss"][0], "lr 1e-3 on the same pairs: the loss falls"
    lr = _curve(curves / "learning_rate.tsv")["learning_rate"].to_list()
    assert lr == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # linear decay over 4 steps
    if method == "dpo":
        acc = _curve(curves / "rewards" / "accuracies.tsv")
        assert acc["step"].to_list() == [1, 2, 3, 4]
        assert all(0.0 <= a <= 1.0 for a in acc["accuracies"])
        margins = _curve(curves / "rewards" / "margins.tsv")["margins"]
        assert margins[-1] == pytest.approx(metrics["rewards_margins"])
        # learning at lr 1e-3 on the same pairs: the margin grows above zero
        assert metrics["rewards_margins"] > 0
        # held-out pairs share the training pairs' pattern: their margin moves beyond its interval
        assert metrics["heldout.n"] == 10
        assert metrics["heldout.before.loss"] == pytest.approx(math.log(2))
        assert metrics["heldout.delta.reward_margin.ci_low"] > 0
        assert metrics["heldout.delta.loss.ci_high"] < 0
        assert metrics["heldout.after.loss"] < metrics["heldout.before.loss.ci_low"]
        assert "Held-out preference metrics (10 pairs" in (paths.out / "README.md").read_text()
        # the dev pairs: the same metrics and intervals, under dev.
        dev = {k.removeprefix("dev."): v for k, v in metrics.items() if k.startswith("dev.")}
        assert set(dev) == {k for k in metrics if k.startswith("heldout.")}
        assert dev["heldout.n"] == 8 and dev["heldout.delta.reward_margin.ci_low"] > 0
        assert dev["heldout.after.loss"] != metrics["heldout.after.loss"]
        assert written["dev.heldout.n"] == 8
    else:
        assert not (curves / "rewards").exists() and "rewards_margins" not in metrics
        assert not [k for k in metrics if "heldout." in k]  # DPO's metrics only

    from transformers import AutoTokenizer

    tok_base = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok_out = AutoTokenizer.from_pretrained(str(paths.out))
    text = "the capital of france is paris. 42"
    assert tok_out(text)["input_ids"] == tok_base(text)["input_ids"]
    assert tok_out.chat_template == CHAT_TEMPLATE
    card = (paths.out / "README.md").read_text()
    assert f"({method.upper()})" in card and "16 preference pairs" in card
    assert f"| loss | {metrics['loss']:.6g} |" in card
    # checkpoints are removed after success, the persisted root stays
    assert paths.checkpoints.is_dir() and not any(paths.checkpoints.iterdir())


def test_same_seed_same_policy_from_cli_and_library(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path, karma_cli: Callable
):
    """run_train and ``karma train`` with the same settings and seed: byte-identical policies.

    The CLI gets no params file: ``-S train.trl.<key>`` changes one key of the default
    ``train.trl`` (the default lr_scheduler_type is constant, TRL's is linear). Only the CLI
    run scores held-out pairs: that evaluation does not change the training.
    """
    fast = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.001,
            "max_length": 96, "disable_tqdm": True}  # fmt: skip
    cfg = TrainConfig(method="dpo", global_batch_size=4, trl={**TrainConfig().trl, **fast},
                      checkpoint_steps=2)  # fmt: skip
    a = _paths(tmp_path, pairs_file, tiny_model_dir, "a")
    metrics_a = run_train(Params(seed=1, train=cfg), a)

    b = _paths(tmp_path, pairs_file, tiny_model_dir, "b")
    sets = [arg for k, v in fast.items() for arg in ("-S", f"train.trl.{k}={json.dumps(v)}")]
    code, out, err = karma_cli(
        "train", "--data", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(b.out),
        "--checkpoints", str(b.checkpoints), "--live-dir", str(b.live_dir),
        "--metrics", str(b.metrics), "--eval-data", str(test_file), "--seed", "1",
        "--checkpoint-steps", "2", "--global-batch-size", "4", *sets,
    )  # fmt: skip
    assert code == 0, err
    metrics_b = json.loads(b.metrics.read_text())
    printed = json.loads(out)  # the CLI prints the metrics JSON on stdout, with its timings
    assert {k: v for k, v in printed.items() if k not in ("wall_time_s", "tokens_per_second")} == (
        metrics_b
    )
    assert _leftovers(tmp_path / "b") == []

    for name in ("model.safetensors", "tokenizer.json", "config.json", "karma.json"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    assert metrics_a["loss"] == metrics_b["loss"] and math.isfinite(metrics_a["loss"])
    assert metrics_a["learning_rate"] == metrics_b["learning_rate"] == 0.001  # constant
    assert changed_tensors(tiny_model_dir, a.out), "two steps at lr 1e-3 change the weights"
    assert "heldout.n" in metrics_b and "heldout.n" not in metrics_a


def test_lora_dpo_merges_adapter(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path
):
    """LoRA: the adapter is merged into the saved weights, in memory or (the path a sharded
    model takes: collective adapter save, merge on the main process) from disk, with the same
    result; the held-out reference is the policy with its adapter disabled."""
    pytest.importorskip("peft")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = TrainConfig(
        method="dpo", global_batch_size=4, trl={**FAST_TRL, "max_steps": 2}, lora=lora
    )
    trainer = make_trainer(
        cfg,
        tiny_model_dir,
        seed=0,
        output_dir=tmp_path / "ck",
        dataset=load_pairs(pairs_file),
        eval_dataset=load_pairs(test_file),
    )
    reference = preference_logps(trainer, reference=True)
    assert np.array_equal(preference_logps(trainer), reference)  # B = 0: policy = reference
    assert math.isfinite(trainer.train().training_loss)
    after = pair_metrics(preference_logps(trainer), reference, trainer.beta)
    assert np.array_equal(preference_logps(trainer, reference=True), reference)
    assert after["reward_margin"].mean() > 0

    save_policy(trainer, tmp_path / "disk", "# card", base=tiny_model_dir, sharded=True)
    save_policy(trainer, tmp_path / "memory", "# card", sharded=False)
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == sorted(
        p.name for p in (tmp_path / "memory").iterdir()
    )
    a, b = _state(tmp_path / "disk"), _state(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    changed = changed_tensors(tiny_model_dir, tmp_path / "memory")  # same keys: merged
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    assert not (tmp_path / "disk" / ".adapter").exists()
    assert (tmp_path / "disk" / "README.md").read_text() == "# card"


def preference_logps(trainer: Any, *, reference: bool = False) -> np.ndarray:
    """``(n, 2)`` summed log-probs (chosen, rejected) of the DPO trainer's held-out pairs."""
    return heldout_logps(trainer, OBJECTIVES["dpo"].heldout, reference=reference).policy


def pair_metrics(policy: np.ndarray, reference: np.ndarray, beta: float) -> dict:
    """DPO's per-pair held-out metrics from summed log-probs."""
    args = type("Args", (), {"beta": beta})
    return dpo_metrics(PairLogps(policy, np.ones_like(policy), reference), args)


HELDOUT = OBJECTIVES["dpo"].heldout.metrics


def _moved(trainer: Any, base: Path) -> int:
    """How many weight tensors of the trainer's policy differ from the base model's."""
    before = _state(base)
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return sum(not torch_equal(after[k], before[k]) for k in before)


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.allclose(a, b, rtol=0, atol=1e-6))


def test_heldout_metrics_are_trls(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path
):
    """The per-pair held-out metrics average to TRL's own ``evaluate()`` numbers, before and
    after training; before training the policy's log-probs are the reference's."""
    cfg = TrainConfig(
        method="dpo",
        global_batch_size=4,
        trl={**FAST_TRL, "max_steps": 3, "per_device_eval_batch_size": 5},
    )
    trainer = make_trainer(
        cfg,
        tiny_model_dir,
        seed=0,
        output_dir=tmp_path / "ck",
        dataset=load_pairs(pairs_file),
        eval_dataset=load_pairs(test_file),
    )
    reference = preference_logps(trainer, reference=True)
    assert reference.shape == (10, 2) and np.isfinite(reference).all()
    assert np.array_equal(preference_logps(trainer), reference)
    for when in ("before", "after"):
        if when == "after":
            assert math.isfinite(trainer.train().training_loss)
            assert _moved(trainer, tiny_model_dir) > 10
        ours = pair_metrics(preference_logps(trainer), reference, trainer.beta)
        trl = trainer.evaluate()  # 2 batches of 5: TRL's batch means average to the pair mean
        assert ours["loss"].mean() == pytest.approx(trl["eval_loss"], abs=1e-5), when
        assert ours["reward_accuracy"].mean() == pytest.approx(trl["eval_rewards/accuracies"])
        assert ours["reward_margin"].mean() == pytest.approx(
            trl["eval_rewards/margins"], abs=1e-5
        ), when
    assert ours["reward_margin"].mean() > 0.1 and np.isfinite(ours["loss"]).all()


def test_heldout_summary_keys():
    """The interface-5 keys, with karma.core.stats' intervals (Wilson for the accuracy, t for the
    others, a seeded paired bootstrap for the change)."""
    from karma.core.stats import mean_ci, paired_bootstrap_ci

    before = {"loss": np.full(4, math.log(2)), "reward_accuracy": np.zeros(4),
              "reward_margin": np.zeros(4)}  # fmt: skip
    after = {"loss": np.array([0.5, 0.6, 0.4, 0.7]), "reward_accuracy": np.array([1.0, 1, 0, 1]),
             "reward_margin": np.array([0.2, 0.1, -0.1, 0.3])}  # fmt: skip
    out = heldout_summary(before, after, seed=3)
    expected = {"heldout.n"} | {
        f"heldout.{who}.{m}{end}" for who in ("before", "after", "delta") for m in HELDOUT
        for end in ("", ".ci_low", ".ci_high")
    }  # fmt: skip
    assert set(out) == expected and out["heldout.n"] == 4
    assert out["heldout.after.reward_accuracy"] == 0.75
    wilson = mean_ci(after["reward_accuracy"], binary=True)
    acc = "heldout.after.reward_accuracy"
    assert (out[f"{acc}.ci_low"], out[f"{acc}.ci_high"]) == (wilson.ci_low, wilson.ci_high)
    assert wilson.method == "wilson"
    t = mean_ci(after["loss"], binary=False)
    assert out["heldout.after.loss.ci_low"] == t.ci_low and t.method == "t"
    assert out["heldout.before.loss"] == out["heldout.before.loss.ci_high"] == math.log(2)
    assert out["heldout.delta.loss"] == pytest.approx(0.55 - math.log(2))
    assert out["heldout.delta.reward_margin"] == pytest.approx(0.125)
    low, high = paired_bootstrap_ci(after["reward_margin"], before["reward_margin"], seed=3,
                                    n_boot=10_000)  # fmt: skip
    margin = "heldout.delta.reward_margin"
    assert (out[f"{margin}.ci_low"], out[f"{margin}.ci_high"]) == (low, high)
    assert low <= 0.125 <= high
    # the bootstrap follows the seed (4 pairs have too few distinct resample means to show it)
    rng = np.random.default_rng(0)
    big_b = {m: rng.integers(0, 2, 50).astype(float) for m in HELDOUT}
    big_a = {m: rng.integers(0, 2, 50).astype(float) for m in HELDOUT}
    assert heldout_summary(big_b, big_a, seed=3) != heldout_summary(big_b, big_a, seed=4)
    assert heldout_summary(big_b, big_a, seed=3) == heldout_summary(big_b, big_a, seed=3)


# ------------------------------------------------------------------ data


def test_load_pairs_formats(pairs_file: Path):
    dpo = load_pairs(pairs_file, "paired")
    assert dpo.column_names == ["prompt", "chosen", "rejected"]
    assert dpo[0]["prompt"][0]["role"] == "user"
    sft = load_pairs(pairs_file, "sft")
    assert sft.column_names == ["prompt", "completion"]
    assert sft[0]["completion"] == dpo[0]["chosen"]


def test_missing_data_file(tmp_path: Path):
    with pytest.raises(KarmaError, match=r"missing\.parquet: training data file not found"):
        load_pairs(tmp_path / "missing.parquet")


def test_empty_dataset(tmp_path: Path):
    path = tmp_path / "empty.parquet"
    make_pairs(3).head(0).write_parquet(path)
    with pytest.raises(KarmaError, match="dataset is empty"):
        load_pairs(path)


def test_missing_columns_and_bad_file(tmp_path: Path):
    path = tmp_path / "bad.parquet"
    make_pairs(3).drop("rejected").write_parquet(path)
    with pytest.raises(KarmaError, match=r"missing columns \['rejected'\]"):
        load_pairs(path)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(KarmaError, match="not a readable parquet file"):
        load_pairs(junk)


# ------------------------------------------------------------------ the train settings (CLI)


@pytest.fixture
def train_args(tmp_path: Path) -> list[str]:
    """``karma train`` with existing inputs (an empty base dir: these runs never load it)."""
    data = tmp_path / "pairs.parquet"
    make_pairs(2).write_parquet(data)
    (tmp_path / "base").mkdir()
    return ["train", "--data", str(data), "--base", str(tmp_path / "base"),
            "--out", str(tmp_path / "policy"), "--checkpoints", str(tmp_path / "ck")]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "dpx"],
         "--method: not one of the choices; did you mean 'dpo'? (got 'dpx'; expected dpo | ipo | "
         "simpo | cpo | orpo | kto | sft)"),
        (["--launcher", "slurm"],
         "--launcher: not one of the choices (got 'slurm'; expected python | torchrun | "
         "accelerate)"),
        (["--num-processes", "2"],
         "--num-processes: launcher python runs one process (got 2; expected 1, or "
         "train.launcher torchrun (CPU or GPU) / accelerate (GPU))"),
        (["--global-batch-size", "5"],
         "--global-batch-size: not a multiple of per-device batch 2 x 1 processes (got 5; "
         "expected a multiple of 2;"),
        (["-S", "train.trl.gradient_accumulation_steps=2"],
         "-S train.trl.gradient_accumulation_steps: 'gradient_accumulation_steps' is derived "
         "from train.global_batch_size (set train.global_batch_size: null to choose it "
         "yourself)"),
        (["--num-processes", "0"],
         "--num-processes: out of range (got 0; expected 1 <= num_processes)"),
        (["--checkpoint-steps", "0"],
         "--checkpoint-steps: out of range (got 0; expected 1 <= checkpoint_steps)"),
        (["--dtype", "floatt16"],
         "--dtype: not one of the choices; did you mean 'float16' or 'bfloat16'? "
         "(got 'floatt16'; expected float32 | bfloat16 | float16)"),
        (["--seed", "-1"], "--seed: out of range (got -1; expected 0 <= seed < 9.22337e+18)"),
        (["-S", "train.methd=sft"],
         "-S train.methd: unknown key; did you mean 'method'? (expected accelerate_config, "
         "checkpoint_steps, cpo, dpo, dtype, global_batch_size, ipo, keep_checkpoints, kto, "
         "launcher, lora, method, num_processes, orpo, recipe, reference, sft, simpo, trl)"),
        (["-S", "train.trl.seed=3"], "-S train.trl.seed: 'seed' is set by the top-level 'seed'"),
        (["-S", "train.trl.save_steps=2"],
         "-S train.trl.save_steps: 'save_steps' is set by train.checkpoint_steps"),
        (["-S", "train.dpo.output_dir=x"],
         "-S train.dpo.output_dir: 'output_dir' is set by karma (checkpoints go to the stage's "
         "checkpoint dir)"),
        (["-S", "train.trl.report_to=wandb"],
         "-S train.trl.report_to: 'report_to' is set by karma (curves go to dvclive)"),
    ],
)  # fmt: skip
def test_cli_setting_errors_name_the_flag(
    argv: list[str], expected: str, train_args: list[str], tmp_path: Path, karma_cli: Callable
):
    message = one_line_error(*karma_cli(*train_args, *argv)[::2])
    assert message.startswith(expected), message
    assert not (tmp_path / "policy").exists() and not (tmp_path / "ck").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {methd: dpo}\n", "field 'train.methd': unknown key; did you mean 'method'?"),
        ("train: {checkpoint_steps: 0}\n",
         "field 'train.checkpoint_steps': out of range (got 0; expected 1 <= checkpoint_steps)"),
        ("train: {trl: {save_steps: 5}}\n",
         "field 'train.trl': 'save_steps' is set by train.checkpoint_steps"),
        ("seed: 1\ntrain: [1]\n", "field 'train': wrong type"),
    ],
)  # fmt: skip
def test_cli_params_file_errors_name_file_and_key(
    text: str, expected: str, train_args: list[str], tmp_path: Path, karma_cli: Callable
):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    message = one_line_error(*karma_cli(*train_args, "--params", str(params))[::2])
    assert message.startswith(f"{params}: {expected}"), message


def test_cli_missing_params_file_is_an_error(tmp_path: Path):
    """``--params`` naming a missing file fails (no silent fallback to the defaults)."""
    missing = tmp_path / "missing.yaml"
    data = tmp_path / "pairs.parquet"
    make_pairs(2).write_parquet(data)
    (tmp_path / "base").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "train", "--params", str(missing),
         "--data", str(data), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "policy"),
         "--checkpoints", str(tmp_path / "ck")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"karma: error: {missing}: params file not found (expected an existing YAML file)"
    ]
    assert proc.stdout == "" and not (tmp_path / "policy").exists()


def test_cli_path_errors_name_the_flag(train_args: list[str], tmp_path: Path, karma_cli: Callable):
    argv = list(train_args)
    argv[argv.index("--base") + 1] = str(tmp_path / "nobase")
    message = one_line_error(*karma_cli(*argv)[::2])
    assert message == f"{tmp_path / 'nobase'}: field '--base': input not found"
    argv = list(train_args)
    inside = tmp_path / "base" / "ck"
    argv[argv.index("--checkpoints") + 1] = str(inside)
    message = one_line_error(*karma_cli(*argv)[::2])
    assert message.startswith(
        f"{inside}: field '--checkpoints': output path is (or holds, or lies inside) the input "
        "--base"
    ), message
    assert not inside.exists() and not (tmp_path / "policy").exists()


def test_cli_unknown_trl_field_fails_before_any_model(
    train_args: list[str], tmp_path: Path, karma_cli: Callable
):
    """TRL field names are checked in the stage, before a model loads (the base is empty)."""
    message = one_line_error(*karma_cli(*train_args, "-S", "train.trl.learning_rat=0.1")[::2])
    assert message == (
        "-S train.trl.learning_rat: unknown DPOConfig field; did you mean "
        "'learning_rate'? (expected a field of trl.DPOConfig)"
    )
    assert not (tmp_path / "policy").exists() and _leftovers(tmp_path) == []


def test_unknown_trl_field_did_you_mean():
    with pytest.raises(KarmaError) as err:
        trl_kwargs(TrainConfig(trl={"learning_rat": 1e-5}), seed=0, output_dir="x")
    assert "train.trl.learning_rat" in str(err.value)
    assert "did you mean 'learning_rate'" in str(err.value)
    # a DPO-only field in the sft block is caught too, and an SFT field under method sft
    with pytest.raises(KarmaError, match=r"'train\.sft\.beta': unknown SFTConfig field"):
        trl_kwargs(TrainConfig(sft={"beta": 0.1}), seed=0, output_dir="x")
    kw = trl_kwargs(TrainConfig(method="sft", sft={"packing": True}), seed=0, output_dir="x")
    assert kw["packing"] is True


def test_trl_config_passthrough_and_defaults(tmp_path: Path):
    cfg = TrainConfig(
        method="dpo",
        global_batch_size=None,  # TRL's per-device 8 and accumulation 1
        trl={"learning_rate": "5e-5", "max_steps": 7, "logging_steps": 3},
        dpo={"beta": 0.3},
        checkpoint_steps=5,
    )
    kw = trl_kwargs(cfg, seed=5, output_dir=tmp_path)
    assert kw["report_to"] == "none"  # karma's curves go to dvclive, never to TRL's reporters
    assert kw["output_dir"] == str(tmp_path) and kw["save_steps"] == 5
    args = build_trl_config(cfg, seed=5, output_dir=tmp_path)
    assert type(args).__name__ == "DPOConfig"
    # TrainingArguments.__post_init__ normalises report_to "none" to the empty list
    assert args.report_to == []
    assert args.learning_rate == 5e-5  # YAML 1.1 string coerced for a float field
    assert args.max_steps == 7 and args.beta == 0.3 and args.seed == 5
    assert args.logging_steps == 3  # the user's trl wins over karma's defaults
    assert args.save_steps == 5 and args.save_strategy == "steps"
    assert args.bf16 is False and args.gradient_checkpointing is False
    sft = build_trl_config(TrainConfig(method="sft"), seed=0, output_dir=tmp_path)
    assert type(sft).__name__ == "SFTConfig" and sft.report_to == []
    assert sft.max_steps == 4 and sft.learning_rate == 2e-5  # the default train.trl (dev-chosen)


def test_trl_rejects_bad_value(tmp_path: Path):
    cfg = TrainConfig(global_batch_size=None, trl={"lr_scheduler_type": "wobbly"})
    with pytest.raises(KarmaError, match=r"'train\.trl\.lr_scheduler_type': TRL rejected it: "
                       "wobbly is not a valid SchedulerType"):  # fmt: skip
        build_trl_config(cfg, seed=0, output_dir=tmp_path)


def test_paper_gpu_recipe():
    """The paper's global batch (6 x 4 x 4 GPUs = 96) and warm-up; accumulation is derived."""
    recipe = str(REPO / "params/recipes/paper-gpu.yaml")
    cfg = apply_recipe(TrainConfig(method="dpo", recipe=recipe))
    assert cfg.recipe == recipe and cfg.global_batch_size == 96
    kw = trl_kwargs(cfg, seed=0, output_dir="x", world_size=4)
    assert kw["bf16"] is True and kw["num_train_epochs"] == 1 and kw["max_steps"] == -1
    assert kw["per_device_train_batch_size"] == 6 and kw["gradient_accumulation_steps"] == 4
    assert kw["learning_rate"] == 5e-5 and kw["warmup_steps"] == 500 and kw["beta"] == 0.1
    assert kw["save_steps"] == cfg.checkpoint_steps
    accumulation = {n: batch_plan(cfg, n).accumulation for n in (1, 2, 4, 8, 16)}
    assert accumulation == {1: 16, 2: 8, 4: 4, 8: 2, 16: 1}
    with pytest.raises(KarmaError, match=r"per-device batch 6 x 5 processes \(got 96; expected a "
                                         r"multiple of 30"):  # fmt: skip
        batch_plan(cfg, 5)
    # the recipe merges into train.trl: keys it does not set stay
    assert (
        apply_recipe(TrainConfig(trl={"max_grad_norm": 0.5}, recipe=recipe)).trl["max_grad_norm"]
        == 0.5
    )


@pytest.mark.parametrize(
    ("cfg", "world", "expected"),
    [
        (TrainConfig(global_batch_size=8, trl={"per_device_train_batch_size": 2}), 1, (2, 4, 8)),
        (TrainConfig(global_batch_size=8, trl={"per_device_train_batch_size": 2}), 2, (2, 2, 8)),
        (TrainConfig(global_batch_size=8, trl={"per_device_train_batch_size": 2}), 4, (2, 1, 8)),
        (TrainConfig(global_batch_size=8, trl={}), 1, (8, 1, 8)),  # TRL's per-device default: 8
        (TrainConfig(global_batch_size=4, trl={"per_device_train_batch_size": "2"}), 2, (2, 1, 4)),
        # method blocks win over trl, as in trl_kwargs
        (TrainConfig(global_batch_size=8, trl={"per_device_train_batch_size": 8},
                     dpo={"per_device_train_batch_size": 4}), 1, (4, 2, 8)),
        # null: accumulation kept, the global batch grows with the processes
        (TrainConfig(global_batch_size=None, trl={"per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 3}), 2, (2, 3, 12)),
        (TrainConfig(global_batch_size=None, trl={"per_device_train_batch_size": 2}), 2, (2, 1, 4)),
    ],
)  # fmt: skip
def test_batch_plan(cfg: TrainConfig, world: int, expected: tuple[int, int, int]):
    plan = batch_plan(cfg, world)
    assert (plan.per_device, plan.accumulation, plan.global_batch) == expected
    assert plan.world_size == world and plan.derived == (cfg.global_batch_size is not None)
    assert plan.global_batch == world * plan.per_device * plan.accumulation
    kw = trl_kwargs(cfg, seed=0, output_dir="x", world_size=world)
    assert kw["gradient_accumulation_steps"] == plan.accumulation
    assert kw["per_device_train_batch_size"] == plan.per_device
    per_device, accumulation, global_batch = expected
    assert plan.metrics() == {
        "batch.world_size": world,
        "batch.per_device": per_device,
        "batch.accumulation": accumulation,
        "batch.global": global_batch,
    }


def test_batch_plan_errors():
    with pytest.raises(KarmaError) as err:
        batch_plan(TrainConfig(global_batch_size=6, trl={"per_device_train_batch_size": 4}), 1)
    assert str(err.value) == (
        "field 'train.global_batch_size': not a multiple of per-device batch 4 x 1 processes "
        "(got 6; expected a multiple of 4; or change train.trl.per_device_train_batch_size or "
        "train.num_processes)"
    )
    with pytest.raises(KarmaError, match=r"'train.trl.per_device_train_batch_size': not a "
                                         r"positive integer \(got 0\)"):  # fmt: skip
        batch_plan(TrainConfig(trl={"per_device_train_batch_size": 0}))
    with pytest.raises(KarmaError, match=r"per_device_train_batch_size': not a positive integer"):
        batch_plan(TrainConfig(trl={"per_device_train_batch_size": 2.5}))
    # accumulation is derived, so setting it too is refused (in trl and in the method blocks)
    for block in ("trl", "dpo", "sft"):
        with pytest.raises(ValueError, match=r"derived from train\.global_batch_size"):
            TrainConfig(**{block: {"gradient_accumulation_steps": 2}})
    assert TrainConfig(global_batch_size=None, trl={"gradient_accumulation_steps": 2})
    # under several processes, accelerate's dispatch_batches would split the pairs
    bad = TrainConfig(global_batch_size=4, trl={"per_device_train_batch_size": 2,
                      "accelerator_config": {"dispatch_batches": True}})  # fmt: skip
    trl_kwargs(bad, seed=0, output_dir="x", world_size=1)
    with pytest.raises(KarmaError, match="dispatch_batches splits preference pairs"):
        trl_kwargs(bad, seed=0, output_dir="x", world_size=2)


def test_cpu_only_sets_use_cpu():
    """Without use_cpu, accelerate on CPU sees no distributed setup and every process would
    train on all the data alone (each believing it is rank 0); bf16 on CPU needs it too."""
    import torch

    cpu_only = torch.accelerator.current_accelerator() is None
    cfg = TrainConfig(global_batch_size=4, trl={"per_device_train_batch_size": 2})
    for world in (1, 2):
        kw = trl_kwargs(cfg, seed=0, output_dir="x", world_size=world)
        assert kw.get("use_cpu") is (True if cpu_only else None)
    own = cfg.model_copy(update={"trl": {**cfg.trl, "use_cpu": False}})
    assert trl_kwargs(own, seed=0, output_dir="x")["use_cpu"] is False  # the user's choice wins


def test_recipe_errors_name_the_recipe(tmp_path: Path):
    with pytest.raises(KarmaError) as err:
        apply_recipe(TrainConfig(recipe=str(tmp_path / "nope.yaml")))
    assert str(err.value).startswith("field 'train.recipe': recipe file not found")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lorra: {r: 4}\n")
    with pytest.raises(KarmaError, match=r"recipe\.yaml: field 'lorra'.*did you mean 'lora'"):
        apply_recipe(TrainConfig(recipe=str(recipe)))
    recipe.write_text("train:\n  trl: {save_steps: 3}\n")
    with pytest.raises(KarmaError, match=r"recipe\.yaml: field 'trl'.*train\.checkpoint_steps"):
        apply_recipe(TrainConfig(recipe=str(recipe)))


def test_bad_lora_field_fails_before_anything(tmp_path: Path):
    pytest.importorskip("peft")
    cfg = TrainConfig(lora={"r": 4, "lora_alhpa": 8})
    paths = _paths(tmp_path, tmp_path / "pairs.parquet", tmp_path / "base")
    with pytest.raises(KarmaError, match=r"lora\.lora_alhpa.*did you mean 'lora_alpha'"):
        run_train(Params(train=cfg), paths)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ checkpoints / fingerprint


def test_fingerprint_tracks_inputs(tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "p.parquet"
    make_pairs(4).write_parquet(data)
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    paths = TrainPaths(data=data, base=base, out=tmp_path / "o", checkpoints=tmp_path / "c")
    cfg = TrainConfig(trl={"max_steps": 3})
    a = fingerprint(cfg, paths, seed=0)
    assert fingerprint(cfg, paths, seed=0) == a
    assert fingerprint(cfg, paths, seed=1)["id"] != a["id"]
    assert fingerprint(TrainConfig(trl={"max_steps": 4}), paths, seed=0)["id"] != a["id"]
    assert fingerprint(TrainConfig(method="sft"), paths, seed=0)["id"] != a["id"]
    assert fingerprint(cfg.model_copy(update={"dpo": {"beta": 0.2}}), paths, 0)["id"] != a["id"]
    assert fingerprint(cfg.model_copy(update={"global_batch_size": 16}), paths, 0)["id"] != a["id"]
    # operational settings do not change the weights, so a run resumes across them
    same = cfg.model_copy(
        update={"keep_checkpoints": True, "checkpoint_steps": 1, "launcher": "accelerate",
                "num_processes": 2}
    )  # fmt: skip
    assert fingerprint(same, paths, seed=0)["id"] == a["id"]
    # ... but the process count a checkpoint was written by does (one RNG state per process)
    assert fingerprint(cfg, paths, seed=0, world_size=2)["id"] != a["id"]
    # the output paths do not matter either
    moved = dataclasses.replace(paths, out=tmp_path / "o2", checkpoints=tmp_path / "c2")
    assert fingerprint(cfg, moved, seed=0)["id"] == a["id"]
    # the contents of the data file and of the base model do
    (base / "extra.txt").write_text("x")
    assert fingerprint(cfg, paths, seed=0)["id"] != a["id"]
    (base / "extra.txt").unlink()
    assert fingerprint(cfg, paths, seed=0)["id"] == a["id"]
    make_pairs(5).write_parquet(data)
    assert fingerprint(cfg, paths, seed=0)["id"] != a["id"]


def test_prepare_run_dir_keeps_stale_until_a_save_and_finds_complete(tmp_path: Path):
    root = tmp_path / "ck"
    stale = root / "oldfingerprint" / "checkpoint-5"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    run_dir, resume = prepare_run_dir(root, {"id": "new"})
    assert resume is None and (stale / "trainer_state.json").read_text() == "{}"
    drop_stale(run_dir)  # after the new run's first checkpoint
    assert sorted(p.name for p in root.iterdir()) == ["new"]
    assert json.loads((run_dir / FINGERPRINT_FILE).read_text()) == {"id": "new"}
    for step, complete in [(2, True), (4, True), (6, False)]:
        c = run_dir / f"checkpoint-{step}"
        c.mkdir()
        if complete:
            (c / "trainer_state.json").write_text("{}")
    assert last_checkpoint(run_dir) == run_dir / "checkpoint-4"
    assert prepare_run_dir(root, {"id": "new"})[1] == run_dir / "checkpoint-4"
    # two processes: complete only with both processes' RNG states (written without a barrier)
    assert last_checkpoint(run_dir, world_size=2) is None
    for step, ranks in [(2, (0, 1)), (4, (0,))]:
        for r in ranks:
            (run_dir / f"checkpoint-{step}" / f"rng_state_{r}.pth").write_bytes(b"")
    assert last_checkpoint(run_dir, world_size=2) == run_dir / "checkpoint-2"
    assert prepare_run_dir(root, {"id": "new"}, 2)[1] == run_dir / "checkpoint-2"


# The killed run: ``karma train`` with every step slowed down (the stage's run function is
# wrapped to add a callback; everything else is the real CLI: params, path checks, staging).
SLOW_CLI = textwrap.dedent(
    """
    import dataclasses, sys, time
    from transformers import TrainerCallback
    import karma.training.train as training
    from karma.cli import main

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.25)

    def slow_run(params, paths):
        return training.run_train(params, paths, callbacks=[Slow()])

    training.STAGE = dataclasses.replace(training.STAGE, run=slow_run)
    main(sys.argv[1:])
    """
)
RESUME_PARAMS = """\
seed: 0
train:
  method: dpo
  global_batch_size: 2
  checkpoint_steps: 3
  trl: {max_steps: 12, learning_rate: 0.001, per_device_train_batch_size: 2, max_length: 64,
        disable_tqdm: true, logging_steps: 1}
"""


@pytest.mark.slow
def test_killed_run_resumes(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    """SIGKILL during ``karma train``; the DVC stage script then resumes from the checkpoint."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "params.yaml").write_text(RESUME_PARAMS)
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    paths = ["--data", str(pairs_file), "--base", str(tiny_model_dir), "--out", "policy",
             "--checkpoints", "ck", "--live-dir", "live", "--metrics", "metrics.json"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", "--params", "params.yaml", *paths],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if list((root / "ck").glob("*/checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"finished or crashed before a checkpoint: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing published: the killed run wrote only its temporary siblings
    assert not (root / "metrics.json").exists() and not (root / "policy").exists()
    assert not (root / "live").exists()
    killed_at = max(
        int(p.parent.name.split("-")[1])
        for p in (root / "ck").glob("*/checkpoint-*/trainer_state.json")
    )
    assert 3 <= killed_at < 12

    rerun = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py"), *paths],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from checkpoint" in rerun.stderr
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] >= killed_at
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["train_loss"])
    assert changed_tensors(tiny_model_dir, root / "policy")
    # the curves cover every step exactly once, before and after the kill
    loss = _curve(root / "live" / "plots" / "metrics" / "loss.tsv")
    assert loss["step"].to_list() == list(range(1, 13))
    assert all(math.isfinite(x) for x in loss["loss"])
    # the rerun cleaned the killed run's temporary outputs; checkpoints emptied after success
    assert _leftovers(root) == [] and not any((root / "ck").iterdir())


# ------------------------------------------------------------------ launcher


def test_launcher_prefix(tmp_path: Path):
    assert STAGE.launcher is launcher_prefix
    assert launcher_prefix(Params()) is None  # python: train in-process
    torchrun = Params(train=TrainConfig(launcher="torchrun", num_processes=2))
    assert launcher_prefix(torchrun) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "2", "--max_restarts", "0",
    ]  # fmt: skip
    accel = Params(train=TrainConfig(launcher="accelerate", num_processes=4))
    assert launcher_prefix(accel) == [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4",
        "--num_machines", "1", "--multi_gpu", "--main_process_port", "0",
    ]  # fmt: skip
    conf = tmp_path / "fsdp.yaml"
    conf.write_text("distributed_type: FSDP\n")
    cfg = TrainConfig(launcher="accelerate", num_processes=8, accelerate_config=str(conf))
    assert launcher_prefix(Params(train=cfg)) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf),
        "--num_processes", "8",
    ]  # fmt: skip
    single = launcher_prefix(Params(train=TrainConfig(launcher="accelerate")))
    assert "--multi_gpu" not in single and single[-2:] == ["--num_processes", "1"]
    with pytest.raises(KarmaError, match=r"'train.num_processes': launcher python runs one"):
        launcher_prefix(Params(train=TrainConfig(num_processes=2)))
    with pytest.raises(KarmaError, match=r"'train.accelerate_config': an accelerate config "
                                         r"needs train.launcher accelerate"):  # fmt: skip
        launcher_prefix(Params(train=TrainConfig(launcher="torchrun", accelerate_config=str(conf))))
    missing = TrainConfig(launcher="accelerate", accelerate_config=str(tmp_path / "no.yaml"))
    with pytest.raises(KarmaError, match="accelerate config file not found"):
        launcher_prefix(Params(train=missing))


@pytest.mark.parametrize(
    ("module", "option"),
    [("torch.distributed.run", "--nproc-per-node"), ("accelerate.commands.launch", "--multi_gpu")],
)
def test_launcher_module_is_runnable(module: str, option: str):
    """The launcher module entry points exist (the launched command would start)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and option in proc.stdout, proc.stderr[-500:]


def test_execute_relaunches_the_command(
    monkeypatch: pytest.MonkeyPatch, pairs_file: Path, tmp_path: Path
):
    calls: list[tuple[list[str], str | None]] = []
    ran: list[Any] = []
    rc = {"value": 0}

    def fake_launch(cmd: list[str], env: dict[str, str]) -> int:
        calls.append((cmd, env.get(pipeline.LAUNCHED_ENV)))
        return rc["value"]

    def stage_run(params: Params, paths: TrainPaths) -> dict[str, Any]:
        ran.append(paths)
        return {"ran": len(ran)}

    stage = dataclasses.replace(STAGE, run=stage_run)
    monkeypatch.setattr(pipeline, "run_launched", fake_launch)
    argv = ["stages/train.py", "--data", str(pairs_file)]
    monkeypatch.setattr(pipeline, "relaunch_argv", lambda: argv)
    monkeypatch.delenv(pipeline.LAUNCHED_ENV, raising=False)
    (tmp_path / "base").mkdir()
    paths = TrainPaths(data=pairs_file, base=tmp_path / "base", out=tmp_path / "policy",
                       checkpoints=tmp_path / "ck")  # fmt: skip
    torchrun = Params(train=TrainConfig(launcher="torchrun", num_processes=2))

    assert pipeline.execute(stage, torchrun, paths) is None  # the launched main one reports
    assert calls == [([*launcher_prefix(torchrun), *argv], "1")] and ran == []
    assert not (tmp_path / "policy").exists()  # the launched processes write it, not this one
    rc["value"] = 3
    with pytest.raises(KarmaError, match="launched command exited with code 3"):
        pipeline.execute(stage, torchrun, paths)
    # bad settings fail in this process, before anything is launched
    bad = Params(train=TrainConfig(launcher="torchrun", num_processes=2, global_batch_size=3))
    with pytest.raises(KarmaError, match="global_batch_size': not a multiple"):
        pipeline.execute(stage, bad, paths)
    assert len(calls) == 2
    # the python launcher trains in-process, into the staged temporary output
    assert pipeline.execute(stage, Params(), paths) == {"ran": 1} and len(calls) == 2
    assert ran[0].out.name.startswith(".policy.karma-tmp-") and (tmp_path / "policy").is_dir()
    # inside the launched processes: in-process, never launched again
    monkeypatch.setenv(pipeline.LAUNCHED_ENV, "1")
    assert pipeline.execute(stage, torchrun, paths) == {"ran": 2} and len(calls) == 2


def test_relaunch_argv_keeps_module_form(monkeypatch: pytest.MonkeyPatch):
    """``python -m karma.cli`` is relaunched as ``-m karma.cli`` (run as a script, karma/ would
    come first on sys.path and karma/io.py would shadow the stdlib's io)."""
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="karma.cli")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/karma/cli.py", "train", "--out", "p"])
    assert pipeline.relaunch_argv() == ["-m", "karma.cli", "train", "--out", "p"]
    main.__spec__ = None  # type: ignore[assignment]
    assert pipeline.relaunch_argv() == ["/x/karma/cli.py", "train", "--out", "p"]


# ------------------------------------------------------------------ two processes (torchrun, gloo)

#: 16 pairs, global batch 4 (2 per process x 2 processes, or 2 x accumulation 2 in one):
#: 4 steps = one epoch; 10 held-out pairs (not a multiple of 2 x 3: uneven shares).
MP_PARAMS = """\
seed: 0
train:
  method: dpo
  global_batch_size: 4
  launcher: torchrun
  num_processes: 2
  checkpoint_steps: 2
  trl: {max_steps: 4, per_device_train_batch_size: 2, learning_rate: 0.001,
        lr_scheduler_type: linear, max_length: 96, disable_tqdm: true, logging_steps: 1,
        per_device_eval_batch_size: 3}
"""
MP_PATHS = ["--data", "pairs.parquet", "--eval-data", "test_prefs.parquet", "--out", "policy",
            "--checkpoints", "ck", "--live-dir", "live", "--metrics", "metrics.json"]  # fmt: skip


def _mp_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(MP_PARAMS)
    make_pairs(16).write_parquet(root / "pairs.parquet")
    make_pairs(10, seed=7, offset=100).write_parquet(root / "test_prefs.parquet")
    return root


def _mp_env(root: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "KARMA_CACHE_DIR": str(root / "cache"), "PYTHONPATH": str(REPO)}  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``karma train`` with two processes (torchrun, gloo): ``(run dir, completed process)``."""
    root = _mp_dir(tmp_path_factory.mktemp("mp") / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "train", "--params", "params.yaml",
         "--base", str(tiny_model_dir), *MP_PATHS],
        cwd=root, env=_mp_env(root), capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    return root, proc


def test_two_processes_match_one(two_processes: tuple, tiny_model_dir: Path, tmp_path: Path):
    """Two processes and one process with the same global batch train the same policy.

    Tolerances: with two processes the gradient average (g0 + g1) / 2 equals one process's
    accumulated g0 / 2 + g1 / 2 exactly (halving is exact in binary floating point), and the
    runs here are bitwise equal. Other process counts, thread counts or kernels change the order
    of float32 additions (~1e-7 relative per step): the research runs measured loss differences
    <= 9e-8 and weight differences <= 7e-5 of the size of the update. The bounds, 1e-5 (loss,
    held-out) and 1e-3 of the update (weights), leave 100x and 15x margins, while a real
    difference (a missing shard, another batch) is of the order of the update itself.
    """
    root, proc = two_processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)  # one JSON document: only the main process prints
    written = json.loads((root / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k not in ("wall_time_s", "tokens_per_second")} == (
        written
    )
    assert {k: metrics[k] for k in ("batch.world_size", "batch.accumulation", "batch.global")} \
        == {"batch.world_size": 2, "batch.accumulation": 1, "batch.global": 4}  # fmt: skip
    assert metrics["steps"] == 4 and math.isfinite(metrics["loss"])
    assert "launching:" in proc.stderr and "torch.distributed.run" in proc.stderr
    assert len(changed_tensors(tiny_model_dir, root / "policy")) > 10
    assert _leftovers(root) == [] and not any((root / "ck").iterdir())
    assert json.loads((root / "policy" / "karma.json").read_text())["method"] == "dpo"
    assert not (root / "policy" / "training_args.bin").exists()

    one = TrainPaths(data=root / "pairs.parquet", base=tiny_model_dir, out=tmp_path / "policy",
                     checkpoints=tmp_path / "ck", eval_data=root / "test_prefs.parquet",
                     live_dir=tmp_path / "live", metrics=tmp_path / "m.json")  # fmt: skip
    params = yaml.safe_load(MP_PARAMS)
    params["train"].update(launcher="python", num_processes=1)
    single = run_train(Params.model_validate(params), one)
    assert single["batch.accumulation"] == 2 and single["batch.global"] == 4
    assert math.isfinite(single["loss"]) and math.isfinite(single["train_loss"])

    curve = lambda d: _curve(d / "plots" / "metrics" / "loss.tsv")  # noqa: E731
    a, b = curve(root / "live"), curve(tmp_path / "live")
    assert a["step"].to_list() == b["step"].to_list() == [1, 2, 3, 4]
    assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True)) <= 1e-5
    w0, w1, w2 = _state(tiny_model_dir), _state(one.out), _state(root / "policy")
    update = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w0)
    assert update > 1e-4 and diff <= 1e-3 * update, (diff, update)
    loss_diff = max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True))
    print(f"1 vs 2 processes: loss max|diff| {loss_diff:.3g}, weights max|diff| {diff:.3g} "
          f"(update {update:.3g})")  # fmt: skip
    for key in [k for k in single if k.startswith("heldout.")]:
        assert metrics[key] == pytest.approx(single[key], abs=1e-5), key
    assert metrics["heldout.n"] == 10 and metrics["heldout.delta.reward_margin.ci_low"] > 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_two_processes_killed_and_resumed(two_processes: tuple, tiny_model_dir: Path,
                                          tmp_path: Path):  # fmt: skip
    """SIGKILL the stage process of a two-process run: the launcher and both workers die with
    it (nothing published); the DVC stage script resumes from the last checkpoint that both
    processes completed and ends with the uninterrupted run's policy."""
    full, _ = two_processes
    root = _mp_dir(tmp_path / "kill")
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI.replace("time.sleep(0.25)", "time.sleep(2.0)"))
    paths = ["--base", str(tiny_model_dir), *MP_PATHS]
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", "--params", "params.yaml", *paths],
        cwd=root, env=_mp_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ck = root / "ck"
    done = ["trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"]
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if any(all((c / f).is_file() for f in done) for c in ck.glob("*/checkpoint-2")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"finished or crashed before a checkpoint: {proc.stderr.read()}"
        tree = _descendants(proc.pid)
        assert len(tree) >= 3, tree  # the launcher and its two workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed = time.monotonic()
        while time.monotonic() < killed + 30 and any(_alive(p) for p in tree):
            time.sleep(0.1)
        assert not [p for p in tree if _alive(p)], "launched processes outlived the stage"
        print(f"{len(tree)} launched processes gone {time.monotonic() - killed:.1f} s after "
              "the SIGKILL")  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (root / "metrics.json").exists() and not (root / "policy").exists()
    killed_at = max(int(p.parent.name.split("-")[1]) for p in ck.glob("*/checkpoint-*/" + done[0]))
    assert 2 <= killed_at < 4

    rerun = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py"), *paths],
        cwd=root, env=_mp_env(root), capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint" in rerun.stderr
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from_step"] == 2
    assert math.isfinite(metrics["loss"]) and changed_tensors(tiny_model_dir, root / "policy")
    # resumed = uninterrupted: the same weights and the same curve, every step once
    a, b = _state(full / "policy"), _state(root / "policy")
    resumed_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed vs uninterrupted (2 processes): weights max|diff| {resumed_diff:.3g}")
    assert resumed_diff <= 1e-6
    loss = _curve(root / "live" / "plots" / "metrics" / "loss.tsv")
    assert loss["step"].to_list() == [1, 2, 3, 4]
    ref = _curve(full / "live" / "plots" / "metrics" / "loss.tsv")
    assert loss["loss"].to_list() == pytest.approx(ref["loss"].to_list(), abs=1e-6)
    assert _leftovers(root) == [] and not any(ck.iterdir())


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(two_processes: tuple, tiny_model_dir: Path,
                                             tmp_path: Path):  # fmt: skip
    """``launcher: accelerate`` (no config file: ``--multi_gpu`` on a free port, torchrun
    underneath) starts two real processes on CPU too, and trains the torchrun run's policy."""
    full, _ = two_processes
    root = _mp_dir(tmp_path / "accel")
    params = yaml.safe_load(MP_PARAMS)
    params["train"]["launcher"] = "accelerate"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "train", "--params", "params.yaml",
         "--base", str(tiny_model_dir), *MP_PATHS],
        cwd=root, env=_mp_env(root), capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate.commands.launch --num_processes 2" in proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["batch.world_size"] == 2 and metrics["batch.accumulation"] == 1
    assert math.isfinite(metrics["loss"]) and changed_tensors(tiny_model_dir, root / "policy")
    a, b = _state(full / "policy"), _state(root / "policy")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_trl_field_table_equals_trl() -> None:
    """The table the early checks read (no TRL import) is TRL's own dataclasses, for every
    objective: after a TRL upgrade, ``python -m karma.training.trl_fields`` regenerates it."""
    from karma.training.trl_fields import fields, reflect

    for method, table in reflect().items():
        assert fields(method) == table, method
    assert fields("dpo")["learning_rate"] == ["float"]
    assert "max_steps" in fields("kto")


def test_a_bad_trl_value_fails_before_trl_loads() -> None:
    """``check_settings`` needs no TRL import: run it in a fresh interpreter and check that
    neither trl nor torch were imported when the one-line error came."""
    code = (
        "import sys\n"
        "from karma.core.errors import KarmaError\n"
        "from karma.training.settings import TrainConfig\n"
        "from karma.training.trl_config import check_settings\n"
        "try:\n"
        "    check_settings(TrainConfig(trl={'max_steps': 'many'}))\n"
        "except KarmaError as err:\n"
        "    print(err)\n"
        "print('trl' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    error, loaded = out.stdout.strip().splitlines()
    assert "train.trl.max_steps" in error and "wrong type" in error, out.stdout
    assert loaded == "False False", out.stdout
