"""``karma evaluate``: evaluate a base model and a policy with lm-eval; flat metrics + deltas."""

from __future__ import annotations

import json
from pathlib import Path

import click

from karma.commands.benchmark import build_config, run_options


@click.command()
@click.option("--base", "base", required=True, help="Base model directory.")
@click.option("--policy", "policy", default=None, help="Policy model directory (optional).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the flat metrics JSON here (default: print them).",
)
@run_options
def command(base: str, policy: str | None, out: Path | None, **opts: object) -> None:
    """Evaluate BASE (and POLICY) on the suite: keys like ``base.arc_easy.acc``,
    ``policy.arc_easy.acc`` and ``delta.arc_easy.acc``.

    \b
    Example:
      karma evaluate --base models/base --policy models/policy --limit 20
    """
    from karma.evaluation import EvaluateConfig, compare_metrics, evaluate_model
    from karma.io import write_json

    cfg, tasks, where = build_config(EvaluateConfig, opts)
    base_metrics = evaluate_model(base, tasks, cfg, where=where)
    if policy is None:
        metrics = {f"base.{k}": v for k, v in base_metrics.items()}
    else:
        metrics = compare_metrics(base_metrics, evaluate_model(policy, tasks, cfg, where=where))
    if out is None:
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        write_json(out, metrics)
        click.echo(f"wrote {out}")
