"""MMLU-Pro's answer extraction, with its fallbacks, for the paper-protocol tasks.

MMLU-Pro's own evaluation scripts (TIGER-Lab/MMLU-Pro, ``evaluate_from_*.py``) take the letter
of the first ``answer is (X)``; failing that, of ``Answer: X``; failing that, the last standalone
option letter. lm-eval's ``mmlu_pro`` keeps only the first pattern. The paper adapted MMLU-Pro's
framework, so karma's paper tasks score with all three (filter ``custom-extract``) and keep the
strict pattern alone as a diagnostic (filter ``strict-extract``).

>>> [extract_answer(t) for t in ("so the answer is (C).", "Answer: B", "I pick D here", "none")]
['C', 'B', 'D', None]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

STRICT = re.compile(r"answer is \(?([A-J])\)?")
AGAIN = re.compile(r".*[aA]nswer:\s*([A-J])")
FINAL = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)
INVALID = "[invalid]"


def extract_answer(text: str) -> str | None:
    """The answer letter of a response as MMLU-Pro's scripts extract it, or None."""
    if (m := STRICT.search(text)) is not None:
        return m.group(1)
    if (m := AGAIN.search(text)) is not None:
        return m.group(1)
    if (m := FINAL.search(text)) is not None:
        return m.group(0)
    return None


def mmlu_pro_fallback(resps: Iterable[Sequence[str]], docs: Sequence[Any]) -> list[list[str]]:
    """lm-eval ``custom`` filter function: each response replaced by its extracted letter
    (``[invalid]`` when none), as lm-eval's regex filter marks a miss."""
    return [[extract_answer(r) or INVALID for r in rs] for rs in resps]
