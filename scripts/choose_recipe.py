"""Choose the CPU default training recipe on the dev pairs (never on the test pairs).

Runs the real ``karma`` CLI: ``preferences`` (train / dev / test split), ``select``,
``reference`` (the base model's log-probs, stored once) and one ``karma train`` per candidate
(learning rate x max_steps, every other setting from the params file) with ``--dev-data`` only:
the test pairs are not scored. The rule, fixed before any candidate ran: the highest lower
bound of the dev reward-margin change (``dev.heldout.delta.reward_margin.ci_low``); a tie goes
to fewer steps, then the lower learning rate. Writes ``grid.json`` and a Markdown table into
``--out``; ``docs/recipe_choice.md`` holds the committed run.

    python scripts/choose_recipe.py --out /tmp/recipe-grid
    python scripts/choose_recipe.py --out /tmp/g --steps 4,8,16   # a fuller grid
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("choose_recipe")
RULE = "dev.heldout.delta.reward_margin.ci_low"
SHOWN = ("reward_margin", "reward_accuracy", "loss")


def karma(*args: str) -> None:
    """Run one ``karma`` command (``python -m karma.cli``), failing loudly."""
    cmd = [sys.executable, "-m", "karma.cli", *args]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def prepare(out: Path, params: str, completions: str, kinship: str, base: str) -> Path:
    """The split, the selected train pairs and the stored reference log-probs; the prefs dir."""
    prefs, selected, ref = out / "preferences", out / "selected", out / "reference"
    if not (prefs / "dev_prefs.parquet").is_file():
        karma("preferences", "--params", params, "--dataset", completions,
              "--kinship-dir", kinship, "--out", str(prefs),
              "--metrics", str(out / "preferences.json"))  # fmt: skip
    if not (selected / "pairs.parquet").is_file():
        karma("select", "--params", params, "--pairs", str(prefs / "train_prefs.parquet"),
              "--model", base, "--out", str(selected))  # fmt: skip
    if not (ref / "meta.json").is_file():
        karma("reference", "--params", params, "-S", "train.reference=stored",
              "--data", str(selected / "pairs.parquet"),
              "--base", base, "--dev-data", str(prefs / "dev_prefs.parquet"),
              "--out", str(ref))  # fmt: skip
    return prefs


def run_candidate(out: Path, params: str, base: str, lr: float, steps: int) -> dict:
    """Train one candidate, scoring the dev pairs only; its metrics."""
    name = f"lr{lr:g}_steps{steps}"
    metrics = out / "runs" / f"{name}.json"
    if not metrics.is_file():
        t0 = time.perf_counter()
        karma("train", "--params", params, "--data", str(out / "selected/pairs.parquet"),
              "--base", base, "--dev-data", str(out / "preferences/dev_prefs.parquet"),
              "--reference-logps", str(out / "reference"), "-S", "train.reference=stored",
              "-S", f"train.trl.learning_rate={lr}", "-S", f"train.trl.max_steps={steps}",
              "--out", str(out / "policies" / name), "--checkpoints", str(out / "ck" / name),
              "--metrics", str(metrics))  # fmt: skip
        log.info("%s: %.0f s", name, time.perf_counter() - t0)
    m = json.loads(metrics.read_text())
    if any(k.startswith("heldout.") for k in m):
        raise SystemExit(f"{metrics}: test metrics present; the choice must not see them")
    return {"name": name, "learning_rate": lr, "max_steps": steps,
            **{k: v for k, v in m.items() if k.startswith("dev.heldout.")}}  # fmt: skip


def cell(row: dict, key: str) -> str:
    k = f"dev.heldout.{key}"
    return f"{row[k]:+.3f} [{row[k + '.ci_low']:+.3f}, {row[k + '.ci_high']:+.3f}]"


def table(rows: list[dict], chosen: str) -> str:
    """The Markdown table of the candidates (dev numbers, 95 % intervals)."""
    head = ("| learning rate | max_steps | Δ reward margin | reward accuracy after | "
            "loss after | dev pairs | |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['learning_rate']:g} | {r['max_steps']} | {cell(r, 'delta.reward_margin')} | "
            f"{cell(r, 'after.reward_accuracy')} | {cell(r, 'after.loss')} | "
            f"{r['dev.heldout.n']} | {'**chosen**' if r['name'] == chosen else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--completions", default="data/completions.parquet")
    ap.add_argument("--kinship-dir", default="data/kinship")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--lrs", default="2e-5,5e-5,1e-4")
    ap.add_argument("--steps", default="4")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out, args.params, args.completions, args.kinship_dir, args.base)
    grid = [(float(lr), int(s)) for s in args.steps.split(",") for lr in args.lrs.split(",")]
    rows = []
    for lr, steps in grid:
        rows.append(run_candidate(args.out, args.params, args.base, lr, steps))
        (args.out / "grid.json").write_text(json.dumps(rows, indent=2))
    best = max(rows, key=lambda r: (r[RULE], -r["max_steps"], -r["learning_rate"]))
    md = table(rows, best["name"])
    (args.out / "grid.md").write_text(md + "\n")
    print(md)
    print(f"chosen by {RULE}: learning_rate {best['learning_rate']:g}, "
          f"max_steps {best['max_steps']}")  # fmt: skip


if __name__ == "__main__":
    main()
