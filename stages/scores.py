"""DVC stage ``scores``: the reported table + the measured rows -> ``data/benchmark/scores.csv``,
the one table the kinship stage reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from karma.cli import run_stage
from karma.config import from_dict, load_params, section


def main(measured_dir: Path, out: Path) -> None:
    from karma.evaluation import BenchmarkConfig, merge_scores, read_measured
    from karma.scores import read_scores, write_scores

    params = load_params()
    cfg = from_dict(BenchmarkConfig, section(params, "benchmark"), where="params.yaml:benchmark")
    aliases = section(params, "similarity").get("aliases") or {}
    reported = read_scores(cfg.reported, aliases) if cfg.reported else None
    rows = [read_measured(measured_dir / f"{name}.json") for name in cfg.measured]
    write_scores(merge_scores(reported, rows, scale=cfg.scale, aliases=aliases), out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measured", type=Path, default=Path("data/benchmark/measured"))
    parser.add_argument("--out", type=Path, default=Path("data/benchmark/scores.csv"))
    args = parser.parse_args()
    run_stage(main, args.measured, args.out)
