"""Settings of the pool (``scores.measured`` entries) and the stages prompts and generate@<name>.

A pool entry is a hub id or model directory (a string, as before), or a mapping that adds a
revision, a chat-template override, a derivation (fewer layers, perturbed weights) and
per-model overrides of the ``benchmark`` and ``generate`` sections.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from karma.core.settings import Dtype, Section, setting

Completions = Literal["dataset", "pool"]
Engine = Literal["hf", "vllm", "openai"]
Mode = Literal["dataset", "pool"]


class Derive(Section):
    """A model derived from a local one: its first ``layers`` decoder layers, noisy weights."""

    layers: int | None = setting(None, "keep only the first N decoder layers (null: all)", ge=1)
    noise: float = setting(
        0.0, "Gaussian noise added to every weight, relative to its tensor's std", ge=0
    )
    seed: int = setting(0, "seed of the noise", ge=0, lt=2**63)


class PoolModel(Section):
    """One model of the pool (``scores.measured.<name>``)."""

    model: str = setting(
        ..., "hub id, local model directory, or served model name (openai)", min_length=1
    )
    revision: str | None = setting(None, "hub revision (a commit sha pins it)")
    chat_template: str | None = setting(None, "Jinja chat template replacing the tokenizer's")
    derive: Derive | None = setting(None, "derive a model from `model` (a local directory)")
    modes: list[Mode] = setting(
        ["dataset", "pool"],
        "completions modes in which the model is benchmarked (pool: also generates)",
        min_length=1,
    )
    benchmark: dict[str, Any] = setting({}, "overrides of the benchmark section for this model")
    generate: dict[str, Any] = setting({}, "overrides of the generate section for this model")

    @model_validator(mode="after")
    def _overrides(self) -> PoolModel:
        GenerateConfig.model_validate(self.generate)  # benchmark: checked by its stage
        return self


def as_pool_model(entry: str | PoolModel) -> PoolModel:
    """A ``scores.measured`` entry as a :class:`PoolModel` (a string is its ``model``)."""
    return entry if isinstance(entry, PoolModel) else PoolModel(model=entry)


class PromptsConfig(Section):
    """Stage ``prompts``: the prompt set of the pool (also reads ``seed``)."""

    source: str = setting(
        "data/demo/ultrafeedback_demo.jsonl",
        "UltraFeedback instructions: a hub id (openbmb/UltraFeedback, pinned revision), or a "
        "local .jsonl/.json/.parquet file with an `instruction` (or `prompt`) column",
        min_length=1,
    )
    revision: str | None = setting(None, "hub revision: a commit sha (required for a hub id)")
    split: str = setting("train", "split of a hub dataset", min_length=1)
    limit: int | None = setting(48, "prompts kept: a seeded sample (null: all)", ge=1)


class GenerateConfig(Section):
    """Stage ``generate@<name>``: completions of one pool model (per-model overrides:
    ``scores.measured.<name>.generate``)."""

    engine: Engine = setting(
        "hf",
        "hf (transformers, CPU/GPU) | vllm (GPU extra) | openai (any OpenAI-compatible server)",
    )
    n: int = setting(1, "samples per prompt", ge=1)
    temperature: float = setting(0.0, "0: greedy", ge=0)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = setting(40, "tokens generated at most per completion", ge=1)
    seed: int = setting(0, "sampling seed", ge=0, lt=2**63)
    stop: list[Annotated[str, Field(min_length=1)]] = setting([], "stop strings")
    batch_size: int = setting(16, "prompts per generate call (hf); padding can move floats", ge=1)
    dtype: Dtype = setting("float32", "dtype the model is loaded in")
    device: str = setting("cpu", "torch device: cpu | cuda | cuda:N", operational=True)
    threads: int | None = setting(
        1,
        "torch CPU threads (null: torch's default; 1 avoids OpenMP stalls on a shared CPU)",
        ge=1,
        operational=True,
    )
    base_url: str = setting(
        "http://127.0.0.1:8000/v1", "openai: the server's base URL", operational=True
    )
    api_key_env: str = setting(
        "OPENAI_API_KEY",
        "openai: environment variable holding the key (never written out)",
        operational=True,
    )
    concurrency: int = setting(8, "openai: requests in flight", ge=1, operational=True)
    retries: int = setting(
        4, "openai: retries on 429 / 5xx / timeouts (exponential backoff)", ge=0, operational=True
    )
    timeout: float = setting(60.0, "openai: seconds per request", gt=0, operational=True)
    backoff: float = setting(
        1.0, "openai: first backoff in seconds (doubles)", ge=0, operational=True
    )
    max_failed: float = setting(
        0.0,
        "share of failed rows (retries exhausted) tolerated; above it the stage fails and "
        "the next run resumes from the finished rows",
        ge=0,
        le=1,
    )
    tensor_parallel_size: int = setting(1, "vllm: GPUs per model replica", ge=1, operational=True)
    data_parallel_size: int = setting(1, "vllm: model replicas", ge=1, operational=True)
    gpu_memory_utilization: float = setting(
        0.9, "vllm: share of GPU memory", gt=0, le=1, operational=True
    )


#: The embedded CPU pool: SmolLM2-135M-Instruct (models/base) and three models derived from it,
#: of visibly different competence. Benchmarked and generating only under completions: pool.
_POOL_BENCH = {"suite": "embedded", "limit": 12}
EMBEDDED_POOL: dict[str, PoolModel] = {
    name: PoolModel(model="models/base", derive=derive, modes=["pool"], benchmark=_POOL_BENCH)
    for name, derive in (
        ("smollm2-135m", None),
        ("smollm2-noise05", Derive(noise=0.05, seed=1)),
        ("smollm2-noise10", Derive(noise=0.1, seed=1)),
        ("smollm2-l24", Derive(layers=24)),
    )
}
