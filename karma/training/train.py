"""Train a policy on preference pairs with TRL (DPO or SFT), tracked with dvclive, resumable.

TRL's own arguments pass through from params untouched: ``train.trl`` goes to the trainer
config of either method (``DPOConfig`` / ``SFTConfig``), ``train.dpo`` / ``train.sft`` only to
that method's config. Unknown names fail with a did-you-mean before any model is loaded.

The batch is stated as ``train.global_batch_size`` (pairs per optimizer step over every
process); gradient accumulation is derived from the per-device batch and the process count
(:func:`batch_plan`), so one process and N processes train on the same batches.

Checkpoints go to ``<checkpoints>/<fingerprint>/checkpoint-<step>``; the fingerprint hashes
the method, TRL args, LoRA, seed, the process count, the data file and the base model, so a
changed input never resumes from a stale checkpoint, and a killed run resumes from its last
complete checkpoint (every process's RNG state written).

With ``--eval-data`` (held-out pairs), TRL's DPO evaluation metrics (loss, reward accuracy,
reward margin) are computed per pair before and after training and reported with 95 %
intervals and a paired bootstrap interval of the change (:func:`heldout_summary`).

>>> from karma.params import Params

>>> from karma.training.settings import TrainConfig
>>> params = Params(train=TrainConfig(method="sft", trl={"max_steps": 5}))
>>> paths = TrainPaths(data="pairs.parquet", base="models/base", out="out/policy",
...                    checkpoints="checkpoints/train")
>>> metrics = run_train(params, paths)  # doctest: +SKIP

Several processes: ``train.launcher: torchrun`` (CPU or GPU) or ``accelerate`` (GPU, optionally
with an FSDP / DeepSpeed ``accelerate_config``) with ``train.num_processes: N`` makes the stage
re-run itself under that launcher (see :func:`launcher_prefix`). Every process trains; the
main one alone prepares the checkpoint directory and writes the outputs (:class:`Ranks`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import yaml
from pydantic import ValidationError

from karma.core.errors import KarmaError, did_you_mean
from karma.core.io import tree_digest, write_json
from karma.core.lm import load_causal_lm, provenance, write_provenance
from karma.core.settings import read_yaml
from karma.core.stage import Stage, die_with_launcher, input_path, output_path, state_path
from karma.training.settings import TrainConfig

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
FINGERPRINT_FILE = "karma_fingerprint.json"
WEIGHTS_INDEX = "model.safetensors.index.json"

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

#: Returned and logged, never written to a versioned output (they vary between reruns).
TIMINGS = ("tokens_per_second", "wall_time_s")
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
    """``cfg`` with its recipe file's ``trl``/``dpo``/``sft`` blocks merged in (and
    ``global_batch_size``, ``lora``, ``dtype`` replaced); errors name the recipe file and key."""
    if cfg.recipe is None:
        return cfg
    path = Path(cfg.recipe)
    if not path.is_file():
        raise KarmaError("recipe file not found", field="train.recipe", value=cfg.recipe)
    data = read_yaml(path)
    block = data.get("train", data)
    allowed = ("global_batch_size", "trl", "dpo", "sft", "lora", "dtype")
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
    from karma.core.io import check_record_bytes, read_parquet
    from karma.pairing.preferences import to_trl

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


def fingerprint(
    cfg: TrainConfig, paths: TrainPaths, seed: int, *, world_size: int = 1
) -> dict[str, Any]:
    """What a checkpoint depends on: training settings, seed, process count (checkpoints hold
    per-process RNG state), data and base model contents."""
    settings = {
        "method": cfg.method,
        "global_batch_size": cfg.global_batch_size,
        "trl": cfg.trl,
        "method_args": cfg.dpo if cfg.method == "dpo" else cfg.sft,
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "seed": seed,
        "world_size": world_size,
        "data": tree_digest(paths.data, memo=True),
        "base": tree_digest(paths.base, memo=True),
    }
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    settings["id"] = hashlib.sha256(blob).hexdigest()[:16]
    return settings


def last_checkpoint(run_dir: str | Path, world_size: int = 1) -> Path | None:
    """Newest complete ``checkpoint-<step>``: its ``trainer_state.json`` (the main process
    writes it last) and, under several processes, every process's ``rng_state_<rank>.pth``
    (the others write theirs without waiting for each other)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    rng = [f"rng_state_{r}.pth" for r in range(world_size)] if world_size > 1 else []
    done = []
    for c in d.glob("checkpoint-*"):
        step = c.name.split("-")[-1]
        files = ["trainer_state.json", *rng]
        if c.is_dir() and step.isdigit() and all((c / f).is_file() for f in files):
            done.append((int(step), c))
    return max(done)[1] if done else None


