"""Train a policy on preference pairs with TRL (DPO or SFT), tracked with dvclive, resumable.

TRL's own arguments pass through from params untouched: ``train.trl`` goes to the trainer
config of either method (``DPOConfig`` / ``SFTConfig``), ``train.dpo`` / ``train.sft`` only to
that method's config. Unknown names fail with a did-you-mean before any model is loaded.

Checkpoints go to ``<checkpoints>/<fingerprint>/checkpoint-<step>``; the fingerprint hashes
the method, TRL args, LoRA, seed, the data file and the base model, so a changed input never
resumes from a stale checkpoint, and a killed run resumes from its last complete checkpoint.

>>> from karma.training import TrainConfig, run_training
>>> cfg = TrainConfig(method="sft", trl={"max_steps": 5})
>>> paths = TrainPaths(data="pairs.parquet", base="models/base", out="out/policy")
>>> metrics = run_training(cfg, paths, seed=0)  # doctest: +SKIP

Multi-GPU: ``train.launcher: accelerate`` (+ ``num_processes``, ``accelerate_config``) makes the
stage re-run itself under ``accelerate launch`` (see :func:`launch_command`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from karma.errors import KarmaError
from karma.io import atomic_path, write_json

log = logging.getLogger(__name__)

WHERE = "params.yaml:train"
METHODS = ("dpo", "sft")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
LAUNCHED_ENV = "KARMA_TRAIN_LAUNCHED"
FINGERPRINT_FILE = "karma_fingerprint.json"

# Settings karma owns: the user's TRL blocks may not set them (they come from elsewhere).
RESERVED = {
    "output_dir": "train.checkpoints",
    "seed": "the top-level 'seed' param",
    "report_to": "karma (tracking is dvclive; curves in train.live_dir)",
    "resume_from_checkpoint": "karma (resumes automatically)",
}

# Karma's defaults under the user's TRL args (CPU friendly; every key is overridable).
TRL_DEFAULTS: dict[str, Any] = {
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 10,
    "save_total_limit": 2,
    "include_num_input_tokens_seen": "non_padding",
    "dataloader_num_workers": 0,
    "disable_tqdm": False,
}

# Metric names (as TRL logs them) written to the dvclive curves.
CURVE_SKIP = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_tokens_per_second",
    "train_loss",
    "total_flos",
    "num_input_tokens_seen",
    "num_tokens",
)


@dataclass
class TrainConfig:
    """``train`` params (TRL's own fields live in the ``trl`` / ``dpo`` / ``sft`` dicts).

    method: ``dpo`` (DPOTrainer with an explicit reference model) or ``sft`` (prompt + chosen).
    recipe: optional YAML file whose ``train.trl|dpo|sft|lora`` blocks override these.
    trl: fields for the trainer config of either method (``DPOConfig`` / ``SFTConfig``).
    dpo / sft: fields only for that method's config (e.g. ``dpo: {beta: 0.1}``).
    lora: null, or ``peft.LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``...).
    dtype: dtype the base model is loaded in (mixed precision is ``trl.bf16``).
    launcher: ``python`` or ``accelerate`` (the stage re-executes itself under accelerate).
    num_processes / accelerate_config: passed to ``accelerate launch``.
    keep_checkpoints: keep the checkpoint directory after a successful run.
    """

    method: Literal["dpo", "sft"] = "dpo"
    recipe: str | None = None
    trl: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    launcher: Literal["python", "accelerate"] = "python"
    num_processes: int = 1
    accelerate_config: str | None = None
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
            raise KarmaError(
                f"unknown training method {hint}",
                file=WHERE,
                field="method",
                value=self.method,
                expected=" | ".join(METHODS),
            )
        if self.launcher not in ("python", "accelerate"):
            raise KarmaError(
                "unknown launcher",
                file=WHERE,
                field="launcher",
                value=self.launcher,
                expected="python | accelerate",
            )
        if self.num_processes < 1:
            raise KarmaError(
                "must be >= 1", file=WHERE, field="num_processes", value=self.num_processes
            )
        for block in ("trl", "dpo", "sft"):
            value = getattr(self, block)
            if value is None:
                setattr(self, block, {})
            elif not isinstance(value, dict):
                raise KarmaError("must be a mapping", file=WHERE, field=block, value=value)
            for key in getattr(self, block):
                if key in RESERVED:
                    raise KarmaError(
                        f"is set by {RESERVED[key]}", file=WHERE, field=f"{block}.{key}"
                    )
        if self.lora is not None and not isinstance(self.lora, dict):
            raise KarmaError("must be null or a mapping", file=WHERE, field="lora", value=self.lora)
        if self.accelerate_config is not None and not Path(self.accelerate_config).is_file():
            raise KarmaError(
                "accelerate config file not found",
                file=WHERE,
                field="accelerate_config",
                value=self.accelerate_config,
            )
        if self.recipe is not None:
            self._apply_recipe(self.recipe)

    def _apply_recipe(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise KarmaError("recipe file not found", file=WHERE, field="recipe", value=path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise KarmaError(f"not valid YAML: {' '.join(str(err).split())}", file=p) from None
        block = data.get("train", data) if isinstance(data, dict) else None
        if not isinstance(block, dict):
            raise KarmaError("must hold a 'train' mapping", file=p)
        allowed = {"trl", "dpo", "sft", "lora", "dtype"}
        for key, value in block.items():
            if key not in allowed:
                raise KarmaError(
                    "unknown recipe key", file=p, field=key, expected=", ".join(sorted(allowed))
                )
            if key in ("trl", "dpo", "sft"):
                if not isinstance(value, dict):
                    raise KarmaError("must be a mapping", file=p, field=key, value=value)
                merged = {**getattr(self, key), **value}
                setattr(self, key, merged)
            else:
                setattr(self, key, value)
        self.recipe = None  # applied; re-validate the merged blocks
        self.__post_init__()
        self.recipe = path


@dataclass(frozen=True)
class TrainPaths:
    """Where the train stage reads and writes (fixed by dvc.yaml, not params).

    data: preference pairs (parquet, TRL conversational format + metadata columns).
    base: base model directory (the ``base_model`` stage output).
    out: policy output directory (safetensors, tokenizer, README.md model card).
    checkpoints: persisted checkpoint root (resume after a crash).
    live_dir: dvclive directory (curves under ``plots/metrics``).
    metrics: flat final metrics JSON.
    """

    data: str | Path = "data/selected/pairs.parquet"
    base: str | Path = "models/base"
    out: str | Path = "models/policy"
    checkpoints: str | Path = "checkpoints/train"
    live_dir: str | Path = "dvclive/train"
    metrics: str | Path = "metrics/train.json"


def config_from_params(data: dict[str, Any] | None) -> TrainConfig:
    """Build :class:`TrainConfig` from the ``train`` params section."""
    from karma.config import from_dict

    return from_dict(TrainConfig, data, where=WHERE)


# ---------------------------------------------------------------- data


def load_pairs(path: str | Path, method: str = "dpo") -> Any:
    """Read preference pairs into a ``datasets.Dataset`` in TRL's conversational format.

    DPO gets ``prompt`` / ``chosen`` / ``rejected``; SFT gets ``prompt`` / ``completion`` (the
    chosen answer). Metadata columns are dropped.
    """
    import datasets
    import polars as pl

    p = Path(path)
    if not p.is_file():
        raise KarmaError(
            "training data file not found (run the select stage first)",
            file=p,
            expected="a parquet file of preference pairs",
        )
    try:
        frame = pl.read_parquet(p)
    except Exception as err:  # polars raises several error types for bad files
        msg = " ".join(str(err).split())[:200]
        raise KarmaError(f"not a readable parquet file: {msg}", file=p) from None
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise KarmaError(
            f"missing columns {missing}",
            file=p,
            value=sorted(frame.columns),
            expected="prompt, chosen, rejected (TRL conversational preference format)",
        )
    if frame.height == 0:
        raise KarmaError("dataset is empty: nothing to train on", file=p)
    for col in PAIR_COLUMNS:
        dtype = frame.schema[col]
        if not isinstance(dtype, pl.List):
            raise KarmaError(
                "must be a list of messages",
                file=p,
                field=col,
                value=str(dtype),
                expected='[{"role": ..., "content": ...}]',
            )
    frame = frame.select(PAIR_COLUMNS)
    if method == "sft":
        frame = frame.select("prompt", pl.col("chosen").alias("completion"))
    return datasets.Dataset(frame.to_arrow())


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's files (names + contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, paths: TrainPaths, seed: int) -> dict[str, Any]:
    """What a checkpoint depends on: training settings, seed, data and base model contents."""
    settings = {
        "method": cfg.method,
        "trl": cfg.trl,
        "method_args": cfg.dpo if cfg.method == "dpo" else cfg.sft,
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "num_processes": cfg.num_processes,
        "seed": seed,
        "data": file_digest(paths.data),
        "base": file_digest(paths.base),
    }
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    settings["id"] = hashlib.sha256(blob).hexdigest()[:16]
    return settings


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete ``checkpoint-<step>`` (its ``trainer_state.json`` is written last)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    done = []
    for c in d.glob("checkpoint-*"):
        step = c.name.split("-")[-1]
        if c.is_dir() and step.isdigit() and (c / "trainer_state.json").is_file():
            done.append((int(step), c))
    return max(done)[1] if done else None


def prepare_run_dir(root: str | Path, fp: dict[str, Any]) -> tuple[Path, Path | None]:
    """Return ``(run_dir, checkpoint to resume or None)``; stale runs under ``root`` are removed."""
    root = Path(root)
    run_dir = root / fp["id"]
    if root.is_dir():
        for child in root.iterdir():
            if child != run_dir:
                log.info("removing stale checkpoints %s (inputs or params changed)", child)
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FINGERPRINT_FILE, fp)
    return run_dir, last_checkpoint(run_dir)


# ---------------------------------------------------------------- TRL config


def _config_class(method: str) -> type:
    from trl import DPOConfig, SFTConfig

    return DPOConfig if method == "dpo" else SFTConfig


def _check_fields(cls: type, block: str, args: dict[str, Any]) -> None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in args:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KarmaError(
                f"unknown {cls.__name__} field{hint}",
                file=WHERE,
                field=f"{block}.{key}",
                expected=f"a field of trl.{cls.__name__}",
            )


def _coerce_numbers(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """Turn numeric strings into numbers for numeric TRL fields.

    PyYAML (YAML 1.1) reads ``5e-5`` (no dot) as a string, and ``dvc exp run -S`` may write it so.
    """
    import dataclasses

    types_ = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(cls)}
    out = dict(args)
    for key, value in args.items():
        if not isinstance(value, str) or key not in types_:
            continue
        kind = types_[key]
        try:
            if "float" in kind:
                out[key] = float(value)
            elif kind.startswith("int"):
                out[key] = int(value)
        except ValueError:
            pass
    return out


def trl_kwargs(cfg: TrainConfig, *, seed: int, output_dir: str | Path) -> dict[str, Any]:
    """Merged keyword arguments for the method's TRL config (validated names)."""
    from trl import DPOConfig, SFTConfig

    _check_fields(_config_class(cfg.method), "trl", cfg.trl)
    _check_fields(DPOConfig, "dpo", cfg.dpo)
    _check_fields(SFTConfig, "sft", cfg.sft)
    method_args = cfg.dpo if cfg.method == "dpo" else cfg.sft
    kwargs = {**TRL_DEFAULTS, **copy.deepcopy(cfg.trl), **copy.deepcopy(method_args)}
    kwargs.update(output_dir=str(output_dir), seed=int(seed), report_to="none")
    return _coerce_numbers(_config_class(cfg.method), kwargs)


