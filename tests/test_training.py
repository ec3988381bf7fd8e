"""Training stage: DPO and SFT on the tiny offline model, the train settings through the CLI,
resume after a kill, the accelerate launcher."""

from __future__ import annotations

import dataclasses
import json
import logging
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

import polars as pl
import pytest

from karma import pipeline
from karma.cli import main
from karma.config import Params, TrainConfig
from karma.errors import KarmaError
from karma.training import (
    FINGERPRINT_FILE,
    STAGE,
    TrainPaths,
    apply_recipe,
    build_trl_config,
    fingerprint,
    last_checkpoint,
    launcher_prefix,
    load_pairs,
    prepare_run_dir,
    run_train,
    trl_kwargs,
)
from tests.fixtures import CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
FAST_TRL = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "max_length": 96,
    "disable_tqdm": True,
}


def make_pairs(n: int, seed: int = 0) -> pl.DataFrame:
    """``n`` made-up pairs in the select stage's schema (TRL conversational + metadata)."""
    import random

    rng = random.Random(seed)
    topics = ["the sun", "water", "paris", "the moon", "atoms", "energy", "rome", "light"]
    rows = []
    for i in range(n):
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
def karma_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run(*argv) -> (exit code, stdout, stderr)`` of ``karma`` called in-process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:] = handlers  # the CLI's setup_logging replaced them
    root.setLevel(level)


