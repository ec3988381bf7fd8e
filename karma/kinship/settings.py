"""Settings of the stages scores and kinship."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from karma.core.settings import (
    DEFAULT_GROUPS,
    PAPER_SCALE,
    ClusterDistance,
    ClusterLinkage,
    Protocol,
    Section,
    Similarity,
    setting,
)
from karma.generation.settings import EMBEDDED_POOL, PoolModel

#: A measured model's name: a DVC stage key and a params key (no dot), never shell text.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class ScoresConfig(Section):
    """Stage ``scores``: the reported table plus the measured rows, one canonical table."""

    reported: str | None = setting(
        "data/origin/scores.csv", "scores reported elsewhere (the KARMA paper's table), or null"
    )
    measured: dict[
        Annotated[str, Field(pattern=_NAME)], Annotated[str, Field(min_length=1)] | PoolModel
    ] = setting(
        EMBEDDED_POOL,
        "the pool: {name: hub id or model dir, or a mapping (model, revision, "
        "chat_template, derive, modes, benchmark, generate)}: origin models benchmarked by "
        "lm-eval (benchmark@<name>); with completions: pool also generate@<name>",
    )
    scale: dict[str, Annotated[float, Field(gt=0)]] = setting(
        PAPER_SCALE, "factor from lm-eval's fractions to the reported table's unit, per benchmark"
    )
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = setting(
        {}, "{alias: canonical model id}, matched case-insensitively"
    )
    reported_protocol: Protocol = setting(
        "paper", "protocol of the reported table (the KARMA paper's: prompting, answer extraction)"
    )
    mix_protocols: bool = setting(
        False, "merge measured rows scored with another protocol than the reported table's"
    )


class SimilarityConfig(Section):
    """Stage ``kinship``: S_pref, the kinship matrix, global kin pairs and figures."""

    metric: Similarity = setting("cosine", "kinship measure of normalised benchmark vectors")
    tau: float = setting(0.1, "two models are kin when kinship >= tau", ge=-1, le=1)
    min_common: int = setting(2, "fewer shared benchmarks -> kinship undefined", ge=1)
    dense_max_models: int = setting(
        2000, "larger pools: write each model's top_k kin, not the full matrix", ge=2
    )
    top_k: int = setting(50, "kin kept per model above dense_max_models", ge=1)
    cluster_threshold: float = setting(
        0.4, "dendrograms: clusters joined below this distance get a colour", gt=0
    )
    cluster_distance: ClusterDistance = setting(
        "rms", "dendrogram distance of normalised score vectors (common benchmarks only): "
        "rms | euclidean | cityblock | cosine (1 - cos) | correlation (1 - r)"
    )  # fmt: skip
    cluster_linkage: ClusterLinkage = setting(
        "average", "dendrogram linkage (scipy.cluster.hierarchy.linkage method)"
    )
    pca_quadrant: Literal[1, 2, 3, 4] = setting(
        2, "PCA signs put the highest-S_pref model in this quadrant (the paper's Fig. 4: 2)"
    )
    groups: dict[str, Annotated[list[str], Field(min_length=1)]] = setting(
        DEFAULT_GROUPS, "capability groups of benchmarks: one dendrogram each"
    )
