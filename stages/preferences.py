"""DVC stage ``preferences``: pair the completions of ``preferences.dataset`` per instruction.

Reads ``data/kinship/{models,kinship}.parquet`` and params ``kinship`` (strategy), ``seed``,
``similarity.tau`` and ``preferences``; writes ``data/preferences/{pairs.parquet,README.md}``,
``metrics/preferences.json`` and ``plots/preferences/pairs.png``.
"""

from __future__ import annotations

import logging

from karma.cli import run_stage
from karma.config import from_dict, load_params, section
from karma.errors import KarmaError
from karma.io import atomic_path, write_json
from karma.plots import pair_usage_heatmap
from karma.preferences import (
    PreferencesConfig,
    check_args,
    load_kinship_dir,
    run_preferences,
    summary,
    write_outputs,
)

log = logging.getLogger("stages.preferences")

KINSHIP_DIR = "data/kinship"
OUT_DIR = "data/preferences"
METRICS = "metrics/preferences.json"
PLOT = "plots/preferences/pairs.png"


def main() -> None:
    params = load_params()
    config = from_dict(
        PreferencesConfig, section(params, "preferences"), where="params.yaml:preferences"
    )
    strategy = params.get("kinship", "score")
    seed = params.get("seed", 0)
    tau = section(params, "similarity").get("tau", 0.1)
    try:
        check_args(strategy, tau, seed)
    except KarmaError as err:
        raise KarmaError(f"params.yaml: {err}") from None
    models, kinship = load_kinship_dir(KINSHIP_DIR)
    result = run_preferences(
        config.dataset,
        models,
        kinship,
        strategy=strategy,
        tau=tau,
        seed=seed,
        rating=config.rating,
        aliases=config.aliases,
        split=config.split,
    )
    card_params = {
        "kinship": strategy,
        "seed": seed,
        "similarity.tau": tau,
        "preferences.rating": config.rating,
        "preferences.dataset": config.dataset,
    }
    with atomic_path(OUT_DIR, is_dir=True) as tmp:
        write_outputs(
            result,
            pairs_path=tmp / "pairs.parquet",
            card_path=tmp / "README.md",
            dataset=config.dataset,
            params=card_params,
        )
    write_json(METRICS, result.metrics)
    pair_usage_heatmap(
        result.pairs["chosen_model"].to_list(),
        result.pairs["rejected_model"].to_list(),
        PLOT,
        order=models["model"].to_list(),
        title=f"Model pairs used by '{strategy}'",
    )
    log.info("%s", summary(result))


if __name__ == "__main__":
    run_stage(main)
