"""DVC stages ``evaluate_base`` and ``evaluate``: lm-eval on the base model / the trained policy.

``--which base`` writes the base model's flat metrics (``arc_easy.acc``, ...) to ``--out``;
``--which policy`` evaluates the policy and writes ``base.*``, ``policy.*`` and ``delta.*`` keys
to the metrics file that ``dvc metrics diff`` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from karma.cli import run_stage
from karma.config import from_dict, load_params, section
from karma.errors import KarmaError
from karma.io import write_json


def main(which: str, model: str, out: Path, base: Path) -> None:
    from karma.evaluation import EvaluateConfig, compare_metrics, evaluate_model

    cfg = from_dict(
        EvaluateConfig, section(load_params(), "evaluate"), where="params.yaml:evaluate"
    )
    metrics = evaluate_model(model, cfg.tasks(), cfg)
    if which == "base":
        write_json(out, metrics)
        return
    if not base.is_file():
        raise KarmaError("base metrics not found (run the evaluate_base stage)", file=base)
    write_json(out, compare_metrics(json.loads(base.read_text()), metrics))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--which", choices=["base", "policy"], required=True)
    parser.add_argument("--model", default=None, help="default: models/<which>")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--base", type=Path, default=Path("data/eval/base.json"))
    args = parser.parse_args()
    model = args.model or f"models/{args.which}"
    out = args.out or Path("data/eval/base.json" if args.which == "base" else "metrics/eval.json")
    run_stage(main, args.which, model, out, args.base)
