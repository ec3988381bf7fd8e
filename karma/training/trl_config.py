"""The TRL config of a training method: recipe files, the global batch, TRL's own arguments.

TRL's arguments pass through from params untouched: ``train.trl`` goes to the config of
whichever method runs, ``train.<method>`` only to that method's config, over karma's CPU
defaults (:data:`TRL_DEFAULTS`) and under the fields the registry fixes for the method
(``loss_type`` ...). Unknown names fail with a did-you-mean, and a value TRL rejects fails in
one line naming its key, before any model is loaded (:func:`build_trl_config`).

The batch is stated as ``train.global_batch_size`` (pairs per optimizer step over every
process); gradient accumulation is derived from the per-device batch and the process count
(:func:`batch_plan`), so one process and N processes train on the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from karma.core.errors import KarmaError, did_you_mean
from karma.core.settings import read_yaml
from karma.training.objectives import OBJECTIVES, objective
from karma.training.settings import TrainConfig
from karma.training.trl_fields import fields

log = logging.getLogger(__name__)


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
    # every parameter of a dense LM gets a gradient; True only costs an extra graph traversal
    "ddp_find_unused_parameters": False,
}


def apply_recipe(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its recipe file's ``trl`` / ``<method>`` blocks merged in (and
    ``global_batch_size``, ``lora``, ``dtype`` replaced); errors name the recipe file and key."""
    if cfg.recipe is None:
        return cfg
    path = Path(cfg.recipe)
    if not path.is_file():
        raise KarmaError("recipe file not found", field="train.recipe", value=cfg.recipe)
    data = read_yaml(path)
    block = data.get("train", data)
    allowed = ("global_batch_size", "trl", *OBJECTIVES, "lora", "dtype")
    merged = cfg.model_dump()
    for key, value in (block if isinstance(block, dict) else {}).items():
        if key not in allowed:
            raise KarmaError(f"unknown recipe key{did_you_mean(key, allowed)}", file=path,
                             field=key, expected=", ".join(allowed))  # fmt: skip
        if (key == "trl" or key in OBJECTIVES) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        raise KarmaError(err["msg"], file=path, field=key, value=err.get("input")) from None


# ---------------------------------------------------------------- batch


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is made: ``global_batch = world_size x per_device x accumulation``."""

    world_size: int
    per_device: int
    accumulation: int
    global_batch: int
    derived: bool  # accumulation derived from train.global_batch_size (else kept from trl)

    def metrics(self) -> dict[str, int]:
        """The ``batch.*`` keys of ``metrics/train.json``."""
        return {
            "batch.world_size": self.world_size,
            "batch.per_device": self.per_device,
            "batch.accumulation": self.accumulation,
            "batch.global": self.global_batch,
        }


def _int_arg(cls: type, args: dict[str, Any], name: str, block: str) -> int:
    """An integer TRL argument from ``args``, else the TRL default."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    value = args.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or number != float(value):
        raise KarmaError("not a positive integer", field=f"train.{block}.{name}", value=value)
    return number


def batch_plan(cfg: TrainConfig, world_size: int = 1) -> BatchPlan:
    """Derive gradient accumulation from ``train.global_batch_size`` and the process count.

    >>> from karma.training.settings import TrainConfig
    >>> cfg = TrainConfig(global_batch_size=96, trl={"per_device_train_batch_size": 6})
    >>> batch_plan(cfg, 4)
    BatchPlan(world_size=4, per_device=6, accumulation=4, global_batch=96, derived=True)
    >>> batch_plan(cfg, 1).accumulation
    16
    """
    cls = objective(cfg.method).config_class()
    method_args = cfg.method_args()
    args = {**cfg.trl, **method_args}
    block = cfg.method if "per_device_train_batch_size" in method_args else "trl"
    per_device = _int_arg(cls, args, "per_device_train_batch_size", block)
    if cfg.global_batch_size is None:
        accum = _int_arg(cls, args, "gradient_accumulation_steps", "trl")
        return BatchPlan(world_size, per_device, accum, world_size * per_device * accum, False)
    step = world_size * per_device
    if cfg.global_batch_size % step:
        raise KarmaError(
            f"not a multiple of per-device batch {per_device} x {world_size} processes",
            field="train.global_batch_size",
            value=cfg.global_batch_size,
            expected=f"a multiple of {step}; or change train.trl.per_device_train_batch_size "
            "or train.num_processes",
        )
    return BatchPlan(world_size, per_device, cfg.global_batch_size // step,
                     cfg.global_batch_size, True)  # fmt: skip


