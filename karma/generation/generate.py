"""Stages ``prompts`` and ``generate@<name>``: the pool's prompt set and each model's completions.

``prompts`` reads UltraFeedback instructions (the embedded demo set, a local file, or a hub id at
a pinned revision), drops duplicates and keeps a seeded sample of ``prompts.limit``.

``generate@<name>`` (one DVC stage instance per pool model) writes one row per completion:
``prompt_id, prompt, model, sample, text, tokens, logprob_sum, logprob_mean, finish_reason,
status, error, engine, engine_version``. Batches are fixed slices of the prompt set, each seeded
with ``generate.seed + batch index``, so greedy or seeded ``hf`` runs are byte-identical, and a
run that stops half-way (a server failing mid-run) resumes from its finished batches, kept in
the cache under a key of model, prompts and settings. Under ``completions: dataset`` (or for a
model whose ``modes`` lack ``pool``) it writes an empty table without loading anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import cache_root, read_parquet, tree_digest
from karma.core.stage import Stage, argument, input_path, output_path
from karma.generation.settings import GenerateConfig, PoolModel, PromptsConfig

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

SCHEMA = {
    "prompt_id": pl.String,
    "prompt": pl.String,
    "model": pl.String,
    "sample": pl.Int64,
    "text": pl.String,
    "tokens": pl.Int64,
    "logprob_sum": pl.Float64,
    "logprob_mean": pl.Float64,
    "finish_reason": pl.String,
    "status": pl.String,
    "error": pl.String,
    "engine": pl.String,
    "engine_version": pl.String,
}
PROMPT_SCHEMA = {"prompt_id": pl.String, "prompt": pl.String}


# --------------------------------------------------------------------------- prompts


def prompt_id(text: str) -> str:
    """A stable id of a prompt: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_prompts(cfg: PromptsConfig) -> pl.DataFrame:
    """The instructions of ``cfg.source`` (file or hub id), in source order."""
    path = Path(cfg.source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".json", ".parquet"):
        reader = {".jsonl": pl.read_ndjson, ".json": pl.read_json, ".parquet": read_parquet}
        try:
            frame = reader[suffix](path)
        except (pl.exceptions.PolarsError, ValueError, OSError) as err:
            raise KarmaError(
                f"unreadable prompt file: {str(err)[:120]}", file=path, field="prompts.source"
            ) from None
    elif not path.exists() and cfg.source.count("/") == 1 and not suffix:
        if not cfg.revision:
            raise KarmaError(
                "a hub dataset needs a pinned revision",
                field="prompts.revision",
                expected="a commit sha",
            )
        import datasets

        try:
            ds = datasets.load_dataset(cfg.source, revision=cfg.revision, split=cfg.split)
        except Exception as err:
            raise KarmaError(
                f"cannot fetch the prompts: {type(err).__name__}",
                file=cfg.source,
                field="prompts.source",
            ) from None
        frame = pl.from_arrow(ds.data.table)  # type: ignore[assignment]
    else:
        raise KarmaError(
            "prompt source not found",
            file=cfg.source,
            field="prompts.source",
            expected="a .jsonl/.json/.parquet file or a hub id",
        )
    column = next((c for c in ("instruction", "prompt") if c in frame.columns), None)
    if column is None or frame.schema[column] != pl.String:
        raise KarmaError(
            "no text column `instruction` or `prompt`",
            file=cfg.source,
            field="prompts.source",
            value=frame.columns[:8],
        )
    return frame.select(pl.col(column).alias("prompt"))


def select_prompts(frame: pl.DataFrame, limit: int | None, seed: int, where: str) -> pl.DataFrame:
    """Distinct non-blank prompts with ids; a seeded sample of ``limit`` kept in source order."""
    out = (
        frame.lazy()
        .filter(pl.col("prompt").str.strip_chars().str.len_chars() > 0)
        .unique("prompt", keep="first", maintain_order=True)
        .with_columns(pl.col("prompt").map_elements(prompt_id, pl.String).alias("prompt_id"))
        .with_row_index("pos")
        .collect()
    )
    if out.height == 0:
        raise KarmaError(
            "empty prompt set (no non-blank instruction)", file=where, field="prompts.source"
        )
    if limit is not None and out.height > limit:
        key = pl.concat_str(pl.lit(f"{seed}:"), "prompt_id").hash(seed=0)
        out = out.sort(key, "pos").head(limit).sort("pos")
    return out.select("prompt_id", "prompt")


@dataclass(frozen=True, kw_only=True)
class PromptsPaths:
    """Paths of the ``prompts`` stage."""

    out: Path = output_path("the prompt set: prompt_id, prompt", ".parquet")


def run_prompts(params: Params, paths: PromptsPaths) -> dict[str, Any]:
    """Stage ``prompts``."""
    cfg = params.prompts
    frame = select_prompts(read_prompts(cfg), cfg.limit, params.seed, cfg.source)
    frame.write_parquet(paths.out, statistics=False)
    return {"prompts": frame.height, "source": cfg.source}


# --------------------------------------------------------------------------- generate


def settings_for(params: Params, entry: PoolModel, name: str) -> GenerateConfig:
    """The generate section with the entry's overrides (validated, named on error)."""
    if not entry.generate:
        return params.generate
    merged = {**params.generate.model_dump(), **entry.generate}
    try:
        return GenerateConfig.model_validate(merged)
    except ValueError as err:  # already validated on load; kept for direct callers
        raise KarmaError(
            f"bad override: {str(err).splitlines()[0]}", field=f"scores.measured.{name}.generate"
        ) from None


