"""Running benchmarks through lm-eval's Python API: models, seeds, caches, per-item scores.

>>> from karma.evaluation.settings import BenchmarkConfig
>>> row = benchmark_model("models/base", BenchmarkConfig(limit=10))  # doctest: +SKIP
>>> row  # doctest: +SKIP
{'model': 'models/base', 'ifeval': 0.2, ..., 'meta.protocol': 'paper', 'meta.suite': ...}

Every run keeps its per-item scores (:data:`SAMPLE_SCHEMA`, one row per item and benchmark),
from which each benchmark's ``score``, 95% interval and standard error are computed.
lm-eval is seeded as its command line does (:data:`LM_EVAL_SEEDS`); karma's IFEval tasks score
each item from its own seed (:mod:`karma.evaluation.ifeval`), so they score as ``lm_eval run``
does on the same task YAML, in any process count.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError
from karma.core.io import cache_root, tree_digest
from karma.evaluation.metrics import flat_key, flatten_metrics
from karma.evaluation.settings import RunConfig, TaskSpec
from karma.evaluation.taskconfig import Resolved, prepare_ifeval, resolve_tasks, warn_truncation

log = logging.getLogger(__name__)

#: The seeds of lm-eval's command line (``--seed 0,1234,1234,1234``: Python's random, numpy,
#: torch, few-shot sampling). Fixed, not the pipeline seed: replicates (``-S seed=0,1,2``) vary
#: training, and the base model's evaluation is not re-run for each seed.
LM_EVAL_SEEDS = {
    "random_seed": 0,
    "numpy_random_seed": 1234,
    "torch_random_seed": 1234,
    "fewshot_random_seed": 1234,
}
#: Per-item results (``samples.parquet``): one row per benchmark item. ``item`` is unique within
#: a benchmark (``<task>/<task_doc_id>``; a group benchmark such as mmlu_pro spans several tasks;
#: ``task_doc_id`` is lm-eval's doc_id, unique within a task only),
#: ``score`` the item's value of the benchmark's metric (0/1 for accuracies), ``response`` the
#: generated text and ``extracted`` what the metric's filter took from it (generation tasks).
SAMPLE_SCHEMA = {
    "benchmark": "String",
    "item": "String",
    "task": "String",
    "task_doc_id": "Int64",
    "score": "Float64",
    "target": "String",
    "response": "String",
    "extracted": "String",
}

# ---------------------------------------------------------------- models


def resolve_model(model: str, *, local_only: bool = False, where: str | None = None) -> str:
    """A local model directory (absolute path) or a hub id; a missing directory is an error.

    ``model`` is taken as a local path when it exists, starts with ``.``, ``/`` or ``~``, has more
    than one ``/``, or its first component is an existing directory (``models/base``).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KarmaError(
                "not a model directory (no config.json)",
                file=path,
                field=where,
                expected="a directory written by save_pretrained",
            )
        return str(path.resolve())
    first = model.split("/", 1)[0]
    looks_local = (
        local_only
        or model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or ("/" in model and Path(first).is_dir())
    )
    if looks_local or not model:
        raise KarmaError(
            "model directory not found",
            file=path,
            field=where,
            expected="a model directory (config.json + weights)"
            + ("" if local_only else " or a hub id"),
        )
    return model


def model_fingerprint(model: str, *extra: object) -> str:
    """Content hash of a local model directory (or the hub id) plus ``extra`` settings."""
    content = tree_digest(model) if Path(model).is_dir() else model
    return hashlib.sha256(json.dumps([content, *map(str, extra)]).encode()).hexdigest()[:16]


def is_main() -> bool:
    """Rank 0 (or no distributed launch): the process that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def load_lm(model: str, cfg: RunConfig, *, section: str = "evaluate") -> Any:
    """The lm-eval model of ``cfg.backend``; data-parallel when launched with N processes."""
    if cfg.backend == "vllm":
        return _load_vllm(model, cfg, field=f"{section}.backend")
    from lm_eval.models.huggingface import HFLM

    accelerator = _cpu_accelerator()
    try:
        lm = HFLM(
            pretrained=model,
            batch_size=cfg.batch_size,
            device=cfg.device,
            dtype=cfg.dtype,
            **cfg.model_args,
        )
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KarmaError(f"cannot load model: {first}", file=model) from None
    if accelerator is not None and lm.world_size == 1:
        # HFLM splits the work over processes only when torch sees more than one GPU; on CPU
        # (gloo) it would run every item in every process. Rank and world size from the
        # MULTI_CPU accelerator make lm-eval shard the requests and gather on rank 0.
        lm.accelerator = accelerator
        lm._device = accelerator.device
        lm._rank = accelerator.process_index
        lm._world_size = accelerator.num_processes
    return lm


def _cpu_accelerator() -> Any:
    """Under ``torch.distributed.run`` without CUDA: an accelerate MULTI_CPU state (gloo)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    return accelerator if accelerator.num_processes > 1 else None


