"""Settings of the stage train."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from karma.core.settings import Dtype, Section, TrainMethod, setting

TRL_RESERVED = {
    "output_dir": "karma (checkpoints go to the stage's checkpoint dir)",
    "seed": "the top-level 'seed' param",
    "report_to": "karma (curves go to dvclive)",
    "resume_from_checkpoint": "karma (a killed run resumes automatically)",
    "save_steps": "train.checkpoint_steps",
}


class TrainConfig(Section):
    """Stage ``train``: DPO or SFT with TRL (also reads ``seed``)."""

    method: TrainMethod = setting("dpo", "dpo (with an explicit reference model) | sft (on chosen)")
    recipe: str | None = setting(
        None, "a YAML file whose global_batch_size / trl / dpo / sft / lora / dtype override these"
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
            "max_steps": 16,
            "per_device_train_batch_size": 2,
            "learning_rate": 5.0e-5,
            "lr_scheduler_type": "constant",
            "max_length": 256,
            "logging_steps": 1,
        },
        "fields of TRL's DPOConfig / SFTConfig, for either method (the CPU default recipe)",
    )
    dpo: dict[str, Any] = setting({"beta": 0.1}, "fields for DPOConfig only")
    sft: dict[str, Any] = setting({}, "fields for SFTConfig only")
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

    @field_validator("trl", "dpo", "sft")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for key in value:
            if key in TRL_RESERVED:
                raise ValueError(f"{key!r} is set by {TRL_RESERVED[key]}")
        if "gradient_accumulation_steps" in value and info.data.get("global_batch_size"):
            raise ValueError(
                "'gradient_accumulation_steps' is derived from train.global_batch_size "
                "(set train.global_batch_size: null to choose it yourself)"
            )
        return value
