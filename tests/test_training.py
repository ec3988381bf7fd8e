"""Training stage: DPO and SFT on the tiny offline model, params validation, resume, launcher."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from karma.errors import KarmaError
from karma.training import (
    FINGERPRINT_FILE,
    LAUNCHED_ENV,
    TrainConfig,
    TrainPaths,
    build_trl_config,
    config_from_params,
    fingerprint,
    last_checkpoint,
    launch_command,
    load_pairs,
    prepare_run_dir,
    relaunch_if_needed,
    run_training,
    trl_kwargs,
)

REPO = Path(__file__).resolve().parents[1]
FAST_TRL = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "max_length": 96,
    "save_steps": 2,
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


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.parquet"
    make_pairs(16).write_parquet(path)
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


# ------------------------------------------------------------------ training on the tiny model


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_tiny_model_trains(method: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    paths = _paths(tmp_path, pairs_file, tiny_model_dir)
    cfg = TrainConfig(method=method, trl=dict(FAST_TRL))
    metrics = run_training(cfg, paths, seed=0)

    assert metrics["steps"] == 4
    assert metrics["resumed_from_step"] == 0
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["train_loss"])
    assert metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert json.loads(Path(paths.metrics).read_text()) == pytest.approx(metrics)

    before, after = _state(tiny_model_dir), _state(Path(paths.out))
    assert before.keys() == after.keys()
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) > len(before) // 2, "most weight tensors must change"

    out = Path(paths.out)
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert f"({method.upper()})" in card and "16 preference pairs" in card

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template

    curves = Path(paths.live_dir) / "plots" / "metrics"
    loss = pl.read_csv(curves / "loss.tsv", separator="\t")
    assert loss.columns == ["step", "loss"]
    assert loss["step"].to_list() == [1, 2, 3, 4]
    assert (curves / "learning_rate.tsv").is_file()
    if method == "dpo":
        assert (curves / "rewards" / "accuracies.tsv").is_file()
        assert (curves / "rewards" / "margins.tsv").is_file()
        assert "rewards_margins" in metrics
        # learning at lr 1e-3 on the same pairs: the margin grows above zero
        assert metrics["rewards_margins"] > 0
    # checkpoints are removed after success, the persisted root stays
    assert Path(paths.checkpoints).is_dir() and not any(Path(paths.checkpoints).iterdir())


def test_same_seed_gives_identical_policy(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    cfg = TrainConfig(method="dpo", trl={**FAST_TRL, "max_steps": 2})
    a = _paths(tmp_path, pairs_file, tiny_model_dir, "a")
    b = _paths(tmp_path, pairs_file, tiny_model_dir, "b")
    run_training(cfg, a, seed=1)
    run_training(cfg, b, seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (Path(a.out) / name).read_bytes() == (Path(b.out) / name).read_bytes(), name
    card_a = (Path(a.out) / "README.md").read_text().replace(str(a.data), "")
    assert card_a == (Path(b.out) / "README.md").read_text().replace(str(b.data), "")


def test_lora_dpo_merges_adapter(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    pytest.importorskip("peft")
    paths = _paths(tmp_path, pairs_file, tiny_model_dir)
    cfg = TrainConfig(
        method="dpo",
        trl=dict(FAST_TRL),
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    metrics = run_training(cfg, paths, seed=0)
    assert math.isfinite(metrics["loss"])
    before, after = _state(tiny_model_dir), _state(Path(paths.out))
    assert before.keys() == after.keys(), "adapter merged: plain model keys only"
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


# ------------------------------------------------------------------ data and params errors


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


def test_unknown_method():
    with pytest.raises(KarmaError) as err:
        config_from_params({"method": "ppo"})
    msg = str(err.value)
    assert "method" in msg and "'ppo'" in msg and "\n" not in msg


def test_unknown_train_key():
    with pytest.raises(KarmaError, match="did you mean 'method'"):
        config_from_params({"methd": "dpo"})


def test_unknown_trl_field_did_you_mean():
    cfg = config_from_params({"trl": {"learning_rat": 1e-5}})
    with pytest.raises(KarmaError) as err:
        trl_kwargs(cfg, seed=0, output_dir="x")
    msg = str(err.value)
    assert "trl.learning_rat" in msg and "did you mean 'learning_rate'" in msg
    # a DPO-only field in the sft block is caught too
    with pytest.raises(KarmaError, match=r"sft\.beta.*SFTConfig"):
        trl_kwargs(config_from_params({"sft": {"beta": 0.1}}), seed=0, output_dir="x")


def test_reserved_trl_fields():
    with pytest.raises(KarmaError, match="top-level 'seed'"):
        config_from_params({"trl": {"seed": 3}})
    with pytest.raises(KarmaError, match=r"train\.checkpoints"):
        config_from_params({"dpo": {"output_dir": "x"}})


def test_trl_config_passthrough_and_defaults(tmp_path: Path):
    cfg = config_from_params(
        {"method": "dpo", "trl": {"learning_rate": "5e-5", "max_steps": 7}, "dpo": {"beta": 0.3}}
    )
    args = build_trl_config(cfg, seed=5, output_dir=tmp_path)
    assert type(args).__name__ == "DPOConfig"
    assert args.learning_rate == 5e-5  # YAML 1.1 string coerced for a float field
    assert args.max_steps == 7 and args.beta == 0.3 and args.seed == 5
    assert args.bf16 is False and args.gradient_checkpointing is False
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    sft = build_trl_config(config_from_params({"method": "sft"}), seed=0, output_dir=tmp_path)
    assert type(sft).__name__ == "SFTConfig"


def test_trl_rejects_bad_value(tmp_path: Path):
    cfg = config_from_params({"trl": {"lr_scheduler_type": "wobbly"}})
    with pytest.raises(KarmaError, match="TRL rejected the DPOConfig arguments"):
        build_trl_config(cfg, seed=0, output_dir=tmp_path)


def test_paper_gpu_recipe():
    cfg = config_from_params(
        {"method": "dpo", "recipe": str(REPO / "params/recipes/paper-gpu.yaml")}
    )
    kw = trl_kwargs(cfg, seed=0, output_dir="x")
    assert kw["bf16"] is True and kw["num_train_epochs"] == 1 and kw["max_steps"] == -1
    assert kw["per_device_train_batch_size"] == 6 and kw["gradient_accumulation_steps"] == 4
    assert kw["learning_rate"] == 5e-5 and kw["warmup_steps"] == 500 and "beta" in kw
    with pytest.raises(KarmaError, match="recipe file not found"):
        config_from_params({"recipe": "nope.yaml"})


def test_bad_lora_field(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    pytest.importorskip("peft")
    cfg = TrainConfig(lora={"r": 4, "lora_alhpa": 8})
    with pytest.raises(KarmaError, match=r"lora\.lora_alhpa.*did you mean 'lora_alpha'"):
        run_training(cfg, _paths(tmp_path, pairs_file, tiny_model_dir), seed=0)


def test_missing_base_model(pairs_file: Path, tmp_path: Path):
    with pytest.raises(KarmaError, match="base model directory not found"):
        run_training(TrainConfig(), _paths(tmp_path, pairs_file, tmp_path / "nobase"), seed=0)


def test_cli_bad_params_one_line(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "train", "--method", "sft",
         "--params", str(tmp_path / "none.yaml"), "--data", str(tmp_path / "missing.parquet")],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("karma: error:") and "training data file not found" in lines[-1]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ checkpoints / fingerprint


def test_fingerprint_tracks_inputs(tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "p.parquet"
    make_pairs(4).write_parquet(data)
    paths = TrainPaths(data=data, base=tiny_model_dir)
    cfg = TrainConfig(trl={"max_steps": 3})
    a = fingerprint(cfg, paths, seed=0)
    assert fingerprint(cfg, paths, seed=0) == a
    assert fingerprint(cfg, paths, seed=1)["id"] != a["id"]
    assert fingerprint(TrainConfig(trl={"max_steps": 4}), paths, seed=0)["id"] != a["id"]
    assert fingerprint(TrainConfig(method="sft"), paths, seed=0)["id"] != a["id"]
    # launcher and checkpoint keeping do not matter for the weights
    same = TrainConfig(trl={"max_steps": 3}, keep_checkpoints=True)
    assert fingerprint(same, paths, seed=0)["id"] == a["id"]
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


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from transformers import TrainerCallback
    from karma.cli import setup_logging
    from karma.training import TrainConfig, TrainPaths, run_training

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.25)

    setup_logging()
    root, data, base, mode = sys.argv[1:5]
    paths = TrainPaths(data=data, base=base, out=f"{root}/policy", checkpoints=f"{root}/ck",
                       live_dir=f"{root}/live", metrics=f"{root}/metrics.json")
    cfg = TrainConfig(method="dpo", trl={"max_steps": 24, "save_steps": 3, "learning_rate": 1e-3,
                      "per_device_train_batch_size": 2, "max_length": 64, "disable_tqdm": True})
    run_training(cfg, paths, seed=0, callbacks=[Slow()] if mode == "slow" else [])
    """
)


