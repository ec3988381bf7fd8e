"""Settings of the lm-eval stages: benchmark@<name>, evaluate_base and evaluate."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from karma.core.errors import did_you_mean
from karma.core.settings import Dtype, Protocol, Section, setting

SUITES_FILE = Path(__file__).resolve().parent / "tasks" / "suites.yaml"


class TaskSpec(Section):
    """One benchmark: the lm-eval task and the metric key that is its score."""

    task: str = Field(min_length=1, description="lm-eval task name, embedded karma_* task or YAML")
    metric: str = Field(min_length=1, description="result key: acc, or metric,filter")

    @property
    def result_key(self) -> str:
        """The key in lm-eval's results: ``acc`` -> ``acc,none``."""
        return self.metric if "," in self.metric else f"{self.metric},none"

    @property
    def flat_metric(self) -> str:
        """Flat name: ``acc,none`` -> ``acc``; ``m,custom-extract`` -> ``m_custom-extract``."""
        metric, _, filt = self.result_key.partition(",")
        return metric if filt in ("", "none") else f"{metric}_{filt}"


class SuiteSpec(Section):
    """One suite of ``karma/evaluation/tasks/suites.yaml``: its protocol and its benchmark map."""

    protocol: Protocol = Field(description="how multiple-choice benchmarks are scored")
    max_gen_toks: int | None = Field(None, ge=1, description="cap on generated tokens")
    num_fewshot: int | None = Field(None, ge=0, description="shots for every task of the suite")
    tasks: dict[str, TaskSpec] = Field(min_length=1, description="{benchmark: {task, metric}}")


@functools.cache
def suites() -> dict[str, SuiteSpec]:
    """Suites by name (``tasks/suites.yaml``): protocol, each benchmark's task and score key.

    Read on first use, never at import.
    """
    raw = yaml.safe_load(SUITES_FILE.read_text(encoding="utf-8"))
    return {name: SuiteSpec.model_validate(spec) for name, spec in raw.items()}


def check_suite(value: str) -> str:
    """``value`` if it names a suite, else a ValueError listing the choices."""
    known = list(suites())
    if value not in known:
        raise ValueError(
            f"not one of the choices{did_you_mean(value, known)} (expected {' | '.join(known)})"
        )
    return value


Backend = Literal["hf", "vllm"]
#: lm-eval ``model_args`` karma sets from other settings.
MODEL_ARGS_RESERVED = {
    "pretrained": "the model path",
    "dtype": "the dtype setting",
    "batch_size": "the batch_size setting",
    "device": "the device setting",
}


# --------------------------------------------------------------------------- sections


