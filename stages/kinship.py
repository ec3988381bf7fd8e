"""DVC stage `kinship`: benchmark table -> S_pref, kinship, global kin pairs, figures, metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from karma.cli import run_stage
from karma.config import from_dict, load_params, section
from karma.io import atomic_path, write_json


def main(scores: Path, out: Path, plots: Path, metrics: Path) -> None:
    from karma.kinship import SimilarityConfig, compute_kinship, write_kinship
    from karma.scores import read_scores

    cfg = from_dict(
        SimilarityConfig, section(load_params(), "similarity"), where="params.yaml:similarity"
    )
    result = compute_kinship(
        read_scores(scores, cfg.aliases),
        similarity=cfg.metric,
        tau=cfg.tau,
        min_common=cfg.min_common,
        dense_max_models=cfg.dense_max_models,
        top_k=cfg.top_k,
    )
    write_kinship(result, out)
    with atomic_path(plots, is_dir=True) as tmp:
        if cfg.plots:
            from karma.plots import kinship_figures

            kinship_figures(result, tmp, groups=cfg.groups, threshold=cfg.cluster_threshold)
    mean = result.stats["mean_kinship"]
    write_json(
        metrics,
        {
            "n_models": result.stats["n_models"],
            "n_benchmarks": result.stats["n_benchmarks"],
            "n_dropped_benchmarks": result.stats["n_dropped_benchmarks"],
            "n_kin_pairs": result.stats["n_kin_pairs"],
            "kin_fraction": round(
                result.stats["n_kin_pairs"] / max(result.stats["n_pairs_defined"], 1), 6
            ),
            "mean_kinship": None if mean is None else round(mean, 6),
            "pair_score": " > ".join(result.pairs["score"]),
            "pair_sim": " > ".join(result.pairs["sim"]),
            "pair_score_sim": " > ".join(result.pairs["score_sim"]),
        },
    )
    from karma.commands.kinship import summary

    print(summary(result, top=5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scores", type=Path, default=Path("data/benchmark/scores.csv"))
    parser.add_argument("--out", type=Path, default=Path("data/kinship"))
    parser.add_argument("--plots", type=Path, default=Path("plots/kinship"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/kinship.json"))
    args = parser.parse_args()
    run_stage(main, args.scores, args.out, args.plots, args.metrics)
