"""Settings of the stage train.

``train.method`` takes its choices from the training-method registry
(:mod:`karma.training.objectives`), and each objective has its own ``train.<method>`` block of
TRL fields (with the entry's defaults): adding an objective adds both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import create_model, field_validator

from karma.core.settings import Dtype, Section, setting
from karma.training.objectives import NAMES, OBJECTIVES

TrainMethod = Literal[NAMES]  # type: ignore[valid-type]

TRL_RESERVED = {
    "output_dir": "karma (checkpoints go to the stage's checkpoint dir)",
    "seed": "the top-level 'seed' param",
    "report_to": "karma (curves go to dvclive)",
    "resume_from_checkpoint": "karma (a killed run resumes automatically)",
    "save_steps": "train.checkpoint_steps",
}


class TrainBase(Section):
    """Stage ``train``: a TRL objective of the registry (also reads ``seed``)."""

    method: TrainMethod = setting(
        "dpo", " | ".join(NAMES) + " (the training-method registry, karma/training/objectives.py)"
    )
    recipe: str | None = setting(
        None, "a YAML file whose global_batch_size / trl / <method> / lora / dtype override these"
    )
    global_batch_size: int | None = setting(
        4,
        "pairs per optimizer step over all processes; gradient accumulation is derived: "
        "global / (trl.per_device_train_batch_size x processes). null: keep "
        "trl.gradient_accumulation_steps (the global batch then grows with num_processes)",
        ge=1,
    )
    trl: dict[str, Any] = setting(
        {
            "max_steps": 4,  # with learning_rate: chosen on the dev pairs (docs/recipe_choice.md)
            "per_device_train_batch_size": 2,
            "learning_rate": 2.0e-5,
            "lr_scheduler_type": "constant",
            "max_length": 256,
            "logging_steps": 1,
        },
        "fields of the method's TRL config, whichever the method (the CPU default recipe)",
    )
    reference: Literal["live", "stored"] = setting(
        "live", "reference log-probs of a reference-model objective: live (the reference model "
        "is loaded and scores each batch) | stored (the reference stage's, TRL's precompute: "
        "computed once, no reference model loaded; dpo and ipo)",
    )  # fmt: skip
    lora: dict[str, Any] | None = setting(
        None, "null, or peft LoraConfig fields, e.g. {r: 16, lora_alpha: 32}"
    )
    dtype: Dtype = setting(
        "float32", "dtype the base model is loaded in (mixed precision: trl.bf16)"
    )
    launcher: Literal["python", "torchrun", "accelerate"] = setting(
        "python", "python (in-process, 1 process) | torchrun (torch.distributed.run, CPU or GPU) "
        "| accelerate (accelerate launch; GPU, with accelerate_config for FSDP / DeepSpeed)",
        operational=True,
    )  # fmt: skip
    num_processes: int = setting(
        1, "data-parallel processes on this machine (torchrun / accelerate)", ge=1,
        operational=True,
    )  # fmt: skip
    accelerate_config: str | None = setting(
        None, "accelerate config file (FSDP / DeepSpeed), launcher accelerate only",
        operational=True,
    )  # fmt: skip
    checkpoint_steps: int = setting(
        4, "save a resumable checkpoint every N steps", ge=1, operational=True
    )
    keep_checkpoints: bool = setting(
        False, "keep the checkpoints after a successful run", operational=True
    )

    def method_args(self, name: str | None = None) -> dict[str, Any]:
        """The ``train.<name>`` block (default: the chosen method's)."""
        return dict(getattr(self, name or self.method))

    @field_validator("*")
    @classmethod
    def _not_reserved(cls, value: Any, info: Any) -> Any:
        if info.field_name != "trl" and info.field_name not in OBJECTIVES:
            return value
        objectives = OBJECTIVES.values() if info.field_name == "trl" else [
            OBJECTIVES[info.field_name]]  # fmt: skip
        for key in value:
            fixed = {o.name: o.fixed[key] for o in objectives if key in o.fixed}
            if fixed:
                raise ValueError(
                    f"{key!r} is set by train.method ({fixed}); another value is "
                    "another entry of karma/training/objectives.py"
                )
            if key in TRL_RESERVED:
                raise ValueError(f"{key!r} is set by {TRL_RESERVED[key]}")
        if "gradient_accumulation_steps" in value and info.data.get("global_batch_size"):
            raise ValueError(
                "'gradient_accumulation_steps' is derived from train.global_batch_size "
                "(set train.global_batch_size: null to choose it yourself)"
            )
        return value


#: ``TrainBase`` plus one ``train.<method>`` block per registry entry (TRL fields for that
#: method's config only, over the entry's defaults).
TrainConfig = create_model(  # type: ignore[call-overload]
    "TrainConfig",
    __base__=TrainBase,
    __module__=__name__,
    **{
        name: (
            dict[str, Any],
            setting(dict(o.defaults), f"fields for {o.config.split(':')[1]} of method {name} only"),
        )
        for name, o in OBJECTIVES.items()
    },
)
TrainConfig.__doc__ = TrainBase.__doc__