class RunConfig(Section):
    """How lm-eval runs a model (sections ``benchmark`` and ``evaluate``)."""

    suite: str = setting(
        "embedded",
        "benchmark map and protocol (karma/evaluation/tasks/suites.yaml): embedded | "
        "embedded_paper (offline mini suites: log-likelihood | the paper's generative protocol) | "
        "lm_eval | "
        "paper (full tasks from the hub, for a GPU machine)",
    )
    tasks: dict[str, TaskSpec] = setting(
        {}, "run these benchmarks instead of the suite's: {benchmark: {task: ..., metric: ...}}"
    )
    protocol: Protocol | None = setting(
        None, "protocol of a `tasks` map (null: the suite's; custom for a `tasks` map)"
    )
    backend: Backend = setting(
        "hf", "lm-eval model backend: hf (transformers) | vllm (GPU; vllm must be installed)"
    )
    model_args: dict[str, Any] = setting(
        {}, "extra lm-eval model_args of the backend, e.g. vllm: {tensor_parallel_size: 2, "
        "gpu_memory_utilization: 0.9, max_model_len: 4096, data_parallel_size: 1}"
    )  # fmt: skip
    batch_size: int = setting(8, "sequences per forward pass", ge=1)
    device: str = setting("cpu", "torch device: cpu | cuda | cuda:N", min_length=1)
    dtype: Dtype | Literal["auto"] = setting("float32", "dtype the model is loaded in")
    apply_chat_template: bool | Literal["generative"] = setting(
        "generative", "prompt through the chat template: true | false | generative (generation "
        "tasks only; log-likelihood tasks score the plain prompt)"
    )  # fmt: skip
    num_fewshot: int | None = setting(None, "few-shot examples (null: each task's default)", ge=0)
    limit: int | None = setting(None, "items per task (null: all)", ge=1)
    max_gen_toks: int | None = setting(
        None, "cap on generated tokens (null: the suite's cap, else each task's own length)", ge=1
    )
    bootstrap_iters: int = setting(0, "lm-eval's bootstrap iterations for stderr", ge=0)
    allow_code: bool = setting(
        False, "let a task YAML of yours run Python (lm-eval's !function tags import code from "
        "beside the file): true only for task files you trust", operational=True,
    )  # fmt: skip
    num_processes: int = setting(
        1, "data-parallel processes (hf backend; launched with python -m torch.distributed.run)",
        ge=1, operational=True,
    )  # fmt: skip
    cache: bool = setting(
        True, "reuse lm-eval responses cached by model content + settings", operational=True
    )
    samples_dir: str | None = setting(
        None, "also write lm-eval's full per-sample logs (JSONL per task) here", operational=True
    )
    threads: int | None = setting(
        1, "torch CPU threads (null: torch's default; 1 avoids OpenMP stalls on a shared CPU)",
        ge=1, operational=True,
    )  # fmt: skip

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, value: str) -> str:
        return check_suite(value)

    @field_validator("model_args")
    @classmethod
    def _not_reserved_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in MODEL_ARGS_RESERVED:
                raise ValueError(f"{key!r} is set by {MODEL_ARGS_RESERVED[key]}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.backend == "vllm" and self.num_processes > 1:
            raise ValueError(
                "num_processes must be 1 with backend vllm (vllm parallelises itself: "
                "model_args.tensor_parallel_size / data_parallel_size)"
            )
        suite = suites()[self.suite].protocol
        if self.protocol is not None and not self.tasks and self.protocol != suite:
            raise ValueError(
                f"protocol {self.protocol!r} given without tasks: suite {self.suite!r} is "
                f"protocol {suite!r} (set protocol only for a tasks map)"
            )
        return self

    def task_map(self) -> dict[str, TaskSpec]:
        """The benchmarks to run: ``tasks`` when given, else the suite's map."""
        return dict(self.tasks) or dict(suites()[self.suite].tasks)

    def gen_cap(self) -> int | None:
        """The cap on generated tokens: ``max_gen_toks``, else the suite's (none for tasks)."""
        if self.max_gen_toks is not None or self.tasks:
            return self.max_gen_toks
        return suites()[self.suite].max_gen_toks

    def shots(self) -> int | None:
        """Few-shot examples: ``num_fewshot``, else the suite's (each task's own for tasks)."""
        if self.num_fewshot is not None or self.tasks:
            return self.num_fewshot
        return suites()[self.suite].num_fewshot

    def protocol_name(self) -> str:
        """The protocol of :meth:`task_map`: ``protocol``, else the suite's (custom for tasks)."""
        if self.protocol is not None:
            return self.protocol
        return "custom" if self.tasks else suites()[self.suite].protocol


class BenchmarkConfig(RunConfig):
    """Stage ``benchmark@<name>``: lm-eval on one origin model (one instance per measured model)."""

    suite: str = setting(
        "embedded_paper",
        "benchmark map and protocol (karma/evaluation/tasks/suites.yaml): embedded_paper | "
        "paper (the "
        "paper's generative protocol, as the reported table: offline mini suites | full tasks "
        "from the hub) | embedded | lm_eval (log-likelihood)",
    )


class EvaluateConfig(RunConfig):
    """Stages ``evaluate_base`` and ``evaluate``: lm-eval on the base model and the policy."""

    n_boot: int = setting(
        10_000, "paired bootstrap resamples of each policy - base delta (95% interval)", ge=100
    )
    bootstrap_seed: int = setting(
        0, "seed of the paired bootstrap (not the pipeline seed: see the README)", ge=0, lt=2**63
    )
