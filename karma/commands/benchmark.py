"""``karma benchmark``: run lm-eval on one model and print (or write) its flat score row."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from karma.errors import KarmaError


def _task_overrides(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in values:
        bench, sep, rest = item.partition("=")
        task, sep2, metric = rest.rpartition(":")
        if not (sep and sep2 and bench.strip() and task.strip() and metric.strip()):
            raise KarmaError(
                "bad task",
                field="--task",
                value=item,
                expected="BENCHMARK=TASK:METRIC, e.g. arc_easy=arc_easy:acc_norm",
            )
        out[bench.strip()] = {"task": task.strip(), "metric": metric.strip()}
    return out


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """lm-eval run options shared by ``benchmark`` and ``evaluate``."""
    options = [
        click.option(
            "--suite",
            type=click.Choice(["embedded", "lm_eval"]),
            default="embedded",
            show_default=True,
            help="Benchmark map: the mini suites or lm-eval's tasks.",
        ),
        click.option(
            "--task",
            "tasks",
            multiple=True,
            metavar="BENCH=TASK:METRIC",
            help="Run these benchmarks instead of the suite's (repeatable). TASK: an "
            "lm-eval name, an embedded karma_* task or a task YAML path.",
        ),
        click.option("--limit", type=int, default=None, help="Items per task (default: all)."),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--dtype", default="float32", show_default=True),
        click.option(
            "--max-gen-toks",
            type=int,
            default=None,
            help="Cap generated tokens (default: each task's own).",
        ),
        click.option(
            "--chat-template",
            type=click.Choice(["generative", "all", "none"]),
            default="generative",
            show_default=True,
            help="Prompt through the chat template: generation tasks only, all tasks, or none.",
        ),
        click.option(
            "--cache-dir",
            default=".cache/lm_eval",
            show_default=True,
            help="lm-eval request/response caches ('' disables).",
        ),
        click.option(
            "--samples-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Write per-sample logs (JSONL per task) here.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_config(cls: type, opts: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    """(config, benchmark map, where the map came from) from the shared run options."""
    from karma.evaluation import parse_task_map

    cfg = cls(
        suite=opts["suite"],
        batch_size=opts["batch_size"],
        device=opts["device"],
        dtype=opts["dtype"],
        apply_chat_template={"all": True, "none": False}.get(
            str(opts["chat_template"]), "generative"
        ),
        limit=opts["limit"],
        max_gen_toks=opts["max_gen_toks"],
        cache_dir=opts["cache_dir"] or None,
        samples_dir=str(opts["samples_dir"]) if opts["samples_dir"] else None,
    )
    if opts["tasks"]:
        return cfg, parse_task_map(_task_overrides(opts["tasks"]), where="--task"), "--task"
    return cfg, cfg.tasks(), f"--suite {cfg.suite}"


@click.command()
@click.argument("model")
@click.option("--name", default=None, help="Model name in the row (default: MODEL).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the row as JSON here (default: print it).",
)
@run_options
def command(model: str, name: str | None, out: Path | None, **opts: object) -> None:
    """Benchmark MODEL (a hub id or a local model directory) with lm-eval.

    \b
    Example (the embedded mini suites, 20 items each):
      karma benchmark models/base --name smollm2 --limit 20
    The real tasks (GPU machine with hub access):
      karma benchmark HuggingFaceTB/SmolLM2-135M-Instruct --suite lm_eval --device cuda
    """
    from karma.evaluation import BenchmarkConfig, benchmark_model
    from karma.io import write_json

    cfg, tasks, where = build_config(BenchmarkConfig, opts)
    row = benchmark_model(model, tasks, cfg, name=name, where=where)
    if out is None:
        click.echo(json.dumps(row, indent=2, sort_keys=True))
    else:
        write_json(out, row)
        click.echo(f"wrote {out}")
