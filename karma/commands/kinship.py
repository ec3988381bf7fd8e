"""``karma kinship``: S_pref ranking, kinship matrix and global kin pairs of a benchmark table."""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl

from karma.errors import KarmaError
from karma.kinship import METRICS, KinshipResult


def _parse_aliases(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise KarmaError("bad alias", field="--alias", value=item, expected="ALIAS=MODEL")
        out[alias.strip()] = target.strip()
    return out


def summary(result: KinshipResult, top: int = 10) -> str:
    """A readable plain-text summary: S_pref ranking, global kin pairs, closest kin pairs."""
    lines = [
        f"{result.stats['n_models']} models x {len(result.benchmarks)} benchmarks "
        f"({', '.join(result.benchmarks)}); similarity={result.metric}, tau={result.tau:g}, "
        f"mode={result.mode}",
    ]
    if result.dropped:
        lines.append(f"dropped constant benchmarks: {', '.join(result.dropped)}")
    lines.append("")
    lines.append("S_pref ranking:")
    ranking = result.models.select("model", "s_pref").head(max(top, 20)).rows()
    width = max(len(m) for m, _ in ranking)
    for rank, (model, s) in enumerate(ranking, 1):
        shown = "   n/a" if s is None else f"{s:.4f}"
        lines.append(f"  {rank:>3}. {model:<{width}}  {shown}")
    if result.models.height > len(ranking):
        lines.append(f"  ... {result.models.height - len(ranking)} more")
    lines.append("")
    lines.append(f"global kin pairs (kinship >= {result.tau:g}; higher S_pref first):")
    for key in ("score", "sim", "score_sim"):
        a, b = result.pairs[key]
        lines.append(f"  {key:<10} {a} > {b}")
    lines.append("")
    rank = {m: i for i, m in enumerate(result.names)}
    kin = (
        result.kinship.with_columns(
            pl.col("model_a").replace_strict(rank, return_dtype=pl.Int64).alias("_ra"),
            pl.col("model_b").replace_strict(rank, return_dtype=pl.Int64).alias("_rb"),
        )
        .filter(pl.col("_ra") < pl.col("_rb"))
        .drop_nulls("kinship")
        .sort(["kinship", "_ra", "_rb"], descending=[True, False, False])
        .select("model_a", "model_b", "kinship")
    )
    lines.append(
        f"top kin pairs ({result.stats['n_kin_pairs']} kin of "
        f"{result.stats['n_pairs_defined']} defined pairs):"
    )
    for a, b, v in kin.head(top).rows():
        lines.append(f"  {v:.4f}  {a} ~ {b}")
    return "\n".join(lines)


@click.command(name="kinship")
@click.argument("scores", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--similarity",
    type=click.Choice(METRICS),
    default="cosine",
    show_default=True,
    help="Kinship measure of normalised benchmark vectors.",
)
@click.option("--tau", type=float, default=0.1, show_default=True, help="Kin when kinship >= tau.")
@click.option(
    "--min-common",
    type=int,
    default=2,
    show_default=True,
    help="Fewer benchmarks shared by a pair -> kinship undefined.",
)
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    metavar="ALIAS=MODEL",
    help="Model id alias (case-insensitive); repeatable.",
)
@click.option(
    "--dense-max-models",
    type=int,
    default=2000,
    show_default=True,
    help="Above this pool size write each model's top-k kin instead of the full matrix.",
)
@click.option("--top-k", type=int, default=50, show_default=True, help="Kin kept per model.")
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also draw the figures (heatmap, PCA, dendrograms) into this directory.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory: models.parquet, kinship.parquet, pairs.json.",
)
def command(
    scores: Path,
    similarity: str,
    tau: float,
    min_common: int,
    aliases: tuple[str, ...],
    dense_max_models: int,
    top_k: int,
    plots_dir: Path | None,
    out_dir: Path,
) -> None:
    """Kinship matrix, S_pref and global kin pairs from a benchmark table SCORES.

    \b
    SCORES: CSV / Parquet / JSON, wide (model + one column per benchmark) or long
    (model, benchmark, score). Example:
      karma kinship data/origin/scores.csv --similarity cosine --tau 0.1 --out out/kinship
    """
    from karma.kinship import DEFAULT_GROUPS, compute_kinship, write_kinship
    from karma.scores import read_scores

    frame = read_scores(scores, _parse_aliases(aliases))
    result = compute_kinship(
        frame,
        similarity=similarity,
        tau=tau,
        min_common=min_common,
        dense_max_models=dense_max_models,
        top_k=top_k,
    )
    write_kinship(result, out_dir)
    click.echo(summary(result))
    click.echo(f"\nwrote {out_dir}/models.parquet, kinship.parquet, pairs.json")
    if plots_dir is not None:
        from karma.plots import kinship_figures

        written = kinship_figures(result, plots_dir, groups=DEFAULT_GROUPS)
        click.echo(f"figures: {', '.join(str(p) for p in written)}")
