"""DVC stage ``select``: rank preference pairs by alignment potential (MAP) and keep the top ratio.

Reads ``data/preferences/pairs.parquet`` and ``models/base``; writes ``data/selected/pairs.parquet``
(kept rows), ``data/selected/scores.parquet`` (every row, every score), ``metrics/select.json`` and
``plots/select/margins.png``. Implicit margins are cached in ``$KARMA_MARGIN_CACHE`` (default
``.cache/karma/margins``).
"""

from __future__ import annotations

import os

from karma.cli import run_stage
from karma.config import from_dict, load_params, section
from karma.errors import KarmaError
from karma.potential import DEFAULT_CACHE_DIR, SelectConfig, run_select

PAIRS = "data/preferences/pairs.parquet"
MODEL = "models/base"
OUT = "data/selected"
METRICS = "metrics/select.json"
PLOT = "plots/select/margins.png"


def main() -> None:
    params = load_params()
    config = from_dict(SelectConfig, section(params, "select"), where="params.yaml:select")
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise KarmaError("wrong type", file="params.yaml", field="seed", value=seed, expected="int")
    run_select(
        PAIRS,
        MODEL,
        OUT,
        config,
        seed=seed,
        metrics_path=METRICS,
        plot_path=PLOT,
        cache_dir=os.environ.get("KARMA_MARGIN_CACHE", DEFAULT_CACHE_DIR),
    )


if __name__ == "__main__":
    run_stage(main)