def build_trl_config(cfg: TrainConfig, *, seed: int, output_dir: str | Path) -> Any:
    """The ``DPOConfig`` / ``SFTConfig`` for ``cfg`` (TRL's validation errors -> KarmaError)."""
    kwargs = trl_kwargs(cfg, seed=seed, output_dir=output_dir)
    cls = _config_class(cfg.method)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise KarmaError(
            f"TRL rejected the {cls.__name__} arguments: {' '.join(str(err).split())[:300]}",
            file=WHERE,
        ) from None


def build_lora_config(lora: dict[str, Any] | None) -> Any:
    """A ``peft.LoraConfig`` (task CAUSAL_LM) from params, or None."""
    if lora is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise KarmaError(
            "LoRA needs peft: pip install 'karma-align[lora]'", file=WHERE, field="lora"
        ) from None
    import dataclasses

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key in lora:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KarmaError(f"unknown LoraConfig field{hint}", file=WHERE, field=f"lora.{key}")
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (ValueError, TypeError) as err:
        raise KarmaError(f"bad LoRA settings: {err}", file=WHERE, field="lora") from None


# ---------------------------------------------------------------- launch


def launch_command(cfg: TrainConfig, script_argv: Sequence[str]) -> list[str]:
    """The command running ``script_argv`` (script path + args) with the configured launcher.

    >>> launch_command(TrainConfig(launcher="accelerate", num_processes=2), ["stages/train.py"])[3:]
    ['--num_processes', '2', '--multi_gpu', 'stages/train.py']
    """
    if cfg.launcher == "python":
        return [sys.executable, *script_argv]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        cmd += ["--config_file", cfg.accelerate_config]
    cmd += ["--num_processes", str(cfg.num_processes)]
    if cfg.num_processes > 1 and not cfg.accelerate_config:
        cmd.append("--multi_gpu")
    return cmd + list(script_argv)


