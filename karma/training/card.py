"""The policy's model card (README.md): method, data, params, final and held-out metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from karma.core.io import tree_digest
from karma.training.objectives import objective
from karma.training.settings import TrainConfig


def model_card(
    cfg: TrainConfig,
    paths: Any,
    *,
    seed: int,
    base_summary: str,
    n_pairs: int,
    metrics: dict[str, Any],
) -> str:
    """A short README.md for the policy directory (no timings: keeps it deterministic)."""
    method = objective(cfg.method).summary
    shown = {
        k: metrics[k]
        for k in ("loss", "train_loss", "rewards_accuracies", "rewards_margins", "steps", "epoch")
        if k in metrics
    }
    params = {
        "method": cfg.method,
        "global_batch_size": cfg.global_batch_size,
        "trl": cfg.trl,
        cfg.method: cfg.method_args(),
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "recipe": cfg.recipe,
        "seed": seed,
    }
    lines = [
        "---",
        "library_name: transformers",
        "tags: [karma, trl, " + cfg.method + "]",
        "---",
        "",
        f"# KARMA policy ({cfg.method.upper()})",
        "",
        f"- **Base model:** `{paths.base}` ({base_summary})",
        f"- **Data:** `{paths.data}` ({n_pairs} preference pairs, sha256 "
        f"`{tree_digest(paths.data, memo=True)[:16]}`)",
        f"- **Method:** {method}",
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=True).rstrip(),
        "```",
        "",
        "## Final training metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in shown.items()],
        "",
        *heldout_table(metrics),
        "Trained with the KARMA pipeline (arXiv 2502.18744).",
        "",
    ]
    return "\n".join(lines)


def heldout_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines of the held-out metrics (none without held-out data)."""
    if "heldout.n" not in metrics:
        return []
    after = [k for k in metrics if k.startswith("heldout.after.")]
    names = [k.split(".", 2)[2] for k in after if not k.endswith(("ci_low", "ci_high"))]

    def cell(key: str) -> str:
        low, high = metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"]
        return f"{metrics[key]:.4g} [{low:.4g}, {high:.4g}]"

    return [
        f"## Held-out preference metrics ({metrics['heldout.n']} pairs, 95 % intervals)",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
        *[
            f"| {m} | {cell(f'heldout.before.{m}')} | {cell(f'heldout.after.{m}')} | "
            f"{cell(f'heldout.delta.{m}')} |"
            for m in names
        ],
        "",
    ]


def base_summary(base: str | Path) -> str:
    try:
        conf = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown architecture"
    arch = ",".join(conf.get("architectures") or [conf.get("model_type", "?")])
    layers, hidden = conf.get("num_hidden_layers", "?"), conf.get("hidden_size", "?")
    return f"{arch}, {layers} layers, hidden {hidden}"
