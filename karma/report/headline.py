"""Headline metrics: the few numbers a reviewer compares (``metrics/headline.json``).

Every stage writes its full flat metrics to ``diagnostics/<stage>.json`` (versioned outputs
that the report reads, not DVC metrics). This stage picks, from them, what ``dvc exp show`` and
``dvc metrics diff`` should show (at most ~40 keys for the default run):

* per benchmark (short names, :data:`SHORT`: ``mmlu``, ``mmlu_pro``, ``arc_e``, ``arc_c``,
  ``ifeval``, ``hswag``) ``<b>.score`` (the policy), ``<b>.delta`` (policy - base) with its
  95 % interval ``<b>.lo``/``<b>.hi`` and ``<b>.sig`` (1 when the Holm-adjusted p is below 0.05
  with at least 10 items, :func:`karma.core.stats.is_significant`);
* the same for ``total`` (the paper's Table 2 Total: 0-1 mean of MMLU, MMLU-Pro, ARC-E, ARC-C
  and IFEval; interval from the bootstrap of the Total itself);
* the held-out preference metrics after training (``heldout.*``; "before" is the reference
  against itself, a definition, so it is not a headline), and on the dev pairs, where recipes
  are chosen, the margin after training and the lower bound of its change (``dev.reward_margin``,
  ``dev.reward_margin.lo``: the rule of ``docs/recipe_choice.md``);
* ``pairs.made`` (preferences), ``pairs.kept`` (MAP selection), ``pairs.trained`` (distinct
  pairs the optimizer saw: ``min(kept, steps x global batch)``), ``mean_kinship`` (of the
  pairs made) and ``agreement`` (with ``agreement.lo``/``.hi``, Wilson 95 %): how often the
  instance rating (the judge's, or the dataset's) prefers the response the run's strategy chose.

Nothing here varies between identical reruns (timings are logged, never written).

>>> headline({"eval": {"policy.ifeval.score": 0.4, "delta.ifeval.score": 0.1,
...           "delta.ifeval.ci_low": -0.1, "delta.ifeval.ci_high": 0.3,
...           "delta.ifeval.significant": 0}})
{'ifeval.score': 0.4, 'ifeval.delta': 0.1, 'ifeval.lo': -0.1, 'ifeval.hi': 0.3, 'ifeval.sig': 0}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karma.core.io import read_json, write_json
from karma.core.settings import BENCHMARKS, TABLE2_BENCHMARKS
from karma.core.stage import Stage, input_path, output_path

log = logging.getLogger(__name__)

#: Diagnostics files a stage writes (``diagnostics/<name>.json``), in pipeline order.
DIAGNOSTICS = ("kinship", "preferences", "select", "train", "eval")
#: The order of benchmark columns: the paper's Table 2, then the others, then the Total.
COLUMN_ORDER = (*TABLE2_BENCHMARKS, *(b for b in BENCHMARKS if b not in TABLE2_BENCHMARKS))
#: The README's ``dvc exp show`` view (``--drop '.*' --keep VIEW``): legible at 200 columns.
EXP_SHOW_VIEW = r"Experiment|kinship|.*\.delta"
#: Decimals kept (0.1 point on a 0-1 score: finer than any interval here).
DIGITS = 4
#: Short column names for ``dvc exp show`` at 200 columns (others keep their own name).
SHORT = {
    "mmlu_stem": "mmlu",
    "mmlu_pro": "mmlu_pro",
    "arc_easy": "arc_e",
    "arc_challenge": "arc_c",
    "ifeval": "ifeval",
    "hellaswag": "hswag",
    "total": "total",
}
#: Held-out metrics shown after training (the objective's own; "before" is definitional).
HELDOUT = ("reward_accuracy", "reward_margin")
#: ``(headline key, train key)`` of the dev pairs' numbers recipes are compared on.
DEV_KEYS = (("dev.reward_margin", "dev.heldout.after.reward_margin"),
            ("dev.reward_margin.lo", "dev.heldout.delta.reward_margin.ci_low"))  # fmt: skip
#: ``(headline key, diagnostics file, key)`` of the data-side headline numbers.
DATA_KEYS = (
    ("pairs.made", "preferences", "pairs"),
    ("pairs.kept", "select", "pairs_kept"),
    ("mean_kinship", "preferences", "mean_kinship"),
)


def _num(value: Any) -> float | int | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if ok and value == value else None


def _bench_keys(ev: Mapping[str, Any]) -> dict[str, Any]:
    benches = {k.split(".")[1] for k in ev if k.startswith("delta.") and k.endswith(".score")}
    order = [b for b in (*COLUMN_ORDER, "total") if b in benches]
    order += sorted(benches - set(order))
    out: dict[str, Any] = {}
    for b in order:
        for name, key in (
            ("score", f"policy.{b}.score"),
            ("delta", f"delta.{b}.score"),
            ("lo", f"delta.{b}.ci_low"),
            ("hi", f"delta.{b}.ci_high"),
            ("sig", f"delta.{b}.significant"),
        ):
            if _num(value := ev.get(key)) is not None:
                out[f"{SHORT.get(b, b)}.{name}"] = round(value, DIGITS)
    return out


def trained_pairs(train: Mapping[str, Any], kept: float | None) -> int | None:
    """Distinct pairs the optimizer saw: ``steps x global batch``, at most the pairs given."""
    steps, batch = _num(train.get("steps")), _num(train.get("batch.global"))
    given = _num(train.get("pairs")) if kept is None else kept
    if steps is None or batch is None:
        return None
    seen = int(steps * batch)
    return seen if given is None else min(seen, int(given))


def _agreement(prefs: Mapping[str, Any]) -> dict[str, Any]:
    """``agreement`` (``.lo``, ``.hi``) of the run's strategy: the only one the stage tallies.

    >>> _agreement({"agreement.sim.agree": 0.6, "agreement.sim.lo": 0.4, "agreement.sim.hi": 0.8})
    {'agreement': 0.6, 'agreement.lo': 0.4, 'agreement.hi': 0.8}
    """
    found = sorted(k for k in prefs if k.startswith("agreement.") and k.endswith(".agree"))
    if len(found) != 1 or _num(prefs[found[0]]) is None:
        return {}
    stem = found[0].removesuffix(".agree")
    keys = {"agreement": f"{stem}.agree", **{f"agreement.{b}": f"{stem}.{b}" for b in ("lo", "hi")}}
    return {
        key: round(float(value), DIGITS)
        for key, src in keys.items()
        if (value := _num(prefs.get(src))) is not None
    }


def headline(diag: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The headline keys from the diagnostics ``{stage: flat metrics}`` (absent stages skipped)."""
    out = _bench_keys(diag.get("eval") or {})
    train = diag.get("train") or {}
    for m in HELDOUT:
        if _num(value := train.get(f"heldout.after.{m}")) is not None:
            out[f"heldout.{m}"] = round(float(value), DIGITS)
    for key, name in DEV_KEYS:
        if _num(value := train.get(name)) is not None:
            out[key] = round(float(value), DIGITS)
    for key, stage, name in DATA_KEYS:
        if _num(value := (diag.get(stage) or {}).get(name)) is not None:
            out[key] = round(value, DIGITS) if isinstance(value, float) else value
    out.update(_agreement(diag.get("preferences") or {}))
    if train and (n := trained_pairs(train, out.get("pairs.kept"))) is not None:
        out["pairs.trained"] = n
    return out