def relaunch_if_needed(cfg: TrainConfig, script_argv: Sequence[str]) -> bool:
    """Under ``launcher: accelerate``, re-run the script through accelerate; True when it did.

    A non-zero exit of the launched processes raises :class:`KarmaError`.
    """
    if cfg.launcher != "accelerate" or os.environ.get(LAUNCHED_ENV):
        return False
    cmd = launch_command(cfg, script_argv)
    log.info("launching: %s", " ".join(cmd))
    env = {**os.environ, LAUNCHED_ENV: "1"}
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise KarmaError(f"accelerate launch exited with code {rc}", field="train.launcher")
    return True


# ---------------------------------------------------------------- tracking


def _curve_callback(live_dir: str | Path) -> Any:
    """A TrainerCallback writing each logged scalar to dvclive at ``step = global_step``.

    Only the curves (``<live_dir>/plots/metrics/*.tsv``, no timestamps) are written; the final
    metrics go to the stage's own flat JSON.

    On resume, the restored ``log_history`` is replayed first, so the curves are complete.
    """
    from transformers import TrainerCallback

    from dvclive import Live

    class LiveCurves(TrainerCallback):
        def __init__(self) -> None:
            self.live: Any = None
            self.replayed = False

        def _write(self, entry: dict[str, Any]) -> None:
            step = entry.get("step")
            if step is None:
                return
            for key, value in entry.items():
                if key in ("step", "epoch") or key in CURVE_SKIP:
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.live.step = int(step)
                    self.live.log_metric(key, float(value))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if self.live is None:
                self.live = Live(
                    str(live_dir),
                    dvcyaml=False,
                    save_dvc_exp=False,
                    report=None,
                    resume=False,
                )
            if not self.replayed:
                self.replayed = True
                for entry in state.log_history[:-1]:
                    self._write(entry)
            self._write({**logs, "step": state.global_step})

    return LiveCurves()


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Last logged value of each training scalar; ``rewards/margins`` -> ``rewards_margins``."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("step", "epoch") or key in CURVE_SKIP:
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key.replace("/", "_")] = float(value)
    return out


