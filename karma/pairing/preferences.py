"""Stage ``preferences``: preference pairs per instruction, KARMA kinship-aware pairing and the
baselines, streamed batch by batch.

The package, by step: :mod:`~karma.pairing.strategies` (the strategy table and rules),
:mod:`~karma.pairing.kernel` (the Numba search), :mod:`~karma.pairing.reference` (the
plain-Python rules), :mod:`~karma.pairing.pool` (models, batches, search, statistics),
:mod:`~karma.pairing.split` (prompt hashes, the train/test split), :mod:`~karma.pairing.stream`
(:class:`~karma.pairing.stream.PairStream`), :mod:`~karma.pairing.layouts` and
:mod:`~karma.pairing.writers` (the files), :mod:`~karma.pairing.card` (the dataset card).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karma.core.errors import KarmaError
from karma.core.stage import Stage, input_path, output_path
from karma.pairing.source import source_info

if TYPE_CHECKING:
    from karma.pairing.stream import PreferenceResult
    from karma.params import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PreferencesPaths:
    """Paths of the ``preferences`` stage (the completions are ``preferences.dataset``)."""

    kinship_dir: Path = input_path("the kinship stage's output directory", is_dir=True)
    out: Path = output_path(
        "train_prefs.parquet, test_prefs.parquet, dev_prefs.parquet + README.md (dataset card)",
        is_dir=True,
    )
    metrics: Path | None = output_path("flat metrics", ".json", required=False)
    plot: Path | None = output_path("model-pair heatmap", ".png", required=False)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage-collector passes until the block ends (then as before). The passes over the
    imported modules' objects (numba, polars, pydantic) and the many objects that loading the
    Numba kernels makes took a fifth of the stage's time; the stage itself makes few cyclic
    objects, and its large buffers are freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NoBar:
    """What :func:`progress_bar` returns below a million records."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None) -> Any:
    """A progress bar over ``total`` instructions from a million on (tqdm, imported only
    then), else one that shows nothing."""
    if not total or total < 10**6:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="preferences", unit="instr", mininterval=10)


def run_preferences(params: Params, paths: PreferencesPaths) -> dict[str, Any]:
    """Stage ``preferences``: stream the completions batch by batch, pair them, write the splits
    as they come, then the card and the metrics (memory does not grow with the data). The
    pairing modules (Numba, polars, pyarrow) are imported here, with the collector paused."""
    with gc_paused():
        result, order = _pair_and_write(params, paths)
        return _card_and_metrics(params, paths, result, order)


def _pair_and_write(params: Params, paths: PreferencesPaths) -> tuple[PreferenceResult, list[str]]:
    """Pair every batch and write both splits; the :class:`PreferenceResult` and the models in
    the score table's order (the heatmap's)."""
    from karma.pairing.batching import count_records
    from karma.pairing.kernel import REASONS
    from karma.pairing.pool import Pool, load_kinship_dir
    from karma.pairing.stream import PairStream, diagnostic_stride, warm_kernels_in_background
    from karma.pairing.ultrafeedback import iter_ultrafeedback
    from karma.pairing.writers import SplitWriter

    cfg = params.preferences
    warm = warm_kernels_in_background()
    models, kinship = load_kinship_dir(paths.kinship_dir)
    total = count_records(cfg.dataset)
    stream = PairStream(
        Pool.of(models.select("model", "s_pref"), kinship),
        strategy=params.kinship,
        tau=params.similarity.tau,
        seed=params.seed,
        rating=cfg.rating,
        aliases=cfg.aliases,
        baseline_pool=cfg.baseline_pool,
        test_fraction=cfg.test_fraction,
        dev_fraction=cfg.dev_fraction,
        diag_stride=diagnostic_stride(total, cfg.diagnostics_sample),
    )
    writer = SplitWriter(Path(paths.out), cfg.layout)
    bar = progress_bar(total)
    try:
        batches = iter_ultrafeedback(cfg.dataset, split=cfg.split, batch_records=cfg.batch_records)
        for batch in batches:
            writer.write(*stream.add(batch))
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
        warm.join()
    result = stream.result()
    if result.counts["pairs"] == 0:
        c = result.counts
        drops = ", ".join(f"{r} {c[f'drop_{r}']}" for r in REASONS[1:] if c[f"drop_{r}"])
        raise KarmaError(
            f"no preference pair: every instruction was dropped ({drops})",
            file=cfg.dataset,
            field="kinship",
            value=params.kinship,
            expected=f"a strategy and tau ({params.similarity.tau}) that pair some responses",
        )
    return result, models["model"].to_list()


def _card_and_metrics(
    params: Params, paths: PreferencesPaths, result: PreferenceResult, order: list[str]
) -> dict[str, Any]:
    """Write the dataset card, the metrics and the heatmap; the metrics."""
    from karma.core.io import write_json
    from karma.pairing.card import dataset_card, summary
    from karma.pairing.figures import pair_usage_heatmap

    cfg = params.preferences
    metrics = {
        **result.metrics,
        "meta.seed": params.seed,
        "meta.kinship": params.kinship,
        "meta.test_fraction": cfg.test_fraction,
        "meta.dev_fraction": cfg.dev_fraction,
        "meta.layout": cfg.layout,
    }
    result = dataclasses.replace(result, metrics=metrics)
    card_params = {
        "kinship": params.kinship,
        "seed": params.seed,
        "similarity.tau": params.similarity.tau,
        "preferences.rating": cfg.rating,
        "preferences.dataset": cfg.dataset,
        "preferences.baseline_pool": cfg.baseline_pool,
        "preferences.layout": cfg.layout,
        "preferences.test_fraction": cfg.test_fraction,
        "preferences.dev_fraction": cfg.dev_fraction,
    }
    info = source_info(cfg.dataset)
    card = dataset_card(result, dataset=cfg.dataset, params=card_params, layout=cfg.layout,
                        license=info["license"], source=info.get("described"))  # fmt: skip
    (Path(paths.out) / "README.md").write_text(card)
    if paths.metrics is not None:
        write_json(paths.metrics, metrics)
    if paths.plot is not None:
        title = f"Model pairs used by '{params.kinship}'"
        pair_usage_heatmap(result.model_pairs, paths.plot, order=order, title=title)
    log.info("%s", summary(result))
    return metrics


STAGE = Stage(
    name="preferences",
    settings=("kinship", "seed", "similarity.tau", "preferences"),
    paths=PreferencesPaths,
    run=run_preferences,
    inputs=("preferences.dataset",),
    help="Per instruction, pair two responses of kin models (kinship >= tau) and choose the one "
    "whose model has the higher S_pref (KARMA), or binarise by rating (rlaif), or pair at "
    "random; train_prefs/dev_prefs/test_prefs split by prompt, in TRL's conversational layout "
    "or H4's, with metadata columns and what the kinship threshold did (diag.* metrics, the card).",
    exit_fast=True,
)
