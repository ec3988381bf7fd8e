"""Resumable runs: the fingerprint of what a checkpoint depends on, the checkpoint directory,
and the training curves (dvclive) and final metrics of TRL's log history.

Checkpoints go to ``<checkpoints>/<fingerprint>/checkpoint-<step>``; the fingerprint hashes
the method, TRL args, LoRA, seed, the process count, the data file and the base model, so a
changed input never resumes from a stale checkpoint, and a killed run resumes from its last
complete checkpoint (every process's RNG state written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from karma.core.io import tree_digest, write_json
from karma.training.settings import TrainConfig

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "karma_fingerprint.json"

# Metric names (as TRL logs them) written to the dvclive curves.
CURVE_SKIP = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_tokens_per_second",
    "train_loss",
    "total_flos",
    "num_input_tokens_seen",
    "num_tokens",
)


def fingerprint(cfg: TrainConfig, paths: Any, seed: int, *, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint depends on: training settings, seed, process count (checkpoints hold
    per-process RNG state), data and base model contents."""
    settings = {
        "method": cfg.method,
        "global_batch_size": cfg.global_batch_size,
        "trl": cfg.trl,
        "method_args": cfg.method_args(),
        "lora": cfg.lora,
        "dtype": cfg.dtype,
        "seed": seed,
        "world_size": world_size,
        "data": tree_digest(paths.data, memo=True),
        "base": tree_digest(paths.base, memo=True),
    }
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    settings["id"] = hashlib.sha256(blob).hexdigest()[:16]
    return settings


def last_checkpoint(run_dir: str | Path, world_size: int = 1) -> Path | None:
    """Newest complete ``checkpoint-<step>``: its ``trainer_state.json`` (the main process
    writes it last) and, under several processes, every process's ``rng_state_<rank>.pth``
    (the others write theirs without waiting for each other)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    rng = [f"rng_state_{r}.pth" for r in range(world_size)] if world_size > 1 else []
    done = []
    for c in d.glob("checkpoint-*"):
        step = c.name.split("-")[-1]
        files = ["trainer_state.json", *rng]
        if c.is_dir() and step.isdigit() and all((c / f).is_file() for f in files):
            done.append((int(step), c))
    return max(done)[1] if done else None


def prepare_run_dir(
    root: str | Path, fp: dict[str, Any], world_size: int = 1
) -> tuple[Path, Path | None]:
    """Return ``(run_dir, checkpoint to resume or None)``. Stale runs under ``root`` stay until
    this run has saved its first checkpoint (:func:`drop_stale`): a run that fails first (a bad
    setting, a crash while loading) loses nothing.

    Under several processes only the main one calls this
    (:meth:`karma.core.distributed.Ranks.on_main`).
    """
    root = Path(root)
    run_dir = root / fp["id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FINGERPRINT_FILE, fp)
    return run_dir, last_checkpoint(run_dir, world_size)


def drop_stale(run_dir: str | Path) -> None:
    """Remove the other runs' checkpoints beside ``run_dir`` (inputs or params changed)."""
    run_dir = Path(run_dir)
    with contextlib.suppress(OSError):
        for child in run_dir.parent.iterdir():
            if child != run_dir:
                log.info("removing stale checkpoints %s (inputs or params changed)", child)
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def drop_stale_callback(run_dir: Path) -> Any:
    """A callback: :func:`drop_stale` once the main process has saved a checkpoint."""
    from transformers import TrainerCallback

    class DropStale(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                drop_stale(run_dir)

    return DropStale()


def curve_callback(live_dir: str | Path) -> Any:
    """A TrainerCallback writing each logged scalar to dvclive at ``step = global_step``.

    Only the curves (``<live_dir>/plots/metrics/*.tsv``, no timestamps) are written; the final
    metrics go to the stage's own flat JSON.

    On resume, the restored ``log_history`` is replayed first, so the curves are complete.
    """
    from transformers import TrainerCallback

    from dvclive import Live

    class LiveCurves(TrainerCallback):
        def __init__(self) -> None:
            self.live: Any = None
            self.replayed = False

        def _write(self, entry: dict[str, Any]) -> None:
            step = entry.get("step")
            if step is None:
                return
            for key, value in entry.items():
                if key in ("step", "epoch") or key in CURVE_SKIP:
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.live.step = int(step)
                    self.live.log_metric(key, float(value))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if self.live is None:
                self.live = Live(
                    str(live_dir),
                    dvcyaml=False,
                    save_dvc_exp=False,
                    report=None,
                    resume=False,
                )
            if not self.replayed:
                self.replayed = True
                for entry in state.log_history[:-1]:
                    self._write(entry)
            self._write({**logs, "step": state.global_step})

    return LiveCurves()


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Last logged value of each training scalar; ``rewards/margins`` -> ``rewards_margins``."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("step", "epoch") or key in CURVE_SKIP:
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key.replace("/", "_")] = float(value)
    return out
