"""MMLU's STEM subjects and the item filter of the paper suite's MMLU-STEM task.

``karma_paper_hub_mmlu_stem`` (karma/evaluation/tasks/paper/hub) is one lm-eval task over the
``all`` configuration of ``cais/mmlu``, kept to the subjects of lm-eval's ``mmlu_stem`` group
(the per-subject tasks tagged ``mmlu_stem_tasks`` in ``lm_eval/tasks/mmlu/default``;
tests/test_paper_tasks.py reads that list from the installed package and compares). One task
gives one score key, and its mean over all items is the group's size-weighted aggregate.

>>> len(MMLU_STEM_SUBJECTS), MMLU_STEM_SUBJECTS[0], MMLU_STEM_SUBJECTS[-1]
(19, 'abstract_algebra', 'machine_learning')
"""

from __future__ import annotations

from typing import Any

#: lm-eval's mmlu_stem group (tag ``mmlu_stem_tasks``): the ``subject`` of each of its items.
MMLU_STEM_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_statistics",
    "machine_learning",
)


def is_stem(doc: dict[str, Any]) -> bool:
    """Whether an MMLU item (a row with ``subject``) belongs to lm-eval's mmlu_stem group."""
    return doc["subject"] in MMLU_STEM_SUBJECTS


def mmlu_stem_docs(dataset: Any) -> Any:
    """lm-eval ``process_docs``: the STEM items of a ``datasets.Dataset`` of MMLU rows, in order."""
    return dataset.filter(is_stem)
