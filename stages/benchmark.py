"""DVC stage ``benchmark`` (one instance per ``benchmark.measured`` entry): run lm-eval on one
origin model and write its flat score row (lm-eval's fractions) to ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

from karma.cli import run_stage
from karma.config import from_dict, load_params, section
from karma.io import write_json


def main(name: str, model: str, out: Path) -> None:
    from karma.evaluation import BenchmarkConfig, benchmark_model

    where = "params.yaml:benchmark"
    cfg = from_dict(BenchmarkConfig, section(load_params(), "benchmark"), where=where)
    cfg.measured_model(name)  # the name must be listed in params
    write_json(out, benchmark_model(model, cfg.tasks(), cfg, name=name))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", required=True, help="hub id or local model directory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path("data/benchmark/measured") / f"{args.name}.json"
    run_stage(main, args.name, args.model, out)
