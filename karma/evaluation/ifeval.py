"""IFEval scoring that does not depend on the process's random state.

A few IFEval checks draw from Python's global ``random`` when an item's arguments are missing
or unusable (``keywords:letter_frequency`` with a non-letter, as item 1122 of google/IFEval),
and the language checks use langdetect, which is unseeded by default. lm-eval seeds the global
state once per run, so such an item's score depends on what ran since (modules imported after
seeding: a fresh ``lm_eval run`` process imports nltk there, a long-lived one does not) and on
how items are split over processes. Here each item is scored from a state seeded by the item's
key, so the score is the same in any process, order or process count, and the same when lm-eval's
command line runs the same task YAML; the global state is restored afterwards.
"""

from __future__ import annotations

import random
from typing import Any


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval's IFEval ``process_results`` with per-item seeding (see the module docstring)."""
    from langdetect import DetectorFactory
    from lm_eval.tasks.ifeval.utils import process_results as score

    DetectorFactory.seed = 0
    state = random.getstate()
    random.seed(f"karma-ifeval:{doc.get('key', doc.get('prompt'))}")
    try:
        return score(doc, results)
    finally:
        random.setstate(state)
