"""The select stage's figure: explicit vs implicit margins of the kept and dropped pairs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from karma.core.plotting import pyplot, save_figure

log = logging.getLogger(__name__)


def margins_scatter(
    scored: Any,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    explicit_label: str = "explicit margin",
) -> Path:
    """Explicit vs implicit margin of every pair (MAP's select stage), kept pairs highlighted."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    e, i = scored["margin_explicit"], scored["margin_implicit"]
    if scored.height and e.null_count() == 0 and i.null_count() == 0:
        kept = scored["kept"].to_numpy().astype(bool)
        x, y = e.to_numpy(), i.to_numpy()
        ax.scatter(x[~kept], y[~kept], s=14, c="#b0b0b0", label=f"dropped ({int((~kept).sum())})")
        ax.scatter(x[kept], y[kept], s=18, c="#d62728", label=f"kept ({int(kept.sum())})")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no implicit margins (select.method: none)", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel(explicit_label)
    ax.set_ylabel("implicit margin (mean logp chosen - rejected)")
    ax.set_title(title or "MAP selection", fontsize=10)
    return save_figure(fig, path, tight=False)
