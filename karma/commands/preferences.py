"""``karma preferences``: materialise a preference dataset outside DVC.

Example::

    karma preferences --scores data/origin/scores.csv \\
        --dataset data/demo/ultrafeedback_demo.jsonl --kinship sim --out out/pairs.parquet

Prints a one-paragraph summary; ``--card``, ``--metrics`` and ``--plot`` also write the dataset
card, the flat metrics JSON and the model-pair heatmap.
"""

from __future__ import annotations

from pathlib import Path

import click

STRATEGIES = ("score", "sim", "score_sim", "rlaif", "random")


@click.command(name="preferences")
@click.option(
    "--scores",
    "scores_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Benchmark table of the origin models (CSV/Parquet/JSON).",
)
@click.option(
    "--dataset",
    required=True,
    help="UltraFeedback-schema completions: .jsonl/.json/.parquet or a hub id.",
)
@click.option(
    "--kinship",
    "strategy",
    type=click.Choice(STRATEGIES),
    default="score",
    show_default=True,
    help="Pairing strategy.",
)
@click.option("--tau", type=float, default=0.1, show_default=True, help="Kin when kinship >= tau.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--similarity",
    default="cosine",
    show_default=True,
    help="Kinship metric: cosine | pearson | euclidean.",
)
@click.option("--min-common", type=int, default=2, show_default=True)
@click.option(
    "--rating",
    type=click.Choice(("overall_score", "fine_grained_score")),
    default="overall_score",
    show_default=True,
    help="Instance rating used by 'rlaif' and the agreement metric.",
)
@click.option("--split", default="train", show_default=True, help="Split, for hub ids.")
@click.option(
    "--out", "out_path", required=True, type=click.Path(path_type=Path), help="Output Parquet file."
)
@click.option(
    "--card",
    "card_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the dataset card (README.md) here.",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the flat metrics JSON here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the model-pair heatmap PNG here.",
)
def command(
    scores_path: Path,
    dataset: str,
    strategy: str,
    tau: float,
    seed: int,
    similarity: str,
    min_common: int,
    rating: str,
    split: str,
    out_path: Path,
    card_path: Path | None,
    metrics_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Pair responses per instruction (KARMA: score, sim, score_sim; baselines: rlaif, random)."""
    from karma import preferences as prefs

    prefs.check_args(strategy, tau, seed)
    models, kinship = prefs.kinship_from_scores(
        scores_path, similarity=similarity, tau=tau, min_common=min_common
    )
    result = prefs.run_preferences(
        dataset, models, kinship, strategy=strategy, tau=tau, seed=seed, rating=rating, split=split
    )
    params = {
        "kinship": strategy,
        "similarity.tau": tau,
        "seed": seed,
        "rating": rating,
        "similarity.metric": similarity,
        "scores": str(scores_path),
    }
    prefs.write_outputs(
        result,
        pairs_path=out_path,
        dataset=str(dataset),
        params=params,
        card_path=card_path,
        metrics_path=metrics_path,
        plot_path=plot_path,
        model_order=models["model"].to_list(),
    )
    click.echo(prefs.summary(result))
    click.echo(f"wrote {out_path}")