def prepare_run_dir(
    root: str | Path, fp: dict[str, Any], world_size: int = 1
) -> tuple[Path, Path | None]:
    """Return ``(run_dir, checkpoint to resume or None)``. Stale runs under ``root`` stay until
    this run has saved its first checkpoint (:func:`drop_stale`): a run that fails first (a bad
    setting, a crash while loading) loses nothing.

    Under several processes only the main one calls this (:meth:`Ranks.on_main`).
    """
    root = Path(root)
    run_dir = root / fp["id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FINGERPRINT_FILE, fp)
    return run_dir, last_checkpoint(run_dir, world_size)


def drop_stale(run_dir: str | Path) -> None:
    """Remove the other runs' checkpoints beside ``run_dir`` (inputs or params changed)."""
    run_dir = Path(run_dir)
    with contextlib.suppress(OSError):
        for child in run_dir.parent.iterdir():
            if child != run_dir:
                log.info("removing stale checkpoints %s (inputs or params changed)", child)
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _drop_stale_callback(run_dir: Path) -> Any:
    """A callback: :func:`drop_stale` once the main process has saved a checkpoint."""
    from transformers import TrainerCallback

    class DropStale(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                drop_stale(run_dir)

    return DropStale()


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

    >>> from karma.params import Params
    >>> from karma.training.settings import TrainConfig
    >>> cfg = TrainConfig(global_batch_size=96, trl={"per_device_train_batch_size": 6})
    >>> batch_plan(cfg, 4)
    BatchPlan(world_size=4, per_device=6, accumulation=4, global_batch=96, derived=True)
    >>> batch_plan(cfg, 1).accumulation
    16
    """
    cls = _config_class(cfg.method)
    method_args = cfg.dpo if cfg.method == "dpo" else cfg.sft
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
    from trl import DPOConfig, SFTConfig

    _check_fields(_config_class(cfg.method), "trl", cfg.trl)
    _check_fields(DPOConfig, "dpo", cfg.dpo)
    _check_fields(SFTConfig, "sft", cfg.sft)
    method_args = cfg.dpo if cfg.method == "dpo" else cfg.sft
    kwargs = {**TRL_DEFAULTS, **copy.deepcopy(cfg.trl), **copy.deepcopy(method_args)}
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
    kwargs = _coerce_numbers(_config_class(cfg.method), kwargs)
    block = "dpo" if cfg.method == "dpo" else "sft"
    for key in {**cfg.trl, **method_args}:
        _check_value(_config_class(cfg.method), key, kwargs[key],
                     f"train.{block if key in method_args else 'trl'}.{key}")  # fmt: skip
    return kwargs


#: TRL fields whose value must be positive (TRL accepts a negative rate, then fails mid-run).
POSITIVE = {"learning_rate", "beta", "gradient_accumulation_steps", "save_steps", "logging_steps"}
NON_NEGATIVE = {"weight_decay", "warmup_ratio", "warmup_steps", "num_train_epochs",
                "max_grad_norm", "label_smoothing"}  # fmt: skip


def _check_value(cls: type, key: str, value: Any, where: str) -> None:
    """A TRL setting of the field's type (int, float, bool, text) and sign, named by its key."""
    import typing

    field = next((f for f in dataclasses.fields(cls) if f.name == key), None)
    if field is None or isinstance(field.type, str):
        return
    kinds = set(typing.get_args(field.type)) or {field.type}
    if value is None and type(None) in kinds:
        return
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    checks = [ok[k] for k in kinds if k in ok]
    if checks and len(checks) == len(kinds - {type(None)}) and not any(c(value) for c in checks):
        names = " | ".join(sorted("null" if k is type(None) else getattr(k, "__name__", str(k))
                                  for k in kinds))  # fmt: skip
        raise KarmaError("wrong type", field=where, value=value, expected=names)
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
    """The ``DPOConfig`` / ``SFTConfig`` for ``cfg`` (TRL's validation errors -> KarmaError)."""
    kwargs = trl_kwargs(cfg, seed=seed, output_dir=output_dir, world_size=world_size)
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


def launcher_prefix(params: Params, paths: TrainPaths | None = None) -> list[str] | None:
    """The command prefix that runs the train stage under ``train.launcher`` (None: in-process).

    ``torchrun`` is ``python -m torch.distributed.run --standalone`` (a free rendezvous port,
    no restarts), the same on CPU (gloo) and GPU (NCCL). ``accelerate`` is ``accelerate
    launch``: with ``train.accelerate_config`` that file decides the distributed setup (FSDP,
    DeepSpeed); without one, N > 1 processes get ``--multi_gpu`` on a free port (torchrun
    underneath). With ``paths`` (the stage process, before launching), everything cheap is
    validated first, so a bad setting is one error line rather than one per process.

    >>> from karma.params import Params
    >>> from karma.training.settings import TrainConfig
    >>> cfg = TrainConfig(launcher="torchrun", num_processes=2)
    >>> " ".join(launcher_prefix(Params(train=cfg))[1:])
    '-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 --max_restarts 0'
    """
    cfg = params.train
    if cfg.accelerate_config is not None and cfg.launcher != "accelerate":
        raise KarmaError("an accelerate config needs train.launcher accelerate",
                         field="train.accelerate_config", value=cfg.accelerate_config)  # fmt: skip
    if cfg.launcher == "python":
        if cfg.num_processes > 1:
            raise KarmaError(
                "launcher python runs one process",
                field="train.num_processes",
                value=cfg.num_processes,
                expected="1, or train.launcher torchrun (CPU or GPU) / accelerate (GPU)",
            )
        return None
    if paths is not None:
        _inputs(params, paths, cfg.num_processes)
    n = str(cfg.num_processes)
    if cfg.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", n, "--max_restarts", "0"]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        if not Path(cfg.accelerate_config).is_file():
            raise KarmaError("accelerate config file not found", field="train.accelerate_config",
                             value=cfg.accelerate_config)  # fmt: skip
        return [*cmd, "--config_file", cfg.accelerate_config, "--num_processes", n]
    if cfg.num_processes > 1:
        return [*cmd, "--num_processes", n, "--num_machines", "1", "--multi_gpu",
                "--main_process_port", "0"]  # fmt: skip
    return [*cmd, "--num_processes", n]


T = TypeVar("T")


@dataclass
class Ranks:
    """This process among the training processes (``WORLD_SIZE``; one when not launched)."""

    world: int = 1
    rank: int = 0
    state: Any = None  # accelerate's PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> Ranks:
        """Join the process group (gloo on CPU, NCCL on GPU) when launched with several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes != world:
            raise KarmaError(
                f"launched {world} processes but accelerate sees {state.num_processes} "
                f"({state.distributed_type})",
                field="train.launcher",
            )
        return cls(world, state.process_index, state)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main process only while the others wait; all get its result.

        An error on the main process is raised there and ends the others quietly (exit 1).
        """
        result: Any = None
        error: BaseException | None = None
        if self.main:
            try:
                result = fn()
            except Exception as err:
                error = err
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [(result, error is not None)]
            broadcast_object_list(box, from_process=0)
            result, failed = box[0]
            if failed and not self.main:
                raise SystemExit(1)
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Leave the process group (after the trainer and its DDP model are freed)."""
        if self.world > 1:
            import torch.distributed as dist

            gc.collect()
            self.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()


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


# ---------------------------------------------------------------- held-out metrics

#: Per-pair held-out metrics, as TRL's DPO evaluation names them (``eval_loss``,
#: ``eval_rewards/accuracies``, ``eval_rewards/margins``).
HELDOUT = ("loss", "reward_accuracy", "reward_margin")
N_BOOT = 10_000


def _completion_logps(model: Any, batch: dict[str, Any], accelerator: Any) -> tuple[Any, Any]:
    """Summed completion log-probs of a DPO batch (chosen rows first), as TRL's DPO loss
    computes them: TRL's fused LM head, prompt and padding masked out."""
    skip = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
    kwargs = {k: v for k, v in batch.items() if k not in skip}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with accelerator.autocast():
        out = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True)
    width = batch["completion_mask"].shape[1] - 1
    return out.log_probs[:, -width:].sum(dim=1).float().chunk(2, dim=0)


def preference_logps(trainer: Any, *, reference: bool = False) -> np.ndarray:
    """``(n, 2)`` summed completion log-probs (chosen, rejected) of every pair of the DPO
    trainer's ``eval_dataset`` under the policy, or the reference model, in dataset order.

    Call on every process: each scores its share of the pairs (an equal number of forward
    passes, as sharded models need) and all receive the whole array. Batches are made of pairs
    of similar length (little padding). LoRA's reference is the policy with its adapter disabled.
    """
    import torch

    acc = trainer.accelerator
    data = trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    n, world, rank = len(data), acc.num_processes, acc.process_index
    columns = zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    width = [len(p) + max(len(c), len(r)) for p, c, r in columns]
    order = sorted(range(n), key=lambda i: (width[i], i))
    bs = int(trainer.args.per_device_eval_batch_size)
    model, adapter_off = trainer.model, contextlib.nullcontext()
    if reference:
        if trainer.ref_model is not None:
            model = trainer.ref_model
        else:
            adapter_off = acc.unwrap_model(trainer.model).disable_adapter()
    out = np.full((n, 2), np.nan)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off:
            for start in range(0, n, bs * world):
                mine = order[start + rank * bs : min(start + (rank + 1) * bs, n)]
                batch = trainer.data_collator([data[i] for i in mine or order[-1:]])
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                chosen, rejected = _completion_logps(model, batch, acc)
                rows = torch.full((bs, 3), -1.0, dtype=torch.float64, device=acc.device)
                k = len(mine)
                rows[:k, 0] = torch.tensor(mine, dtype=torch.float64)
                rows[:k, 1], rows[:k, 2] = chosen[:k].double(), rejected[:k].double()
                if world > 1:
                    rows = acc.gather(rows)
                for i, c, r in rows.cpu().numpy():
                    if i >= 0:
                        out[int(i)] = (c, r)
    finally:
        model.train(was_training)
    return out


def pair_metrics(policy: np.ndarray, reference: np.ndarray, beta: float) -> dict[str, np.ndarray]:
    """Per-pair DPO metrics from ``(n, 2)`` log-probs, with TRL's definitions: rewards
    ``beta * (logp - ref_logp)``, accuracy ``chosen > rejected`` (strict), margin, and the
    sigmoid DPO loss ``-log sigmoid(margin)``.

    >>> m = pair_metrics(np.array([[-1.0, -3.0]]), np.array([[-2.0, -2.0]]), 0.5)
    >>> float(m["reward_margin"][0]), float(m["reward_accuracy"][0])
    (1.0, 1.0)
    """
    chosen = beta * (policy[:, 0] - reference[:, 0])
    rejected = beta * (policy[:, 1] - reference[:, 1])
    margin = chosen - rejected
    return {
        "loss": np.logaddexp(0.0, -margin),
        "reward_accuracy": (chosen > rejected).astype(float),
        "reward_margin": margin,
    }


def heldout_summary(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], *, seed: int
) -> dict[str, float]:
    """The ``heldout.*`` keys of ``metrics/train.json``: before, after and the paired change of
    each metric, each with ``.ci_low`` / ``.ci_high``, and ``heldout.n`` (pairs).

    Intervals from :mod:`karma.core.stats` (95 %): Wilson for the accuracy, Student t otherwise; the
    change's is a paired bootstrap over the pairs seeded by ``seed`` (:data:`N_BOOT` resamples).
    """
    from karma.core.stats import mean_ci, paired_bootstrap_ci

    out: dict[str, float] = {"heldout.n": len(after["loss"])}
    for m in HELDOUT:
        for who, values in (("before", before[m]), ("after", after[m])):
            est = mean_ci(values, binary=m == "reward_accuracy")
            out.update({f"heldout.{who}.{m}": est.mean, f"heldout.{who}.{m}.ci_low": est.ci_low,
                        f"heldout.{who}.{m}.ci_high": est.ci_high})  # fmt: skip
        low, high = paired_bootstrap_ci(after[m], before[m], seed=seed, n_boot=N_BOOT)
        delta = float(np.mean(after[m] - before[m]))
        key = f"heldout.delta.{m}"
        out.update({key: delta, f"{key}.ci_low": low, f"{key}.ci_high": high})
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
        "global_batch_size": cfg.global_batch_size,
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
        *_heldout_table(metrics),
        "Trained with the KARMA pipeline (arXiv 2502.18744).",
        "",
    ]
    return "\n".join(lines)