# ---------------------------------------------------------------- output


def model_card(
    cfg: TrainConfig,
    paths: TrainPaths,
    *,
    seed: int,
    base_summary: str,
    n_pairs: int,
    metrics: dict[str, Any],
) -> str:
    """A short README.md for the policy directory (no timings: keeps it deterministic)."""
    method = (
        "DPO (TRL DPOTrainer, explicit reference model)"
        if cfg.method == "dpo"
        else "SFT on prompt + chosen (TRL SFTTrainer)"
    )
    shown = {
        k: metrics[k]
        for k in ("loss", "train_loss", "rewards_accuracies", "rewards_margins", "steps", "epoch")
        if k in metrics
    }
    params = {
        "method": cfg.method,
        "trl": cfg.trl,
        cfg.method: cfg.dpo if cfg.method == "dpo" else cfg.sft,
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "recipe": cfg.recipe,
        "seed": seed,
    }
    lines = [
        "---",
        "library_name: transformers",
        "tags: [karma, trl, " + cfg.method + "]",
        "---",
        "",
        f"# KARMA policy ({cfg.method.upper()})",
        "",
        f"- **Base model:** `{paths.base}` ({base_summary})",
        f"- **Data:** `{paths.data}` ({n_pairs} preference pairs, sha256 "
        f"`{file_digest(paths.data)[:16]}`)",
        f"- **Method:** {method}",
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=True).rstrip(),
        "```",
        "",
        "## Final training metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in shown.items()],
        "",
        "Trained with the KARMA pipeline (arXiv 2502.18744).",
        "",
    ]
    return "\n".join(lines)


def _base_summary(base: str | Path) -> str:
    try:
        conf = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown architecture"
    arch = ",".join(conf.get("architectures") or [conf.get("model_type", "?")])
    layers, hidden = conf.get("num_hidden_layers", "?"), conf.get("hidden_size", "?")
    return f"{arch}, {layers} layers, hidden {hidden}"


# ---------------------------------------------------------------- training


def _load_model(path: str | Path, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)


def check_base_dir(base: str | Path) -> Path:
    """``base`` as a Path, or KarmaError when it is not a saved model directory."""
    p = Path(base)
    if not (p / "config.json").is_file():
        raise KarmaError(
            "base model directory not found or has no config.json (run the base_model stage)",
            file=p,
            expected="a transformers model directory",
        )
    return p


