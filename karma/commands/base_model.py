"""``karma base-model``: build a base-model directory outside DVC.

Example::

    karma base-model --source embedded:smollm2-135m-instruct --out models/base
    karma base-model --source HuggingFaceTB/SmolLM2-360M-Instruct --out out/base
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(name="base-model")
@click.option(
    "--source",
    default="embedded:smollm2-135m-instruct",
    show_default=True,
    help="embedded:<name>, a hub id (org/name) or a local model directory.",
)
@click.option("--revision", default=None, help="Hub revision for hub ids.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--check-prompt",
    default="What is the capital of France?",
    show_default=True,
    help="Prompt answered greedily before the model is written.",
)
@click.option(
    "--check-expect",
    default="paris",
    show_default=True,
    help="Substring the answer must contain ('' accepts any non-empty answer).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("models/base"),
    show_default=True,
)
def command(
    source: str,
    revision: str | None,
    dtype: str,
    check_prompt: str,
    check_expect: str,
    out_dir: Path,
) -> None:
    """Build the base model: safetensors + tokenizer (chat template), checked by one generation."""
    from karma.base_model import BaseModelConfig, build_base_model

    cfg = BaseModelConfig(
        source=source,
        revision=revision,
        dtype=dtype,  # type: ignore[arg-type]
        check_prompt=check_prompt,
        check_expect=check_expect or None,
    )
    summary = build_base_model(cfg, out_dir)
    click.echo(json.dumps(summary, indent=2, sort_keys=True))