@dataclass(frozen=True, kw_only=True)
class HeadlinePaths:
    """Paths of the ``headline`` stage: the diagnostics directory in, the headline file out."""

    diagnostics: Path = input_path(
        "directory of the stages' diagnostics (<stage>.json: " + ", ".join(DIAGNOSTICS) + ")",
        is_dir=True,
    )
    out: Path = output_path("the headline metrics (a DVC metrics file)", ".json")


def read_diagnostics(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{stage: flat metrics}`` of the diagnostics files present in ``directory``."""
    directory = Path(directory)
    return {
        name: read_json(directory / f"{name}.json")
        for name in DIAGNOSTICS
        if (directory / f"{name}.json").is_file()
    }


def run_headline(params: Any, paths: HeadlinePaths) -> dict[str, Any]:
    """Stage ``headline``: ``metrics/headline.json`` from ``diagnostics/*.json``."""
    out = headline(read_diagnostics(paths.diagnostics))
    write_json(paths.out, out)
    log.info("%d headline metrics in %s", len(out), paths.out)
    return out


STAGE = Stage(
    name="headline",
    settings=(),
    paths=HeadlinePaths,
    run=run_headline,
    help="The few numbers a reviewer compares (dvc exp show / dvc metrics diff), picked from "
    "the stages' diagnostics: per benchmark the policy score and its paired delta with interval "
    "and significance (Holm), the paper's Total, held-out preference metrics, pairs.",
)
