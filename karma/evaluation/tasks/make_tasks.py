"""Regenerate the embedded mini task suites (``karma/evaluation/tasks/embedded/*.jsonl``).

The items are written by hand (facts) or computed (arithmetic) in one module per suite
(``mini_ifeval``, ``mini_mmlu``, ``mini_hellaswag``, ``mini_arc``), in the domain of the demo
preference data: verifiable instructions, formats, lengths, keywords, arithmetic, capitals and
simple science. Every answer is checked in ``tests/test_tasks.py``.

    python -m karma.evaluation.tasks.make_tasks
"""

from __future__ import annotations

import json
from pathlib import Path

from karma.evaluation.tasks.mini_arc import arc_challenge, arc_easy
from karma.evaluation.tasks.mini_hellaswag import hellaswag
from karma.evaluation.tasks.mini_ifeval import ifeval
from karma.evaluation.tasks.mini_mmlu import mmlu_pro, mmlu_stem

OUT = Path(__file__).resolve().parent / "embedded"


def suites() -> dict[str, list[dict]]:
    """Every suite's items, by file stem."""
    return {
        "ifeval": ifeval(),
        "mmlu_stem": mmlu_stem(),
        "mmlu_pro": mmlu_pro(),
        "hellaswag": hellaswag(),
        "arc_easy": arc_easy(),
        "arc_challenge": arc_challenge(),
    }


def render(rows: list[dict]) -> str:
    """JSONL text: sorted keys, one item per line."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def main(out: Path = OUT) -> None:
    """Write every suite's JSONL into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in suites().items():
        (out / f"{name}.jsonl").write_text(render(rows))
        print(f"{name}: {len(rows)} items")


if __name__ == "__main__":
    main()
