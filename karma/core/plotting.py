"""Figures as PNG files (matplotlib, Agg backend, deterministic bytes: no timestamps/versions).

A module of functions; each takes data (frames, arrays) and an output path and returns the path.
Kinship figures: :func:`kinship_heatmap`, :func:`pca_scatter` (the KARMA paper's Figure 4),
:func:`dendrogram` (its Figure 7) and :func:`kinship_figures`, which draws all of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


log = logging.getLogger(__name__)

#: above this many models, figures drop per-model labels (heatmap, dendrograms are skipped)


MAX_LABELLED_MODELS = 120


_DPI = 150


PAIR_STYLE = {
    "score": ("#d62728", "-"),
    "sim": ("#1f77b4", "--"),
    "score_sim": ("#2ca02c", ":"),
}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"svg.hashsalt": "karma", "font.size": 9, "axes.titlesize": 11, "figure.dpi": _DPI}
    )
    return plt


def save_figure(fig: Figure, path: str | os.PathLike[str], *, tight: bool = True) -> Path:
    """Save ``fig`` as PNG with fixed metadata (byte-identical across runs)."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None}, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
