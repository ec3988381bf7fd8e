"""Figures of the preferences and tau_sweep stages."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass


from karma.core.plotting import MAX_LABELLED_MODELS, PAIR_STYLE, pyplot, save_figure

log = logging.getLogger(__name__)


def tau_sweep_plot(
    table: Any, path: str | os.PathLike[str], *, title: str, tau: float | None = None
) -> Path:
    """The tau sweep (:func:`karma.pairing.tau_sweep.sweep_table`): per KARMA strategy, the share
    of
    instructions whose pair tau changed / dropped, and the mean kinship / |S_pref gap| of the
    pairs used against the whole candidate pool (dashed)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [
        ("changed_by_tau", "share of instructions whose pair changed\n(vs no threshold)", None),
        ("dropped_by_tau", "share of instructions dropped by tau\n(no kin pair)", None),
        ("mean_kinship", "mean kinship of the pairs used", "pool_mean_kinship"),
        ("mean_abs_s_pref_gap", "mean |S_pref gap| of the pairs used",
         "pool_mean_abs_s_pref_gap"),
    ]  # fmt: skip
    strategies = list(dict.fromkeys(table["strategy"].to_list()))
    for ax, (col, label, pool_col) in zip(axes.flat, panels, strict=True):
        for s in strategies:
            rows = table.filter(table["strategy"] == s)
            color, style = PAIR_STYLE.get(s, ("black", "-"))
            ax.plot(rows["tau"].to_numpy(), rows[col].cast(float).to_numpy(), color=color,
                    ls=style, lw=1.8, label=s, marker=".", ms=4)  # fmt: skip
        if pool_col is not None and table.height:
            ax.axhline(float(table[pool_col][0]), color="black", ls="--", lw=1,
                       label="every candidate pair")  # fmt: skip
        if tau is not None:
            ax.axvline(tau, color="#888888", ls=":", lw=1)
            ax.text(tau, 1.0, f" tau={tau:g}", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=7.5, color="#555555")  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("tau (two models are kin when kinship >= tau)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[1, 0].legend(loc="best", fontsize=8)
    rho = table["pool_spearman_kinship_gap"][0] if table.height else None
    fig.suptitle(f"{title}\nSpearman(kinship, |S_pref gap|) over the pool: "
                 f"{'n/a' if rho is None else f'{rho:.3f}'}")  # fmt: skip
    return save_figure(fig, path)


def pair_usage_heatmap(
    pairs: Mapping[tuple[str, str], int],
    path: str | os.PathLike[str],
    *,
    order: Sequence[str] | None = None,
    title: str = "Model pairs used",
) -> Path:
    """Heatmap of how often each (chosen model, rejected model) pair was used (preferences):
    ``pairs`` maps the pair to its count.

    ``order``: model order of both axes (e.g. by S_pref); models not in it are appended sorted.
    """
    plt = pyplot()
    seen = sorted({m for pair in pairs for m in pair})
    names = list(dict.fromkeys(order or []))  # every ordered model, so strategies compare
    names += [m for m in seen if m not in set(names)]
    index = {m: i for i, m in enumerate(names)}
    n = max(len(names), 1)
    counts = np.zeros((n, n), dtype=np.int64)
    for (c, r), k in pairs.items():
        counts[index[c], index[r]] += k
    total = int(counts.sum())
    size = min(4.0 + 0.38 * n, 30.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = np.ma.masked_where(counts == 0, counts)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#f4f4f4")
    im = ax.imshow(
        shown, cmap=cmap, vmin=0, vmax=max(int(counts.max()), 1), interpolation="nearest"
    )
    if len(names) <= MAX_LABELLED_MODELS:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(names)), names)
    if len(names) <= 24:
        top = max(int(counts.max()), 1)
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    txt = "white" if counts[i, j] > 0.6 * top else "black"
                    ax.text(
                        j, i, str(counts[i, j]), ha="center", va="center", fontsize=6.5, color=txt
                    )
    ax.set_xlabel("rejected model")
    ax.set_ylabel("chosen model")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("pairs")
    ax.set_title(f"{title} ({total} pairs)")
    return save_figure(fig, path)