def load_base(base: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """Policy model and tokenizer from ``base`` (checked: has a chat template)."""
    from transformers import AutoTokenizer

    base = check_base_dir(base)
    tok = AutoTokenizer.from_pretrained(str(base))
    if not getattr(tok, "chat_template", None):
        raise KarmaError(
            "tokenizer has no chat template; conversational pairs need one",
            file=base,
            expected="a tokenizer saved with chat_template",
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return _load_model(base, dtype), tok


def make_trainer(
    cfg: TrainConfig,
    base: str | Path,
    *,
    seed: int,
    output_dir: str | Path,
    dataset: Any,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Build the TRL trainer (DPOTrainer or SFTTrainer) exactly as the stage uses it."""
    from transformers import set_seed

    args = build_trl_config(cfg, seed=seed, output_dir=output_dir)
    peft_config = build_lora_config(cfg.lora)
    set_seed(seed)
    model, tok = load_base(base, cfg.dtype)
    if cfg.method == "dpo":
        from trl import DPOTrainer

        # An explicit reference model (TRL would otherwise reload it by name); with LoRA the
        # adapter-disabled policy is the reference.
        ref_model = None if peft_config is not None else _load_model(base, cfg.dtype)
        return DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=list(callbacks),
            peft_config=peft_config,
        )
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )


def save_policy(trainer: Any, out_dir: str | Path, card: str) -> None:
    """Write safetensors (LoRA merged), tokenizer and the model card atomically to ``out_dir``."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        trainer.processing_class.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card)


def run_training(
    cfg: TrainConfig,
    paths: TrainPaths | None = None,
    *,
    seed: int = 0,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """The train stage: validate, resume if possible, train, write policy, curves and metrics.

    Returns the flat metrics written to ``paths.metrics``.
    """
    paths = paths or TrainPaths()
    # Validate everything cheap before touching models.
    trl_kwargs(cfg, seed=seed, output_dir=paths.checkpoints)
    build_lora_config(cfg.lora)
    dataset = load_pairs(paths.data, cfg.method)
    check_base_dir(paths.base)
    fp = fingerprint(cfg, paths, seed)
    run_dir, resume = prepare_run_dir(paths.checkpoints, fp)
    if resume is not None:
        log.info("resuming from checkpoint %s", resume)
    else:
        log.info("no checkpoint for this configuration (%s): training from scratch", fp["id"])

    live = _curve_callback(paths.live_dir)
    trainer = make_trainer(
        cfg,
        paths.base,
        seed=seed,
        output_dir=run_dir,
        dataset=dataset,
        callbacks=[live, *callbacks],
    )
    start_step = 0
    start_tokens = 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        start_step = int(state.get("global_step", 0))
        start_tokens = int(state.get("num_input_tokens_seen", 0))
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    wall = time.perf_counter() - t0
    state = trainer.state
    tokens = int(state.num_input_tokens_seen) - start_tokens
    metrics: dict[str, Any] = final_metrics(state.log_history)
    metrics.update(
        train_loss=float(result.training_loss),
        steps=int(state.global_step),
        epoch=float(state.epoch or 0.0),
        resumed_from_step=start_step,
        pairs=len(dataset),
        tokens=tokens,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        wall_time_s=wall,
    )
    bad = [k for k in ("loss", "train_loss") if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        raise KarmaError(f"training diverged: non-finite {bad}", file=WHERE)
    if trainer.is_world_process_zero():
        card = model_card(
            cfg,
            paths,
            seed=seed,
            base_summary=_base_summary(paths.base),
            n_pairs=len(dataset),
            metrics=metrics,
        )
        save_policy(trainer, paths.out, card)
        write_json(paths.metrics, metrics)
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    log.info(
        "%s: %d steps, loss %.4f, %.0f tokens/s, %.1f s",
        cfg.method,
        metrics["steps"],
        metrics.get("loss", float("nan")),
        metrics["tokens_per_second"],
        wall,
    )
    return metrics


__all__ = [
    "TRL_DEFAULTS",
    "TrainConfig",
    "TrainPaths",
    "build_lora_config",
    "build_trl_config",
    "check_base_dir",
    "config_from_params",
    "file_digest",
    "fingerprint",
    "last_checkpoint",
    "launch_command",
    "load_base",
    "load_pairs",
    "make_trainer",
    "model_card",
    "prepare_run_dir",
    "relaunch_if_needed",
    "run_training",
    "save_policy",
    "trl_kwargs",
]
