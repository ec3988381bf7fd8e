"""The evaluation stages: ``benchmark@<name>``, ``evaluate_base`` and ``evaluate``.

``benchmark`` writes one origin model's flat score row (+ per-item scores) for the kinship
stages; ``evaluate_base`` / ``evaluate`` write every flat metric of a model and, against the
base model's run, the paired comparison (:func:`karma.evaluation.metrics.compare_runs`). The
running lives in :mod:`karma.evaluation.lmeval`, task resolution in
:mod:`karma.evaluation.taskconfig`, the flat keys in :mod:`karma.evaluation.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karma.core import distributed
from karma.core.distributed import is_main
from karma.core.errors import KarmaError
from karma.core.io import read_json, write_json
from karma.core.stage import Stage, argument, input_path, output_path
from karma.evaluation.lmeval import measure, model_row, run_meta
from karma.evaluation.metrics import compare_runs, model_meta
from karma.evaluation.settings import EvaluateConfig

if TYPE_CHECKING:
    from karma.params import Params

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.parquet"


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


def write_frame(frame: Any, path: Path) -> None:
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
    if not is_main():
        return {}
    row = model_row(result, cfg, paths.name or model)
    if paths.out is not None:
        write_json(paths.out, row)
    if paths.samples is not None:
        write_frame(result.samples, paths.samples)
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
        write_frame(pl.DataFrame({"item": pl.Series([], dtype=pl.Int64)}), paths.samples)
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
    if not is_main():
        return {}
    own = {**result.flat(), **run_meta(cfg, result), **model_meta(paths.model)}
    if paths.out is not None:
        paths.out.mkdir(parents=True, exist_ok=True)
        write_json(paths.out / METRICS_FILE, own)
        write_frame(result.samples, paths.out / SAMPLES_FILE)
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
        return None if n <= 1 else distributed.torchrun_argv(n)

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
    name="evaluate",  # the evaluate command without a baseline (its outputs say "evaluate")
    settings=tuple(f"evaluate.{k}" for k in EvaluateConfig.model_fields if k not in PAIRED),
    paths=EvaluateBasePaths,
    run=run_evaluate,
    help=EVALUATE.help,
    launcher=launcher_prefix("evaluate"),
)