def _load_vllm(model: str, cfg: RunConfig, *, field: str = "backend") -> Any:
    """lm-eval's ``vllm`` model: ``pretrained``, ``dtype``, ``batch_size`` + ``model_args``."""
    if importlib.util.find_spec("vllm") is None:
        raise KarmaError(
            "backend vllm needs the vllm package (pip install vllm, on a CUDA machine)",
            field=field,
            value="vllm",
            expected="hf, or vllm installed",
        )
    from lm_eval.api.registry import get_model

    args = {"pretrained": model, "dtype": cfg.dtype, "batch_size": cfg.batch_size}
    return get_model("vllm")(**args, **cfg.model_args)


@contextlib.contextmanager
def _request_cache(path: Path | None) -> Iterator[None]:
    """Point lm-eval's request cache (read from a module global) at ``path`` for one run."""
    import lm_eval.caching.cache as cache

    old = cache.PATH
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        cache.PATH = str(path)
    try:
        yield
    finally:
        cache.PATH = old


# ---------------------------------------------------------------- running


@dataclass
class Measurement:
    """One model's run: ``metrics`` ``{benchmark: {flat metric: value}}`` (lm-eval's, plus the
    headline keys :data:`HEADLINE_KEYS`) and ``samples`` (:data:`SAMPLE_SCHEMA`)."""

    metrics: dict[str, dict[str, Any]]
    samples: Any  # polars.DataFrame

    def flat(self) -> dict[str, Any]:
        """``{"<benchmark>.<metric>": value}``, sorted."""
        return {f"{b}.{k}": v for b in sorted(self.metrics) for k, v in self.metrics[b].items()}


def run_tasks(
    model: str,
    specs: Mapping[str, TaskSpec],
    cfg: RunConfig,
    *,
    local_only: bool = False,
    where: str = "tasks",
) -> Measurement:
    """Run the benchmarks on ``model``: every lm-eval metric, per-item scores, headline keys.

    One ``lm_eval.simple_evaluate`` call per chat-template group, seeded as lm-eval's command
    line (:data:`LM_EVAL_SEEDS`). Responses are cached per model content (``cfg.cache``, in
    ``cache_root('lm_eval')``); lm-eval's full per-sample logs go to ``cfg.samples_dir``. Under
    a distributed launch only rank 0 gets results; the others return an empty measurement.
    """
    import polars as pl

    model = resolve_model(model, local_only=local_only, where="model")  # cheap checks first
    resolved = resolve_tasks(specs, where=where, allow_code=cfg.allow_code)
    prepare_ifeval()
    warn_truncation(resolved.load, cfg.max_gen_toks)

    from lm_eval.tasks import TaskManager

    settings = (
        cfg.dtype,
        cfg.device,
        cfg.apply_chat_template,
        cfg.shots(),
        cfg.limit,
        cfg.gen_cap(),
        *([cfg.backend] if cfg.backend != "hf" else []),  # hf: the keys of earlier caches
        *([json.dumps(cfg.model_args, sort_keys=True)] if cfg.model_args else []),
    )
    fp = model_fingerprint(model, *settings)
    use_cache = request_dir = None
    if cfg.cache:
        root = cache_root("lm_eval")
        use_cache = str(root / "responses" / fp)
        request_dir = root / "requests" / f"{fp}-{resolved.fingerprint}"
    manager = None if resolved.needs_registry else TaskManager(include_defaults=False)
    section = where.split(".", 1)[0]
    with _torch_threads(cfg.threads):
        results = _simple_evaluate(
            model, resolved, cfg, manager, use_cache, request_dir, section=section
        )
    if results is None:  # only on non-zero ranks in distributed runs
        return Measurement({}, pl.DataFrame(schema=_schema()))
    if cfg.samples_dir is not None:
        _write_samples(Path(cfg.samples_dir), results.get("samples") or {})
    metrics: dict[str, dict[str, Any]] = {}
    for bench, spec in specs.items():
        task = resolved.names[bench]
        task_result = results["results"].get(task)
        if task_result is None or spec.result_key not in task_result:
            have = sorted(k for k in (task_result or {}) if "," in k and "stderr" not in k)
            raise KarmaError(
                f"task {task!r} did not produce metric {spec.metric!r}",
                file=where,
                field=f"{bench}.metric",
                value=spec.metric,
                expected=", ".join(have) or "none",
            )
        metrics[bench] = flatten_metrics(task_result)
    samples = sample_frame(results, resolved)
    intervals = metric_intervals(results, resolved)
    for bench, spec in specs.items():
        metrics[bench].update(intervals.get(bench, {}))
        metrics[bench].update(_headline(samples, bench, metrics[bench].get(spec.flat_metric)))
    return Measurement(metrics, samples)


