"""What the kinship stage computes: one KinshipResult, read by its figures and clusters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl


@dataclass(frozen=True)
class KinshipResult:
    """Output of :func:`compute_kinship`.

    ``models``: ``model, s_pref, <normalised benchmarks>``, ranked (S_pref desc, then id).
    ``kinship``: ``model_a, model_b, kinship`` (null where undefined): every ordered pair
    a != b in dense mode; each model's ``top_k`` kin (kinship >= tau, best first) in top-k mode.
    ``pairs``: ``{"score"|"sim"|"score_sim": [higher S_pref model, other model]}``.
    ``matrix``: the (n, n) kinship matrix in ``models`` order (dense mode only, else None).
    """

    models: pl.DataFrame
    kinship: pl.DataFrame
    pairs: dict[str, list[str]]
    metric: str
    tau: float
    min_common: int
    mode: str
    benchmarks: list[str]
    dropped: list[str]
    stats: dict[str, Any]
    matrix: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        """Model ids in rank order (the order of ``models`` and ``matrix``)."""
        return self.models["model"].to_list()
