"""Train a policy on preference pairs with TRL (DPO or SFT), tracked with dvclive, resumable.

TRL's own arguments pass through from params untouched: ``train.trl`` goes to the trainer
config of either method (``DPOConfig`` / ``SFTConfig``), ``train.dpo`` / ``train.sft`` only to
that method's config. Unknown names fail with a did-you-mean before any model is loaded.

Checkpoints go to ``<checkpoints>/<fingerprint>/checkpoint-<step>``; the fingerprint hashes
the method, TRL args, LoRA, seed, the data file and the base model, so a changed input never
resumes from a stale checkpoint, and a killed run resumes from its last complete checkpoint.

>>> from karma.config import Params, TrainConfig
>>> params = Params(train=TrainConfig(method="sft", trl={"max_steps": 5}))
>>> paths = TrainPaths(data="pairs.parquet", base="models/base", out="out/policy",
...                    checkpoints="checkpoints/train")
>>> metrics = run_train(params, paths)  # doctest: +SKIP

Multi-GPU: ``train.launcher: accelerate`` (+ ``num_processes``, ``accelerate_config``) makes the
stage re-run itself under ``accelerate launch`` (see :func:`launcher_prefix`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from karma.config import Params, TrainConfig, read_yaml
from karma.errors import KarmaError, did_you_mean
from karma.io import tree_digest, write_json
from karma.lm import load_causal_lm
from karma.pipeline import Stage, input_path, output_path, state_path

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
FINGERPRINT_FILE = "karma_fingerprint.json"

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


def apply_recipe(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its recipe file's ``trl``/``dpo``/``sft`` blocks merged in (and ``lora``,
    ``dtype`` replaced); errors name the recipe file and key."""
    if cfg.recipe is None:
        return cfg
    path = Path(cfg.recipe)
    if not path.is_file():
        raise KarmaError("recipe file not found", field="train.recipe", value=cfg.recipe)
    data = read_yaml(path)
    block = data.get("train", data)
    allowed = ("trl", "dpo", "sft", "lora", "dtype")
    merged = cfg.model_dump()
    for key, value in (block if isinstance(block, dict) else {}).items():
        if key not in allowed:
            raise KarmaError(f"unknown recipe key{did_you_mean(key, allowed)}", file=path,
                             field=key, expected=", ".join(allowed))  # fmt: skip
        if key in ("trl", "dpo", "sft") and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        raise KarmaError(err["msg"], file=path, field=key, value=err.get("input")) from None


# ---------------------------------------------------------------- data


def load_pairs(path: str | Path, method: str = "dpo") -> Any:
    """Read preference pairs (TRL or H4 layout) into a ``datasets.Dataset`` in TRL's
    conversational format.

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
    from karma.io import check_record_bytes, read_parquet
    from karma.preferences import to_trl

    frame = to_trl(read_parquet(p, "parquet file"))  # either layout (TRL's or H4's)
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
    check_record_bytes(frame.select(PAIR_COLUMNS), p, "pair")
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


def fingerprint(cfg: TrainConfig, paths: TrainPaths, seed: int) -> dict[str, Any]:
    """What a checkpoint depends on: training settings, seed, data and base model contents."""
    settings = {
        "method": cfg.method,
        "trl": cfg.trl,
        "method_args": cfg.dpo if cfg.method == "dpo" else cfg.sft,
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "seed": seed,
        "data": tree_digest(paths.data, memo=True),
        "base": tree_digest(paths.base, memo=True),
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
    """Every key of ``args`` is a field of the dataclass ``cls`` (did-you-mean otherwise)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in args:
        if key not in names:
            raise KarmaError(
                f"unknown {cls.__name__} field{did_you_mean(key, names)}",
                field=f"train.{block}.{key}",
                expected=f"a field of {cls.__module__.split('.')[0]}.{cls.__name__}",
            )


def _coerce_numbers(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """Turn numeric strings into numbers for numeric TRL fields.

    PyYAML (YAML 1.1) reads ``5e-5`` (no dot) as a string, and ``dvc exp run -S`` may write it so.
    """
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
    kwargs["save_steps"] = cfg.checkpoint_steps
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
            field="train.trl",
        ) from None