def resume_dir(entry: PoolModel, cfg: GenerateConfig, prompts: Path) -> Path:
    """Where finished batches of this (model, prompts, settings) are kept between runs."""
    from karma.generation.pool import identity

    ops = {
        "device",
        "threads",
        "base_url",
        "api_key_env",
        "concurrency",
        "retries",
        "timeout",
        "backoff",
        "max_failed",
        "tensor_parallel_size",
        "data_parallel_size",
        "gpu_memory_utilization",
    }
    key = {
        "model": identity(entry) if cfg.engine != "openai" else f"{entry.model}@{cfg.base_url}",
        "prompts": tree_digest(prompts),
        "settings": {k: v for k, v in cfg.model_dump().items() if k not in ops},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root("generate", digest)


def batch_rows(
    prompts: pl.DataFrame, comps: list[list[Any]], name: str, engine: Any
) -> list[dict[str, Any]]:
    """Rows of one batch's completions."""
    rows = []
    for (pid, text), samples in zip(prompts.iter_rows(), comps, strict=True):
        for k, c in enumerate(samples):
            rows.append(
                {
                    "prompt_id": pid,
                    "prompt": text,
                    "model": name,
                    "sample": k,
                    "text": c.text,
                    "tokens": c.tokens,
                    "logprob_sum": c.logprob_sum,
                    "logprob_mean": c.logprob_mean,
                    "finish_reason": c.finish_reason,
                    "status": c.status,
                    "error": c.error,
                    "engine": engine.name,
                    "engine_version": engine.version,
                }
            )
    return rows


def generate_all(
    entry: PoolModel,
    cfg: GenerateConfig,
    prompts: pl.DataFrame,
    name: str,
    resume: Path | None = None,
) -> pl.DataFrame:
    """Every completion of ``entry`` on ``prompts``, batch by batch (resumed from ``resume``)."""
    from karma.generation.engines import open_engine

    size = cfg.batch_size if cfg.engine == "hf" else max(cfg.batch_size, cfg.concurrency)
    starts = list(range(0, prompts.height, size))
    done: dict[int, pl.DataFrame] = {}
    if resume is not None:
        for b in range(len(starts)):
            f = resume / f"batch-{b:06d}.parquet"
            if f.is_file():
                done[b] = pl.read_parquet(f)
        if done:
            log.info("resuming %s: %d of %d batches done", name, len(done), len(starts))
    engine = open_engine(entry, cfg, f"scores.measured.{name}") if len(done) < len(starts) else None
    try:
        for b, start in enumerate(starts):
            if b in done:
                continue
            chunk = prompts.slice(start, size)
            chats = [[{"role": "user", "content": p}] for p in chunk["prompt"]]
            comps = engine.generate(chats, cfg.seed + b)  # type: ignore[union-attr]
            frame = pl.DataFrame(batch_rows(chunk, comps, name, engine), schema=SCHEMA)
            done[b] = frame
            if resume is not None and not (frame["status"] == "failed").any():
                resume.mkdir(parents=True, exist_ok=True)
                tmp = resume / f".batch-{b:06d}.tmp.parquet"
                frame.write_parquet(tmp, statistics=False)
                tmp.rename(resume / f"batch-{b:06d}.parquet")
            log.info("%s: batch %d/%d", name, b + 1, len(starts))
    finally:
        if engine is not None:
            engine.close()
    return pl.concat([done[b] for b in range(len(starts))], how="vertical")


@dataclass(frozen=True, kw_only=True)
class GeneratePaths:
    """Paths of the ``generate@<name>`` stage."""

    name: str = argument("pool model: a name in scores.measured")
    prompts: Path = input_path("the prompts stage's Parquet")
    out: Path = output_path("completions of this model, one row each", ".parquet")


def run_generate(params: Params, paths: GeneratePaths) -> dict[str, Any]:
    """Stage ``generate@<name>``."""
    from karma.generation.pool import pool_entry

    entry = pool_entry(params.scores.measured, paths.name)
    cfg = settings_for(params, entry, paths.name)
    if params.completions != "pool" or "pool" not in entry.modes:
        pl.DataFrame(schema=SCHEMA).write_parquet(paths.out, statistics=False)
        return {"completions": 0, "skipped": f"completions: {params.completions}"}
    prompts = read_parquet(paths.prompts, "prompt set").select(list(PROMPT_SCHEMA))
    if prompts.height == 0:
        raise KarmaError("empty prompt set", file=paths.prompts, expected="prompts")
    frame = generate_all(entry, cfg, prompts, paths.name, resume_dir(entry, cfg, paths.prompts))
    n_failed = int((frame["status"] == "failed").sum())
    if n_failed > cfg.max_failed * frame.height:
        first = frame.filter(pl.col("status") == "failed")["error"][0]
        raise KarmaError(
            f"{n_failed} of {frame.height} completions failed after retries (first: {first}); "
            "the finished batches are kept: rerun to resume",
            field="generate.max_failed",
            value=cfg.max_failed,
        )
    frame.write_parquet(paths.out, statistics=False)
    ok = frame.filter(pl.col("status") == "ok")
    return {
        "completions": frame.height,
        "failed": n_failed,
        "mean_tokens": round(float(ok["tokens"].mean() or 0), 3),
        "stopped": int((ok["finish_reason"] == "stop").sum()),
    }


PROMPTS = Stage(
    name="prompts",
    settings=("prompts", "seed"),
    paths=PromptsPaths,
    run=run_prompts,
    inputs=("prompts.source",),
    help="The pool's prompt set: UltraFeedback instructions (embedded demo, local file or hub "
    "id at a pinned revision), distinct, a seeded sample of prompts.limit.",
)
STAGE = Stage(
    name="generate",
    settings=("completions", "generate", "scores.measured"),
    paths=GeneratePaths,
    run=run_generate,
    help="Completions of one pool model (engine hf | vllm | openai): text, tokens, summed and "
    "mean log-probability, finish reason, engine and version per row; resumable.",
)