def _schema() -> dict[str, Any]:
    import polars as pl

    return {name: getattr(pl, kind) for name, kind in SAMPLE_SCHEMA.items()}


def _leaves(name: str, groups: Mapping[str, list[str]]) -> list[str]:
    """The tasks under a group (recursively), or ``[name]`` for a task."""
    subs = groups.get(name) or []
    return [leaf for sub in subs for leaf in _leaves(sub, groups)] if subs else [name]


def sample_frame(results: Mapping[str, Any], resolved: Resolved) -> Any:
    """Per-item scores of each benchmark's metric from lm-eval's logged samples, sorted by
    benchmark (suite order), task and doc id (:data:`SAMPLE_SCHEMA`)."""
    import polars as pl

    samples = results.get("samples") or {}
    groups = results.get("group_subtasks") or {}
    rows: list[dict[str, Any]] = []
    for order, (bench, spec) in enumerate(resolved.specs.items()):
        metric, _, filt = spec.result_key.partition(",")
        skipped = 0
        for task in _leaves(resolved.names[bench], groups):
            for s in samples.get(task) or []:
                if str(s.get("filter", "none")) != filt:
                    continue
                value = s.get(metric)
                if not isinstance(value, (bool, int, float)):
                    skipped += 1
                    continue
                resps, filtered = s.get("resps") or [[]], s.get("filtered_resps") or []
                first = resps[0][0] if resps and resps[0] else None
                rows.append(
                    {
                        "_order": order,
                        "benchmark": bench,
                        "item": f"{task}/{s['doc_id']}",
                        "task": task,
                        "task_doc_id": int(s["doc_id"]),
                        "score": float(value),
                        "target": str(s.get("target")),
                        "response": first if isinstance(first, str) else None,
                        "extracted": (
                            filtered[0]
                            if filt != "none" and filtered and isinstance(filtered[0], str)
                            else None
                        ),
                    }
                )
        if skipped:
            log.warning("%s: metric %s has no per-item value (%d items)", bench, metric, skipped)
    schema = {"_order": pl.Int64, **_schema()}
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return frame.sort("_order", "task", "task_doc_id").drop("_order")


def metric_intervals(results: Mapping[str, Any], resolved: Resolved) -> dict[str, dict[str, Any]]:
    """``<metric>_stderr``, ``<metric>_ci_low``, ``<metric>_ci_high`` (95%) of every metric of
    every benchmark, from lm-eval's per-item values. Instruction-level IFEval metrics average
    over the instructions, as lm-eval does, with a cluster-robust interval (instructions cluster
    in prompts: :func:`karma.core.stats.cluster_mean_ci`). Flat metric names (``acc``,
    ``exact_match_custom-extract``)."""
    from karma.core.stats import cluster_mean_ci, mean_ci

    samples = results.get("samples") or {}
    groups = results.get("group_subtasks") or {}
    out: dict[str, dict[str, Any]] = {}
    for bench in resolved.specs:
        values: dict[str, list[list[float]]] = {}  # per metric: one cluster per item
        for task in _leaves(resolved.names[bench], groups):
            for s in samples.get(task) or []:
                for metric in s.get("metrics") or []:
                    value = s.get(metric)
                    items = value if isinstance(value, list) else [value]
                    if items and all(isinstance(v, (bool, int, float)) for v in items):
                        key = flat_key(f"{metric},{s.get('filter', 'none')}")
                        values.setdefault(key, []).append([float(v) for v in items])
        row: dict[str, Any] = {}
        for key, clusters in sorted(values.items()):
            if not clusters:
                continue
            clustered = any(len(c) > 1 for c in clusters)  # IFEval's instruction-level metrics
            est = cluster_mean_ci(clusters) if clustered else mean_ci([c[0] for c in clusters])
            for name, v in (("stderr", est.se), ("ci_low", est.ci_low), ("ci_high", est.ci_high)):
                row[f"{key}_{name}"] = round(v, 6) if math.isfinite(v) else None
        out[bench] = row
    return out


