"""``karma train``: train a policy with TRL (DPO or SFT) outside DVC.

The training settings come from a params file's ``train`` section (default ``params.yaml``);
``--method`` and ``--set`` override them. Examples::

    karma train --data data/selected/pairs.parquet --base models/base --out out/policy
    karma train --method sft --set trl.max_steps=20 --set dpo.beta=0.2 --out out/sft
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from karma.errors import KarmaError


def _apply_set(section: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise KarmaError("--set expects key=value", value=assignment)
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = section
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KarmaError("not a mapping", field=part, value=child)
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


@click.command(name="train")
@click.option(
    "--params",
    "params_file",
    type=click.Path(path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="Params file whose 'train' section (and top-level 'seed') are used.",
)
@click.option("--method", type=click.Choice(["dpo", "sft"]), default=None, help="Override.")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a train param, e.g. trl.max_steps=20 (repeatable).",
)
@click.option("--seed", type=int, default=None, help="Override the top-level seed.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=Path("data/selected/pairs.parquet"),
    show_default=True,
)
@click.option(
    "--base", type=click.Path(path_type=Path), default=Path("models/base"), show_default=True
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("models/policy"), show_default=True
)
@click.option(
    "--checkpoints",
    type=click.Path(path_type=Path),
    default=Path("checkpoints/train"),
    show_default=True,
)
@click.option(
    "--live-dir",
    type=click.Path(path_type=Path),
    default=Path("dvclive/train"),
    show_default=True,
)
@click.option(
    "--metrics",
    type=click.Path(path_type=Path),
    default=Path("metrics/train.json"),
    show_default=True,
)
def command(
    params_file: Path,
    method: str | None,
    assignments: tuple[str, ...],
    seed: int | None,
    data: Path,
    base: Path,
    out: Path,
    checkpoints: Path,
    live_dir: Path,
    metrics: Path,
) -> None:
    """Train a policy on preference pairs (DPO with a reference model, or SFT on chosen)."""
    from karma.config import load_params, section
    from karma.training import TrainPaths, config_from_params, run_training

    params = load_params(params_file) if params_file.is_file() else {}
    train = dict(section(params, "train", file=params_file))
    if method:
        train["method"] = method
    for assignment in assignments:
        _apply_set(train, assignment)
    cfg = config_from_params(train)
    if cfg.launcher != "python":
        raise KarmaError(
            "karma train runs in-process; for accelerate use the DVC stage or "
            "`accelerate launch stages/train.py`",
            field="train.launcher",
            value=cfg.launcher,
        )
    paths = TrainPaths(
        data=data, base=base, out=out, checkpoints=checkpoints, live_dir=live_dir, metrics=metrics
    )
    result = run_training(cfg, paths, seed=params.get("seed", 0) if seed is None else seed)
    click.echo(json.dumps(result, indent=2, sort_keys=True))