def _config_name(method: str) -> str:
    """``trl.DPOConfig`` for ``dpo`` (from the registry, without importing TRL)."""
    module, _, name = objective(method).config.partition(":")
    return f"{module.split('.')[0]}.{name}"


def _check_names(names: set[str], config: str, block: str, args: dict[str, Any]) -> None:
    """Every key of ``args`` is one of ``names``, the fields of ``config`` (did-you-mean)."""
    for key in args:
        if key not in names:
            raise KarmaError(
                f"unknown {config.split('.')[-1]} field{did_you_mean(key, names)}",
                field=f"train.{block}.{key}",
                expected=f"a field of {config}",
            )


def _check_fields(method: str, block: str, args: dict[str, Any]) -> None:
    """Every key of ``args`` is a field of ``method``'s TRL config."""
    _check_names(set(fields(method)), _config_name(method), block, args)


def _coerce_numbers(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """Turn numeric strings into numbers for numeric TRL fields.

    PyYAML (YAML 1.1) reads ``5e-5`` (no dot) as a string, and ``dvc exp run -S`` may write it so.
    """
    kinds = fields(method)
    out = dict(args)
    for key, value in args.items():
        if not isinstance(value, str) or not set(kinds.get(key, ["other"])) <= NUMERIC:
            continue
        with contextlib.suppress(ValueError):
            out[key] = float(value) if "float" in kinds[key] else int(value)
    return out


def check_settings(cfg: TrainConfig) -> None:
    """Every TRL setting of ``cfg`` (its ``trl`` block and every method's block) names a field
    of its config and has the field's type and sign: one line naming the key otherwise. Reads
    :mod:`karma.training.trl_fields`, so a typo fails in a second, before TRL (and torch) load.
    """
    _check_fields(cfg.method, "trl", cfg.trl)
    for name in OBJECTIVES:  # a typo in another method's block fails too
        _check_fields(name, name, cfg.method_args(name))
    user = _coerce_numbers(cfg.method, {**cfg.trl, **cfg.method_args()})
    for key, value in user.items():
        where = f"train.{_user_block(cfg, key)}.{key}"
        check_value(fields(cfg.method).get(key), key, value, where)


def trl_kwargs(
    cfg: TrainConfig, *, seed: int, output_dir: str | Path, world_size: int = 1
) -> dict[str, Any]:
    """Merged keyword arguments for the method's TRL config (validated names).

    Accumulation comes from :func:`batch_plan`. On a machine without an accelerator,
    ``use_cpu`` is set: under several processes accelerate otherwise sees no distributed setup
    (every process trains on everything alone, each believing it is the main one), and
    ``bf16`` on CPU needs it.
    """
    import torch

    check_settings(cfg)
    obj = objective(cfg.method)
    kwargs = {**TRL_DEFAULTS, **copy.deepcopy(cfg.trl), **copy.deepcopy(cfg.method_args())}
    kwargs.update(copy.deepcopy(dict(obj.fixed)))
    kwargs.update(output_dir=str(output_dir), seed=int(seed), report_to="none")
    kwargs["save_steps"] = cfg.checkpoint_steps
    plan = batch_plan(cfg, world_size)
    kwargs["per_device_train_batch_size"] = plan.per_device
    kwargs["gradient_accumulation_steps"] = plan.accumulation
    accel = kwargs.get("accelerator_config")
    if world_size > 1 and isinstance(accel, dict) and accel.get("dispatch_batches"):
        raise KarmaError(
            "dispatch_batches splits preference pairs across processes",
            field="train.trl.accelerator_config.dispatch_batches",
            value=accel["dispatch_batches"],
            expected="false or unset",
        )
    if torch.accelerator.current_accelerator() is None:
        kwargs.setdefault("use_cpu", True)
    kwargs = _coerce_numbers(cfg.method, kwargs)
    for key in {**cfg.trl, **cfg.method_args()}:
        where = f"train.{_user_block(cfg, key)}.{key}"
        check_value(fields(cfg.method).get(key), key, kwargs[key], where)
    return kwargs


def _user_block(cfg: TrainConfig, key: str) -> str:
    """The params block a TRL field came from (the method's block wins over ``trl``)."""
    return cfg.method if key in cfg.method_args() else "trl"


#: TRL fields whose value must be positive (TRL accepts a negative rate, then fails mid-run).
POSITIVE = {"learning_rate", "beta", "gradient_accumulation_steps", "save_steps", "logging_steps"}
NON_NEGATIVE = {"weight_decay", "warmup_ratio", "warmup_steps", "num_train_epochs",
                "max_grad_norm", "label_smoothing"}  # fmt: skip
NUMERIC = {"int", "float", "null"}
_KIND_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def check_value(kinds: list[str] | None, key: str, value: Any, where: str) -> None:
    """A TRL setting of its field's ``kinds`` (:mod:`karma.training.trl_fields`: int, float,
    bool, text, null; ``other`` is not checked) and sign, named by its key."""
    if kinds is None or (value is None and "null" in kinds):
        return
    checks = [_KIND_CHECKS[k] for k in kinds if k in _KIND_CHECKS]
    if checks and "other" not in kinds and not any(c(value) for c in checks):
        raise KarmaError("wrong type", field=where, value=value, expected=" | ".join(kinds))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key in POSITIVE and not value > 0:
            raise KarmaError("out of range", field=where, value=value, expected=f"{key} > 0")
        if key in NON_NEGATIVE and not value >= 0:
            raise KarmaError("out of range", field=where, value=value, expected=f"{key} >= 0")
        if key == "max_steps" and (value == 0 or value < -1):
            raise KarmaError("out of range", field=where, value=value,
                             expected="max_steps > 0, or -1 (train by epochs)")  # fmt: skip


def build_trl_config(
    cfg: TrainConfig, *, seed: int, output_dir: str | Path, world_size: int = 1
) -> Any:
    """The method's TRL config for ``cfg``; a value TRL rejects fails naming its params key.

    >>> from karma.training.settings import TrainConfig
    >>> cfg = TrainConfig(trl={**TrainConfig().trl, "max_steps": "x"})
    >>> build_trl_config(cfg, seed=0, output_dir="/tmp/k")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    karma.core.errors.KarmaError: field 'train.trl.max_steps': wrong type (got 'x'; expected int)
    """
    kwargs = trl_kwargs(cfg, seed=seed, output_dir=output_dir, world_size=world_size)
    cls = objective(cfg.method).config_class()
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:300]
    user = [k for k in {**cfg.trl, **cfg.method_args()} if k in kwargs]
    base = {k: v for k, v in kwargs.items() if k not in user}
    for key in user:  # the first user key whose value TRL rejects on its own
        try:
            cls(**{**base, key: kwargs[key]})
        except (ValueError, TypeError) as err:
            raise KarmaError(f"TRL rejected it: {' '.join(str(err).split())[:240]}",
                             field=f"train.{_user_block(cfg, key)}.{key}",
                             value=kwargs[key]) from None  # fmt: skip
    block = "trl" if not cfg.method_args() else f"trl / train.{cfg.method}"
    raise KarmaError(f"TRL rejected the {cls.__name__} arguments: {reason}", field=f"train.{block}")


def check_heldout_modelled(cfg: TrainConfig, args: Any) -> None:
    """Refuse a TRL setting the held-out metrics of ``cfg.method`` do not model (they would be
    mislabelled): one line naming the key, its value and the value they assume."""
    spec = objective(cfg.method).heldout
    for key, want in (spec.modelled if spec is not None else {}).items():
        have = getattr(args, key, want)
        if have != want:
            raise KarmaError(
                f"the held-out metrics of method {cfg.method} do not model this setting",
                field=f"train.{_user_block(cfg, key)}.{key}",
                value=have,
                expected=f"{want!r}, or no --eval-data",
            )


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
    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    _check_names(names, "peft.LoraConfig", "lora", lora)
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (ValueError, TypeError) as err:
        raise KarmaError(f"bad LoRA settings: {err}", field="train.lora") from None