def test_killed_run_resumes(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    root = tmp_path / "run"
    argv = [sys.executable, str(script), str(root), str(pairs_file), str(tiny_model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([*argv, "slow"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list((root / "ck").glob("*/checkpoint-*/trainer_state.json"))
            if runs:
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
    assert not (root / "metrics.json").exists() and not (root / "policy").exists()
    killed_at = max(
        int(p.parent.name.split("-")[1])
        for p in (root / "ck").glob("*/checkpoint-*/trainer_state.json")
    )
    assert 3 <= killed_at < 24

    rerun = subprocess.run([*argv, "fast"], env=env, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from checkpoint" in rerun.stderr
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["steps"] == 24
    assert metrics["resumed_from_step"] >= killed_at
    # the curves cover every step exactly once, before and after the kill
    loss = pl.read_csv(root / "live" / "plots" / "metrics" / "loss.tsv", separator="\t")
    assert loss["step"].to_list() == list(range(1, 25))


# ------------------------------------------------------------------ launcher


def test_launch_command_python():
    cmd = launch_command(TrainConfig(), ["stages/train.py", "--x"])
    assert cmd == [sys.executable, "stages/train.py", "--x"]


def test_launch_command_accelerate(tmp_path: Path):
    cmd = launch_command(TrainConfig(launcher="accelerate", num_processes=4), ["stages/train.py"])
    assert cmd == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "4", "--multi_gpu", "stages/train.py",
    ]  # fmt: skip
    conf = tmp_path / "fsdp.yaml"
    conf.write_text("distributed_type: FSDP\n")
    cfg = TrainConfig(launcher="accelerate", num_processes=8, accelerate_config=str(conf))
    assert launch_command(cfg, ["stages/train.py"]) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf),
        "--num_processes", "8", "stages/train.py",
    ]  # fmt: skip
    single = launch_command(TrainConfig(launcher="accelerate"), ["s.py"])
    assert "--multi_gpu" not in single and single[-3:] == ["--num_processes", "1", "s.py"]


def test_launch_command_is_runnable():
    """The accelerate module entry point exists (the command would start)."""
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "--num_processes" in proc.stdout


def test_relaunch_if_needed(monkeypatch: pytest.MonkeyPatch):
    calls = []

    class Done:
        def __init__(self, rc: int) -> None:
            self.returncode = rc

    rc = {"value": 0}

    def fake_run(cmd, env, check):
        calls.append((cmd, env.get(LAUNCHED_ENV)))
        return Done(rc["value"])

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    assert relaunch_if_needed(TrainConfig(), ["stages/train.py"]) is False
    cfg = TrainConfig(launcher="accelerate", num_processes=2)
    assert relaunch_if_needed(cfg, ["stages/train.py"]) is True
    assert calls[-1] == (launch_command(cfg, ["stages/train.py"]), "1")
    rc["value"] = 3
    with pytest.raises(KarmaError, match="exited with code 3"):
        relaunch_if_needed(cfg, ["stages/train.py"])
    monkeypatch.setenv(LAUNCHED_ENV, "1")  # inside the launched processes: train in-process
    assert relaunch_if_needed(cfg, ["stages/train.py"]) is False


def test_bad_launcher_params(tmp_path: Path):
    with pytest.raises(KarmaError, match="launcher"):
        config_from_params({"launcher": "slurm"})
    with pytest.raises(KarmaError, match="num_processes"):
        config_from_params({"num_processes": 0})
    with pytest.raises(KarmaError, match="accelerate config file not found"):
        config_from_params({"accelerate_config": str(tmp_path / "none.yaml")})
