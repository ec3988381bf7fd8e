"""``karma select``: MAP selection of preference pairs outside DVC.

Example::

    karma select data/preferences/pairs.parquet --model models/base --method map --ratio 0.4 \\
        --out out/selected --metrics out/select.json --plot out/margins.png
"""

from __future__ import annotations

from pathlib import Path

import click

from karma.potential import DEFAULT_CACHE_DIR, EXPLICIT_SOURCES, METHODS


@click.command(name="select")
@click.argument("pairs", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=Path("models/base"),
    show_default=True,
    help="Model that computes implicit margins (the policy if --reference).",
)
@click.option(
    "--reference",
    "reference_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Reference model: implicit margin in DPO form dpo_beta*log(pi/pi_ref).",
)
@click.option(
    "--dpo-beta",
    type=float,
    default=0.1,
    show_default=True,
    help="beta of the DPO-form implicit margin (with --reference).",
)
@click.option("--method", type=click.Choice(METHODS), default="map", show_default=True)
@click.option("--ratio", type=float, default=0.4, show_default=True, help="Fraction kept, (0, 1].")
@click.option(
    "--beta",
    type=float,
    default=1.0,
    show_default=True,
    help="Weight of z(|implicit margin|) in the MAP score.",
)
@click.option(
    "--explicit", type=click.Choice(EXPLICIT_SOURCES), default="s_pref_gap", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of method 'random'.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=2048, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for pairs.parquet (kept) and scores.parquet (all rows).",
)
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path(DEFAULT_CACHE_DIR),
    show_default=True,
)
@click.option("--no-cache", is_flag=True, help="Recompute implicit margins.")
def command(
    pairs: Path,
    model_dir: Path,
    reference_dir: Path | None,
    dpo_beta: float,
    method: str,
    ratio: float,
    beta: float,
    explicit: str,
    seed: int,
    batch_size: int,
    max_length: int,
    out_dir: Path,
    metrics_path: Path | None,
    plot_path: Path | None,
    cache_dir: Path,
    no_cache: bool,
) -> None:
    """Select preference pairs by alignment potential (MAP, arXiv 2503.01864)."""
    import json

    from karma.potential import SelectConfig, run_select

    config = SelectConfig(
        method=method,  # type: ignore[arg-type]
        ratio=ratio,
        beta=beta,
        explicit=explicit,  # type: ignore[arg-type]
        batch_size=batch_size,
        max_length=max_length,
        cache=not no_cache,
    )
    metrics = run_select(
        pairs,
        model_dir,
        out_dir,
        config,
        seed=seed,
        metrics_path=metrics_path,
        plot_path=plot_path,
        reference_dir=reference_dir,
        dpo_beta=dpo_beta,
        cache_dir=cache_dir,
    )
    click.echo(json.dumps(metrics, indent=2, sort_keys=True))