def _heldout_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines of the held-out metrics (none without held-out data)."""
    if "heldout.n" not in metrics:
        return []

    def cell(key: str) -> str:
        low, high = metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"]
        return f"{metrics[key]:.4g} [{low:.4g}, {high:.4g}]"

    return [
        f"## Held-out preference metrics ({metrics['heldout.n']} pairs, 95 % intervals)",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
        *[
            f"| {m} | {cell(f'heldout.before.{m}')} | {cell(f'heldout.after.{m}')} | "
            f"{cell(f'heldout.delta.{m}')} |"
            for m in HELDOUT
        ],
        "",
    ]


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
    eval_dataset: Any = None,
    world_size: int = 1,
) -> Any:
    """Build the TRL trainer (DPOTrainer or SFTTrainer) exactly as the stage uses it.

    ``eval_dataset`` (held-out pairs, DPO only) is tokenized by TRL like the training data;
    the trainer never evaluates by itself (:func:`preference_logps` does).
    """
    from transformers import set_seed

    args = build_trl_config(cfg, seed=seed, output_dir=output_dir, world_size=world_size)
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
            eval_dataset=eval_dataset,
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


def save_policy(
    trainer: Any,
    out_dir: str | Path,
    card: str,
    *,
    ranks: Ranks | None = None,
    base: str | Path | None = None,
    dtype: str = "float32",
    sharded: bool | None = None,
) -> None:
    """Write the policy (safetensors with LoRA merged, tokenizer, ``README.md`` card).

    Call on every process. ``Trainer.save_model`` gathers sharded weights (FSDP, DeepSpeed
    ZeRO-3) collectively and writes on the main process only; after a barrier the main process
    writes the card. LoRA: merged in memory on the main process, or, when the model is sharded
    (``sharded``; default: the trainer's FSDP / DeepSpeed state), the adapter is saved
    collectively and merged into ``base`` from disk.
    """
    ranks = ranks or Ranks()
    out = Path(out_dir)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if sharded is None:
        sharded = bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if hasattr(unwrapped, "merge_and_unload") and not sharded:
        if ranks.main:
            unwrapped.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
            trainer.processing_class.save_pretrained(str(out))
    elif hasattr(unwrapped, "merge_and_unload"):
        adapter = out / ".adapter"
        trainer.save_model(str(adapter))
        ranks.barrier()
        if ranks.main:
            from peft import PeftModel

            if base is None:
                raise KarmaError("merging a sharded LoRA adapter needs the base model directory")
            model, tok = load_causal_lm(base, dtype=dtype)
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            merged.save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
            shutil.rmtree(adapter)
    else:
        trainer.save_model(str(out))
    ranks.barrier()  # save_model has no barrier of its own
    if ranks.main:
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle holding local paths
        if not any((out / f).is_file() for f in ("model.safetensors", WEIGHTS_INDEX)):
            raise KarmaError(
                "the saved policy has no full weights (a sharded state dict?)",
                file=out,
                expected="FSDP state_dict_type FULL_STATE_DICT, or DeepSpeed "
                "stage3_gather_16bit_weights_on_model_save: true, in the accelerate config",
            )
        (out / "README.md").write_text(card)


@dataclass(frozen=True, kw_only=True)
class TrainPaths:
    """Paths of the ``train`` stage."""

    data: Path = input_path("preference pairs: prompt, chosen, rejected (TRL conversational)")
    base: Path = input_path("base model directory", is_dir=True)
    out: Path = output_path("policy: safetensors, tokenizer, README.md model card", is_dir=True)
    checkpoints: Path = state_path("persisted checkpoints: a killed run resumes from here")
    eval_data: Path | None = input_path(
        "held-out preference pairs (the preferences stage's test_prefs.parquet): TRL's DPO "
        "evaluation metrics on them before and after training, with intervals",
        required=False,
    )
    live_dir: Path | None = output_path("dvclive curves (plots/metrics/*.tsv)", is_dir=True,
                                        required=False)  # fmt: skip
    metrics: Path | None = output_path("final training metrics", ".json", required=False)


def _inputs(params: Params, paths: TrainPaths, world: int) -> tuple[TrainConfig, Any, Any]:
    """Validate everything cheap (before any model loads or any process is launched)."""
    cfg = apply_recipe(params.train)
    # every TRL field, as TRL itself checks it, before a checkpoint is touched or a model loads
    build_trl_config(cfg, seed=params.seed, output_dir=paths.checkpoints, world_size=world)
    build_lora_config(cfg.lora)
    dataset = load_pairs(paths.data, cfg.method)
    heldout = None
    if paths.eval_data is not None and cfg.method != "dpo":
        log.warning("held-out preference metrics are DPO's: --eval-data is not used by sft")
    elif paths.eval_data is not None:
        heldout = load_pairs(paths.eval_data, "dpo")
    return cfg, dataset, heldout


def run_train(
    params: Params, paths: TrainPaths, *, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Stage ``train``: validate, resume if possible, train, write policy, curves and metrics.

    Under a launcher every process runs this: the main process alone fingerprints the inputs
    and prepares the checkpoint directory (the others wait and receive its answer), all train
    and save collectively, and the main process alone writes the card, provenance and metrics.
    """
    die_with_launcher()  # also when launched by hand, without pipeline.execute
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, dataset, heldout = _inputs(params, paths, world)
    plan = batch_plan(cfg, world)
    seed = params.seed
    ranks = Ranks.start()

    def prepare() -> tuple[Path, Path | None]:
        fp = fingerprint(cfg, paths, seed, world_size=world)
        return prepare_run_dir(paths.checkpoints, fp, world)

    run_dir, resume = ranks.on_main(prepare)
    if resume is not None and ranks.main:
        log.info("resuming from checkpoint %s", resume)
    elif ranks.main:
        log.info("no checkpoint for this configuration (%s): training from scratch", run_dir.name)
    if not plan.derived and world > 1 and ranks.main:
        log.warning("global batch %d = %d processes x %d x accumulation %d (set "
                    "train.global_batch_size to keep it fixed)", plan.global_batch, world,
                    plan.per_device, plan.accumulation)  # fmt: skip

    live = [] if paths.live_dir is None else [_curve_callback(paths.live_dir)]
    # TRL's log printer (print / tqdm.write) goes to stdout, which holds only the metrics JSON
    with contextlib.redirect_stdout(sys.stderr):
        trainer = make_trainer(
            cfg,
            paths.base,
            seed=seed,
            output_dir=run_dir,
            dataset=dataset,
            callbacks=[*live, _drop_stale_callback(run_dir), *callbacks],
            eval_dataset=heldout,
            world_size=world,
        )
        if trainer.accelerator.num_processes != world:
            raise KarmaError(f"accelerate sees {trainer.accelerator.num_processes} processes, "
                             f"{world} were launched", field="train.launcher")  # fmt: skip
        # Before training the policy has the reference's weights (the same base; LoRA starts
        # at zero): the reference pass gives TRL's "before" metrics (rewards 0, loss ln 2).
        reference = None if heldout is None else preference_logps(trainer, reference=True)
        start_step = start_tokens = 0
        if resume is not None:
            state = json.loads((resume / "trainer_state.json").read_text())
            start_step = int(state.get("global_step", 0))
            start_tokens = int(state.get("num_input_tokens_seen", 0))
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        wall = time.perf_counter() - t0
        policy = None if heldout is None else preference_logps(trainer)
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
    metrics.update(plan.metrics())
    if reference is not None and policy is not None:
        before = pair_metrics(reference, reference, trainer.beta)
        after = pair_metrics(policy, reference, trainer.beta)
        metrics.update(heldout_summary(before, after, seed=seed))
    base_prov = provenance(paths.base)
    metrics.update({"meta.base_model": str(base_prov.get("source", paths.base)),
                    "meta.seed": seed, "meta.train_method": cfg.method})  # fmt: skip
    bad = [k for k in ("loss", "train_loss") if k in metrics and not math.isfinite(metrics[k])]
    if bad:  # the same logged (gathered) loss on every process
        if not ranks.main:
            raise SystemExit(1)
        raise KarmaError(f"training diverged: non-finite {bad}", field="train.trl")
    card = ""
    if ranks.main:
        card = model_card(cfg, paths, seed=seed, base_summary=_base_summary(paths.base),
                          n_pairs=len(dataset), metrics=metrics)  # fmt: skip
    save_policy(trainer, paths.out, card, ranks=ranks, base=paths.base, dtype=cfg.dtype)
    if ranks.main:
        write_provenance(paths.out, {
            "source": base_prov.get("source", str(paths.base)), "base": base_prov,
            "method": cfg.method, "seed": seed, "recipe": cfg.recipe,
            "global_batch_size": cfg.global_batch_size, "lora": cfg.lora is not None,
        })  # fmt: skip
        if paths.metrics is not None:  # timings vary between identical runs: logged only
            write_json(paths.metrics, {k: v for k, v in metrics.items() if k not in TIMINGS})
        drop_stale(run_dir)
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    if ranks.main:
        log.info("%s: %d steps, loss %.4f, %.0f tokens/s, %.1f s", cfg.method, metrics["steps"],
                 metrics.get("loss", float("nan")), metrics["tokens_per_second"], wall)  # fmt: skip
    del trainer, result, state  # the DDP model holds the process group: free it first
    ranks.close()
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
