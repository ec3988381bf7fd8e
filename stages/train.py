"""DVC stage ``train``: train a policy on the selected pairs with TRL (DPO or SFT).

Reads ``data/selected/pairs.parquet`` and ``models/base``; writes ``models/policy`` (safetensors,
tokenizer, README.md model card), ``metrics/train.json`` and the dvclive curves in
``dvclive/train``. Checkpoints live in the persisted ``checkpoints/train``: a killed run resumes.
With ``train.launcher: accelerate`` the script re-runs itself under ``accelerate launch``.
"""

from __future__ import annotations

import sys

from karma.cli import run_stage
from karma.config import load_params, section
from karma.errors import KarmaError
from karma.training import TrainPaths, config_from_params, relaunch_if_needed, run_training

PATHS = TrainPaths(
    data="data/selected/pairs.parquet",
    base="models/base",
    out="models/policy",
    checkpoints="checkpoints/train",
    live_dir="dvclive/train",
    metrics="metrics/train.json",
)


def main() -> None:
    params = load_params()
    config = config_from_params(section(params, "train"))
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise KarmaError("wrong type", file="params.yaml", field="seed", value=seed, expected="int")
    if relaunch_if_needed(config, [__file__, *sys.argv[1:]]):
        return
    run_training(config, PATHS, seed=seed)


if __name__ == "__main__":
    run_stage(main)
