"""What kinship agrees with: per pairing strategy, how often the instance rating (the judge's,
or UltraFeedback's) prefers the response the strategy chose, with a Wilson interval.

Only decisive pairs count (both responses rated, ratings differ); ties are reported apart. The
``preferences`` stage tallies every strategy on the same completions (:class:`AgreementTally`)
and writes ``agreement.<strategy>.{agree,lo,hi,n,ties}`` to ``metrics/preferences.json``;
:func:`agreement_rows` turns those keys back into a table for the report.

>>> wilson(8, 10)
(0.4902, 0.9433)
>>> t = AgreementTally()
>>> t.add_diffs("score", [1.0, 2.0, -1.0, 0.0])
>>> t.metrics()["agreement.score.agree"], t.metrics()["agreement.score.ties"]
(0.666667, 1)
>>> agreement_rows(t.metrics())[0]["strategy"]
'score'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

PREFIX = "agreement."


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default)."""
    if n <= 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


class AgreementTally:
    """Exact counts per strategy: decisive pairs, pairs the rating agrees with, ties."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # strategy -> [agree, decisive, ties]

    def add_diffs(self, strategy: str, diffs: Iterable[float]) -> None:
        """Rating(chosen) - rating(rejected) of one batch's pairs (NaN: a side unrated)."""
        d = np.asarray(list(diffs) if not isinstance(diffs, np.ndarray) else diffs, dtype=float)
        d = d[~np.isnan(d)]
        c = self.counts.setdefault(strategy, [0, 0, 0])
        c[0] += int((d > 0).sum())
        c[1] += int((d != 0).sum())
        c[2] += int((d == 0).sum())

    def add(
        self, strategy: str, ratings: np.ndarray, chosen: np.ndarray, rejected: np.ndarray
    ) -> None:
        """Tally the pairs ``chosen[i] > rejected[i]`` (indices into ``ratings``; -1: no pair)."""
        kept = chosen >= 0
        self.add_diffs(strategy, ratings[chosen[kept]] - ratings[rejected[kept]])

    def metrics(self) -> dict[str, Any]:
        """Flat ``agreement.<strategy>.*`` keys, strategies in name order."""
        out: dict[str, Any] = {}
        for s in sorted(self.counts):
            agree, n, ties = self.counts[s]
            lo, hi = wilson(agree, n)
            out.update(
                {
                    f"{PREFIX}{s}.agree": round(agree / n, 6) if n else None,
                    f"{PREFIX}{s}.lo": lo,
                    f"{PREFIX}{s}.hi": hi,
                    f"{PREFIX}{s}.n": n,
                    f"{PREFIX}{s}.ties": ties,
                }
            )
        return out


def agreement_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{strategy, agree, lo, hi, n, ties}]`` from a metrics dict (for the report)."""
    names = sorted({k[len(PREFIX) :].rsplit(".", 1)[0] for k in metrics if k.startswith(PREFIX)})
    return [
        {
            "strategy": s,
            **{f: metrics.get(f"{PREFIX}{s}.{f}") for f in ("agree", "lo", "hi", "n", "ties")},
        }
        for s in names
    ]


def agreement_line(metrics: Mapping[str, Any]) -> str:
    """One Markdown line: each strategy's agreement with its interval."""
    parts = []
    for r in agreement_rows(metrics):
        if r["agree"] is None:
            parts.append(f"{r['strategy']} n/a")
        else:
            parts.append(
                f"{r['strategy']} {r['agree']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] (n={r['n']})"
            )
    return "Rating agrees with the chosen response: " + "; ".join(parts)
