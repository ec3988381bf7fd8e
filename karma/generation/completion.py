"""What every generation engine returns: :class:`Completion` rows (and the shared helpers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    """One generated completion (or a failed request)."""

    text: str
    tokens: int
    logprob_sum: float | None
    logprob_mean: float | None
    finish_reason: str  # stop | length | error
    status: str = "ok"  # ok | failed
    error: str | None = None


def failed(reason: str) -> Completion:
    """A row whose request failed after its retries."""
    return Completion("", 0, None, None, "error", status="failed", error=reason[:300])


def trim_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found.

    >>> trim_stop("Paris.\\nQ: next", ["\\nQ:"])
    ('Paris.', True)
    """
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