def build_lora_config(lora: dict[str, Any] | None) -> Any:
    """A ``peft.LoraConfig`` (task CAUSAL_LM) from params, or None."""
    if lora is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise KarmaError(
            "LoRA needs peft: pip install 'karma-align[lora]'", field="train.lora"
        ) from None
    _check_fields(LoraConfig, "lora", lora)
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (ValueError, TypeError) as err:
        raise KarmaError(f"bad LoRA settings: {err}", field="train.lora") from None


# ---------------------------------------------------------------- launch


def launcher_prefix(params: Params) -> list[str] | None:
    """The command prefix that runs the train stage under ``train.launcher`` (None: in-process).

    >>> from karma.config import TrainConfig
    >>> launcher_prefix(Params(train=TrainConfig(launcher="accelerate", num_processes=2)))[3:]
    ['--num_processes', '2', '--multi_gpu']
    """
    cfg = params.train
    if cfg.launcher == "python":
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        cmd += ["--config_file", cfg.accelerate_config]
    cmd += ["--num_processes", str(cfg.num_processes)]
    if cfg.num_processes > 1 and not cfg.accelerate_config:
        cmd.append("--multi_gpu")
    return cmd


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
        f"`{tree_digest(paths.data, memo=True)[:16]}`)",
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
    model, tok = load_causal_lm(base, dtype=cfg.dtype)
    if cfg.method == "dpo":
        from trl import DPOTrainer

        # An explicit reference model (TRL would otherwise reload it by name); with LoRA the
        # adapter-disabled policy is the reference.
        ref_model = None if peft_config is not None else load_causal_lm(base, dtype=cfg.dtype)[0]
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
    model.save_pretrained(str(out_dir), safe_serialization=True)
    trainer.processing_class.save_pretrained(str(out_dir))
    (Path(out_dir) / "README.md").write_text(card)


@dataclass(frozen=True, kw_only=True)
class TrainPaths:
    """Paths of the ``train`` stage."""

    data: Path = input_path("preference pairs: prompt, chosen, rejected (TRL conversational)")
    base: Path = input_path("base model directory", is_dir=True)
    out: Path = output_path("policy: safetensors, tokenizer, README.md model card", is_dir=True)
    checkpoints: Path = state_path("persisted checkpoints: a killed run resumes from here")
    live_dir: Path | None = output_path("dvclive curves (plots/metrics/*.tsv)", is_dir=True,
                                        required=False)  # fmt: skip
    metrics: Path | None = output_path("final training metrics", ".json", required=False)


def run_train(
    params: Params, paths: TrainPaths, *, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Stage ``train``: validate, resume if possible, train, write policy, curves and metrics."""
    cfg = apply_recipe(params.train)
    seed = params.seed
    # Validate everything cheap before touching models.
    trl_kwargs(cfg, seed=seed, output_dir=paths.checkpoints)
    build_lora_config(cfg.lora)
    dataset = load_pairs(paths.data, cfg.method)
    fp = fingerprint(cfg, paths, seed)
    run_dir, resume = prepare_run_dir(paths.checkpoints, fp)
    if resume is not None:
        log.info("resuming from checkpoint %s", resume)
    else:
        log.info("no checkpoint for this configuration (%s): training from scratch", fp["id"])

    live = [] if paths.live_dir is None else [_curve_callback(paths.live_dir)]
    trainer = make_trainer(
        cfg,
        paths.base,
        seed=seed,
        output_dir=run_dir,
        dataset=dataset,
        callbacks=[*live, *callbacks],
    )
    start_step = 0
    start_tokens = 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        start_step = int(state.get("global_step", 0))
        start_tokens = int(state.get("num_input_tokens_seen", 0))
    t0 = time.perf_counter()
    # TRL's log printer (print / tqdm.write) goes to stdout, which holds only the metrics JSON
    with contextlib.redirect_stdout(sys.stderr):
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
        raise KarmaError(f"training diverged: non-finite {bad}", field="train.trl")
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
        if paths.metrics is not None:
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


STAGE = Stage(
    name="train",
    settings=("train", "seed"),
    paths=TrainPaths,
    run=run_train,
    launcher=launcher_prefix,
    help="DPO (TRL DPOTrainer, explicit reference model) or SFT on prompt + chosen; curves "
    "through dvclive; checkpoints every train.checkpoint_steps, resumed after a kill.",
)
