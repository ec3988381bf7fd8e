"""Stage ``tau_sweep``: what the kinship threshold does, over a grid of tau.

For each tau and each KARMA strategy, the diagnostics of
:class:`karma.pairing.stream.PairStream`
(share of instructions whose pair differs from the no-threshold pair, share dropped, overlap
between the strategies, mean kinship and |S_pref gap| of the pairs used vs the pool), over the
completions or over every K-model draw of the score table (:func:`all_draws`: the paper's
table itself, whatever dataset it is applied to). One search takes milliseconds, so a grid of
41 taus over three strategies is cheap.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from karma.core.errors import KarmaError
from karma.core.stage import Stage, input_path, output_path
from karma.pairing.kernel import KEPT
from karma.pairing.pool import (
    Pool,
    Prepared,
    load_kinship_dir,
    pair_model_counts,
    pool_counts,
    pool_stats,
    prepare,
    round6,
    search,
    used_stats,
)
from karma.pairing.strategies import KARMA_STRATEGIES
from karma.pairing.ultrafeedback import UltraFeedback
from karma.pairing.writers import write_table

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)


class SweepTally:
    """Integer tallies of the sweep, added batch by batch (the table does not depend on the
    batching, and memory does not grow with the data)."""

    def __init__(self, pool: Pool, taus: Sequence[float]) -> None:
        self.pool, self.taus = pool, list(taus)
        m1 = pool.m + 1
        self.n = 0
        self.pool_counts = np.zeros((pool.m, pool.m), dtype=np.int64)
        keys = [(t, s) for t in self.taus for s in KARMA_STRATEGIES]
        self.ints = {k: {"pairs": 0, "changed": 0, "dropped": 0} for k in keys}
        self.same = {(t, s, o): 0 for t, s in keys for o in KARMA_STRATEGIES}
        self.used = {k: np.zeros((m1, m1), dtype=np.int64) for k in keys}

    def add(self, prep: Prepared, *, seed: int, rating: str, pool: str) -> None:
        kw = {"seed": seed, "rating": rating, "pool": pool}
        self.n += prep.n
        self.pool_counts += pool_counts(prep)
        base = {s: search(prep, s, tau=-math.inf, **kw) for s in KARMA_STRATEGIES}
        for tau in self.taus:
            found = {s: search(prep, s, tau=tau, **kw) for s in KARMA_STRATEGIES}
            for s, (c, r, reason) in found.items():
                c0, r0, reason0 = base[s]
                kept = reason == KEPT
                t = self.ints[(tau, s)]
                t["pairs"] += int(kept.sum())
                t["changed"] += int(((c != c0) | (r != r0)).sum())
                t["dropped"] += int((~kept & (reason0 == KEPT)).sum())
                self.used[(tau, s)] += pair_model_counts(prep, c, r)
                for o, (co, ro, _) in found.items():
                    self.same[(tau, s, o)] += int((kept & (co == c) & (ro == r)).sum())

    def table(self) -> pl.DataFrame:
        """One row per (tau, strategy)."""
        summary = pool_stats(self.pool, self.pool_counts)
        n = max(self.n, 1)
        rows = []
        for (tau, s), t in self.ints.items():
            used = used_stats(self.pool, self.used[(tau, s)])
            row: dict[str, Any] = {
                "tau": float(tau),
                "strategy": s,
                "pairs": t["pairs"],
                "changed_by_tau": round6(t["changed"] / n),
                "dropped_by_tau": round6(t["dropped"] / n),
                "mean_kinship": used["mean_kinship"],
                "mean_abs_s_pref_gap": used["mean_abs_s_pref_gap"],
            }
            for o in KARMA_STRATEGIES:
                same = self.same[(tau, s, o)]
                row[f"overlap_{o}"] = round6(same / t["pairs"]) if t["pairs"] else None
            row["pool_mean_kinship"] = summary["mean_kinship"]
            row["pool_mean_abs_s_pref_gap"] = summary["mean_abs_s_pref_gap"]
            row["pool_spearman_kinship_gap"] = summary["spearman_kinship_gap"]
            rows.append(row)
        schema = {"tau": pl.Float64, "strategy": pl.String, "pairs": pl.Int64}
        schema.update({k: pl.Float64 for k in rows[0] if k not in schema})
        return pl.DataFrame(rows, schema=schema, orient="row")


def sweep_table(
    prep: Prepared,
    taus: Sequence[float],
    *,
    seed: int,
    rating: str = "overall_score",
    pool: str = "scored",
) -> pl.DataFrame:
    """The diagnostics of every KARMA strategy at every tau (in memory: one batch)."""
    tally = SweepTally(prep.pool, taus)
    tally.add(prep, seed=seed, rating=rating, pool=pool)
    return tally.table()


def all_draws(models: Sequence[str], k: int, extra: Sequence[str] = ()) -> UltraFeedback:
    """Every ``k``-model draw of ``models`` + ``extra`` as one instruction each (the paper's
    table: each of the C(17, 4) = 2,380 four-model draws of UltraFeedback's models), so that the
    diagnostics describe the score table itself rather than a dataset."""
    from karma.pairing.ultrafeedback import from_records

    pool = sorted(dict.fromkeys([*models, *extra]))
    if len(pool) < k:
        raise KarmaError("fewer models than a draw", field="sweep.draws", value=k,
                         expected=f"at most {len(pool)} (the models of the pool)")  # fmt: skip
    records = (
        (f"draw {i}", {"instruction": f"draw {i}: {', '.join(combo)}",
                       "completions": [{"model": m, "response": m} for m in combo]})
        for i, combo in enumerate(itertools.combinations(pool, k))
    )  # fmt: skip
    return from_records(records, file="draws")


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, kw_only=True)
class SweepPaths:
    """Paths of the ``tau_sweep`` stage."""

    kinship_dir: Path = input_path("the kinship stage's output directory", is_dir=True)
    out: Path = output_path("the table: one row per (tau, strategy)", ".csv", ".parquet")
    plot: Path | None = output_path("the figures against tau", ".png", required=False)


def run_sweep(params: Params, paths: SweepPaths) -> dict[str, Any]:
    """Stage ``tau_sweep``: the diagnostics of the KARMA strategies over ``sweep.taus``."""
    from tqdm.auto import tqdm

    from karma.pairing.batching import count_records
    from karma.pairing.figures import tau_sweep_plot
    from karma.pairing.source import source_info
    from karma.pairing.ultrafeedback import iter_ultrafeedback

    cfg, sw = params.preferences, params.sweep
    models, kinship = load_kinship_dir(paths.kinship_dir)
    pool = Pool.of(models.select("model", "s_pref"), kinship)
    if sw.draws is not None:
        scored = models.filter(pl.col("s_pref").is_not_null())["model"].to_list()
        batches: Any = [all_draws(scored, sw.draws, sw.extra_models)]
        what = f"every {sw.draws}-model draw of {len(scored) + len(sw.extra_models)} models"
        total = None
    else:
        batches = iter_ultrafeedback(cfg.dataset, split=cfg.split, batch_records=cfg.batch_records)
        what = source_info(cfg.dataset)["dataset"]
        total = count_records(cfg.dataset)
    taus = sorted({*sw.taus, params.similarity.tau})
    tally = SweepTally(pool, taus)
    bar = tqdm(total=total, desc="tau sweep", unit="instr", mininterval=10,
               disable=not total or total < 10**6)  # fmt: skip
    for data in batches:
        prep = prepare(data, pool, aliases=cfg.aliases)
        tally.add(prep, seed=params.seed, rating=cfg.rating, pool=cfg.baseline_pool)
        bar.update(prep.n)
    bar.close()
    table = tally.table()
    out = Path(paths.out)
    if out.suffix == ".csv":
        table.write_csv(out, float_precision=6)
    else:
        write_table(table.to_arrow(compat_level=pl.CompatLevel.oldest()), out)
    if paths.plot is not None:
        tau_sweep_plot(table, paths.plot, title=f"Kinship threshold sweep over {what}",
                       tau=params.similarity.tau)  # fmt: skip
    at = table.filter(pl.col("tau") == params.similarity.tau)
    metrics: dict[str, Any] = {"instructions": tally.n, "taus": len(taus)}
    for row in at.iter_rows(named=True):
        metrics[f"{row['strategy']}.changed_by_tau"] = row["changed_by_tau"]
    for s in KARMA_STRATEGIES:  # the smallest tau that changes any pair
        binds = table.filter((pl.col("strategy") == s) & (pl.col("changed_by_tau") > 0))
        metrics[f"{s}.binds_from_tau"] = (
            float(binds["tau"].min()) if binds.height else None  # type: ignore[arg-type]
        )
    log.info("tau sweep over %s: %s", what, json.dumps(metrics))
    return metrics


STAGE = Stage(
    name="tau_sweep",
    settings=(
        "seed",
        "similarity.tau",
        "preferences.dataset",
        "preferences.split",
        "preferences.rating",
        "preferences.aliases",
        "preferences.baseline_pool",
        "preferences.batch_records",
        "sweep",
    ),
    paths=SweepPaths,
    run=run_sweep,
    inputs=("preferences.dataset",),
    help="Sweep the kinship threshold: for each tau of sweep.taus and each KARMA strategy, the "
    "share of instructions whose pair differs from the no-threshold pair, the share dropped, "
    "the overlap between strategies and the mean kinship / |S_pref gap| of the pairs used vs the "
    "pool; over the completions, or (sweep.draws) over every K-model draw of the score table.",
)