def _headline(samples: Any, bench: str, reported: float | None) -> dict[str, Any]:
    """``score``, 95% interval, standard error and n of a benchmark from its per-item scores."""
    from karma.core.stats import estimate

    scores = samples.filter(samples["benchmark"] == bench)["score"].to_numpy()
    if scores.size == 0:
        return {}
    out = estimate(scores)
    if reported is not None and out["score"] is not None and abs(out["score"] - reported) > 1e-6:
        log.warning(
            "%s: mean of the per-item scores %.6f differs from lm-eval's %.6f (a weighted "
            "aggregate?)",
            bench,
            out["score"],
            reported,
        )
    return out


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _simple_evaluate(
    model: str,
    resolved: Resolved,
    cfg: RunConfig,
    manager: Any,
    use_cache: str | None,
    request_dir: Path | None,
    *,
    section: str = "evaluate",
) -> dict[str, Any] | None:
    import lm_eval

    lm = load_lm(model, cfg, section=section)
    cap = cfg.gen_cap()
    gen_kwargs = {"max_gen_toks": cap} if cap else None
    log.info("evaluating %s on %s", model, ", ".join(resolved.names.values()))
    merged: dict[str, Any] | None = None
    for tasks, chat in chat_groups(resolved.load, cfg.apply_chat_template):
        with _request_cache(request_dir):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                num_fewshot=cfg.shots(),
                limit=cfg.limit,
                use_cache=use_cache,
                cache_requests=request_dir is not None,
                bootstrap_iters=cfg.bootstrap_iters,
                log_samples=True,
                apply_chat_template=chat,
                gen_kwargs=gen_kwargs,
                **LM_EVAL_SEEDS,
            )
        if results is None:  # a non-zero rank: it takes part in every group's run
            continue
        if merged is None:
            merged = results
        else:
            merged["results"].update(results["results"])
            merged.setdefault("samples", {}).update(results.get("samples") or {})
            merged.setdefault("group_subtasks", {}).update(results.get("group_subtasks") or {})
    return merged


def chat_groups(tasks: list[Any], mode: bool | str) -> list[tuple[list[Any], bool]]:
    """Split tasks by whether the chat template applies (``mode``: true, false, "generative").

    ``generative``: only generation tasks (local configs with ``output_type: generate_until``,
    and every lm-eval registry task) are prompted through the chat template; log-likelihood
    tasks score the raw ``Question ... Answer:`` prompt, as lm-eval's MMLU/ARC/HellaSwag do.
    """
    if mode != "generative":
        return [(tasks, bool(mode))]
    chat = [
        t for t in tasks if not isinstance(t, Mapping) or t.get("output_type") == "generate_until"
    ]
    plain = [t for t in tasks if not any(t is c for c in chat)]
    return [(group, flag) for group, flag in ((chat, True), (plain, False)) if group]


def _write_samples(directory: Path, samples: Mapping[str, list[dict]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
        (directory / f"{task}.jsonl").write_text(text)
    log.info("per-sample logs in %s", directory)


def _where(section: str, cfg: RunConfig) -> str:
    """Where the benchmark map came from, for error messages."""
    return f"{section}.tasks" if cfg.tasks else f"{section}.suite={cfg.suite}"


def measure(model: str, cfg: RunConfig, *, section: str, local_only: bool = False) -> Measurement:
    """Run ``cfg``'s benchmark map on ``model`` (errors name ``section``'s settings)."""
    return run_tasks(model, cfg.task_map(), cfg, local_only=local_only, where=_where(section, cfg))


def benchmark_model(model: str, cfg: RunConfig, *, name: str | None = None) -> dict[str, Any]:
    """One flat score row: ``{"model": name, benchmark: score, ..., "meta.protocol": ...}``
    (lm-eval's fractions; ``meta.*`` keys say how they were measured)."""
    return model_row(measure(model, cfg, section="benchmark"), cfg, name or model)


def model_row(result: Measurement, cfg: RunConfig, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for bench, spec in cfg.task_map().items():
        row[bench] = result.metrics[bench][spec.flat_metric]
    return {**row, **run_meta(cfg, result)}


def evaluate_model(model: str, cfg: RunConfig) -> dict[str, Any]:
    """Every flat metric of every benchmark, keyed ``<benchmark>.<metric>`` (``arc_easy.acc``),
    plus each benchmark's ``score``, ``ci_low``, ``ci_high``, ``stderr`` and ``n``.

    ``model`` must be a local model directory.
    """
    return measure(model, cfg, section="evaluate", local_only=True).flat()


def run_meta(cfg: RunConfig, result: Measurement) -> dict[str, Any]:
    """``meta.suite``, ``meta.protocol`` and ``meta.items.<bench>`` of a run."""
    meta: dict[str, Any] = {
        "meta.suite": "custom" if cfg.tasks else cfg.suite,
        "meta.protocol": cfg.protocol_name(),
    }
    for bench in cfg.task_map():
        n = result.metrics.get(bench, {}).get("n")
        if n is not None:
            meta[f"meta.items.{bench}"] = n
    return meta