def one_line_error(code: int, err: str) -> str:
    """The CLI error contract: exit 1, one line on stderr, no traceback; returns the message."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("karma: error: ")
    return lines[0].removeprefix("karma: error: ")


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


def _curve(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, separator="\t")


def _leftovers(root: Path) -> list[str]:
    """Temporary or set-aside siblings that pipeline.execute must never leave behind."""
    return sorted(p.name for p in root.rglob("*") if ".karma-" in p.name)


# ------------------------------------------------------------------ training on the tiny model


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_tiny_model_trains(method: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    paths = _paths(tmp_path, pairs_file, tiny_model_dir)
    params = Params(seed=0, train=TrainConfig(method=method, trl=FAST_TRL, checkpoint_steps=2))
    metrics = run_train(params, paths)

    assert metrics["steps"] == 4 and metrics["resumed_from_step"] == 0 and metrics["pairs"] == 16
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["train_loss"])
    assert metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert json.loads(paths.metrics.read_text()) == pytest.approx(metrics)
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
    else:
        assert not (curves / "rewards").exists() and "rewards_margins" not in metrics

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
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, karma_cli: Callable
):
    """run_train and ``karma train`` with the same settings and seed: byte-identical policies.

    The CLI gets no params file: ``-S train.trl.<key>`` changes one key of the default
    ``train.trl`` (the default lr_scheduler_type is constant, TRL's is linear).
    """
    fast = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.001,
            "max_length": 96, "disable_tqdm": True}  # fmt: skip
    cfg = TrainConfig(method="dpo", trl={**TrainConfig().trl, **fast}, checkpoint_steps=2)
    a = _paths(tmp_path, pairs_file, tiny_model_dir, "a")
    metrics_a = run_train(Params(seed=1, train=cfg), a)

    b = _paths(tmp_path, pairs_file, tiny_model_dir, "b")
    sets = [arg for k, v in fast.items() for arg in ("-S", f"train.trl.{k}={json.dumps(v)}")]
    code, out, err = karma_cli(
        "train", "--data", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(b.out),
        "--checkpoints", str(b.checkpoints), "--live-dir", str(b.live_dir),
        "--metrics", str(b.metrics), "--seed", "1", "--checkpoint-steps", "2", *sets,
    )  # fmt: skip
    assert code == 0, err
    metrics_b = json.loads(b.metrics.read_text())
    assert json.loads(out) == metrics_b  # the CLI prints the metrics JSON on stdout
    assert _leftovers(tmp_path / "b") == []

    for name in ("model.safetensors", "tokenizer.json", "config.json", "README.md"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    assert metrics_a["loss"] == metrics_b["loss"] and math.isfinite(metrics_a["loss"])
    assert metrics_a["learning_rate"] == metrics_b["learning_rate"] == 0.001  # constant
    assert changed_tensors(tiny_model_dir, a.out), "two steps at lr 1e-3 change the weights"


def test_lora_dpo_merges_adapter(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    pytest.importorskip("peft")
    paths = _paths(tmp_path, pairs_file, tiny_model_dir)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = TrainConfig(method="dpo", trl={**FAST_TRL, "max_steps": 2}, lora=lora)
    metrics = run_train(Params(train=cfg), paths)
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 2
    changed = changed_tensors(tiny_model_dir, paths.out)  # same keys: the adapter is merged
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


# ------------------------------------------------------------------ data


def test_load_pairs_formats(pairs_file: Path):
    dpo = load_pairs(pairs_file, "dpo")
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
         "--method: not one of the choices; did you mean 'dpo'? (got 'dpx'; expected dpo | sft)"),
        (["--launcher", "slurm"],
         "--launcher: not one of the choices (got 'slurm'; expected python | accelerate)"),
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
         "checkpoint_steps, dpo, dtype, keep_checkpoints, launcher, lora, method, "
         "num_processes, recipe, sft, trl)"),
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
    assert sft.max_steps == 8 and sft.learning_rate == 2e-5  # the default train.trl


def test_trl_rejects_bad_value(tmp_path: Path):
    cfg = TrainConfig(trl={"lr_scheduler_type": "wobbly"})
    with pytest.raises(KarmaError, match="TRL rejected the DPOConfig arguments"):
        build_trl_config(cfg, seed=0, output_dir=tmp_path)


def test_paper_gpu_recipe():
    recipe = str(REPO / "params/recipes/paper-gpu.yaml")
    cfg = apply_recipe(TrainConfig(method="dpo", recipe=recipe))
    assert cfg.recipe == recipe
    kw = trl_kwargs(cfg, seed=0, output_dir="x")
    assert kw["bf16"] is True and kw["num_train_epochs"] == 1 and kw["max_steps"] == -1
    assert kw["per_device_train_batch_size"] == 6 and kw["gradient_accumulation_steps"] == 4
    assert kw["learning_rate"] == 5e-5 and kw["warmup_steps"] == 500 and kw["beta"] == 0.1
    assert kw["save_steps"] == cfg.checkpoint_steps
    # the recipe merges into train.trl: keys it does not set stay
    assert (
        apply_recipe(TrainConfig(trl={"max_grad_norm": 0.5}, recipe=recipe)).trl["max_grad_norm"]
        == 0.5
    )


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
    # operational settings do not change the weights, so a run resumes across them
    same = cfg.model_copy(
        update={"keep_checkpoints": True, "checkpoint_steps": 1, "launcher": "accelerate",
                "num_processes": 2}
    )  # fmt: skip
    assert fingerprint(same, paths, seed=0)["id"] == a["id"]
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


def test_prepare_run_dir_drops_stale_and_finds_complete(tmp_path: Path):
    root = tmp_path / "ck"
    stale = root / "oldfingerprint" / "checkpoint-5"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    run_dir, resume = prepare_run_dir(root, {"id": "new"})
    assert resume is None and not (root / "oldfingerprint").exists()
    assert json.loads((run_dir / FINGERPRINT_FILE).read_text()) == {"id": "new"}
    for step, complete in [(2, True), (4, True), (6, False)]:
        c = run_dir / f"checkpoint-{step}"
        c.mkdir()
        if complete:
            (c / "trainer_state.json").write_text("{}")
    assert last_checkpoint(run_dir) == run_dir / "checkpoint-4"
    assert prepare_run_dir(root, {"id": "new"})[1] == run_dir / "checkpoint-4"


# The killed run: ``karma train`` with every step slowed down (the stage's run function is
# wrapped to add a callback; everything else is the real CLI: params, path checks, staging).
SLOW_CLI = textwrap.dedent(
    """
    import dataclasses, sys, time
    from transformers import TrainerCallback
    import karma.training as training
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
    accel = Params(train=TrainConfig(launcher="accelerate", num_processes=4))
    assert launcher_prefix(accel) == [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu",
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


def test_launcher_module_is_runnable():
    """The accelerate module entry point exists (the launched command would start)."""
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "--num_processes" in proc.stdout


def test_execute_relaunches_the_command_under_accelerate(
    monkeypatch: pytest.MonkeyPatch, pairs_file: Path, tmp_path: Path
):
    calls: list[tuple[list[str], str | None]] = []
    ran: list[Any] = []
    rc = {"value": 0}

    class Done:
        def __init__(self, code: int) -> None:
            self.returncode = code

    def fake_run(cmd, env, check):
        calls.append((cmd, env.get(pipeline.LAUNCHED_ENV)))
        return Done(rc["value"])

    def stage_run(params: Params, paths: TrainPaths) -> dict[str, Any]:
        ran.append(paths)
        return {"ran": len(ran)}

    stage = dataclasses.replace(STAGE, run=stage_run)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "--data", str(pairs_file)])
    monkeypatch.delenv(pipeline.LAUNCHED_ENV, raising=False)
    (tmp_path / "base").mkdir()
    paths = TrainPaths(data=pairs_file, base=tmp_path / "base", out=tmp_path / "policy",
                       checkpoints=tmp_path / "ck")  # fmt: skip
    accel = Params(train=TrainConfig(launcher="accelerate", num_processes=2))

    assert pipeline.execute(stage, accel, paths) == {}
    assert calls == [([*launcher_prefix(accel), *sys.argv], "1")] and ran == []
    assert not (tmp_path / "policy").exists()  # the launched processes write it, not this one
    rc["value"] = 3
    with pytest.raises(KarmaError, match="launched command exited with code 3"):
        pipeline.execute(stage, accel, paths)
    # the python launcher trains in-process, into the staged temporary output
    assert pipeline.execute(stage, Params(), paths) == {"ran": 1} and len(calls) == 2
    assert ran[0].out.name == ".policy.karma-tmp" and (tmp_path / "policy").is_dir()
    # inside the launched processes: in-process, never launched again
    monkeypatch.setenv(pipeline.LAUNCHED_ENV, "1")
    assert pipeline.execute(stage, accel, paths) == {"ran": 2} and len(calls) == 2
