"""Where this process stands among a stage's processes, and how a stage launches several.

One helper for every stage that runs data-parallel (training, benchmarking, evaluation):
the rank and world size a launcher (``torchrun``, ``accelerate launch``) gives each process,
whether this one is the main process (the one that writes outputs), and the command prefix
that runs a stage's own command line under a launcher.

>>> " ".join(torchrun_argv(2)[1:])
'-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 --max_restarts 0'
>>> world_size({}), rank({"RANK": "3"}), is_main({"RANK": "3"})
(1, 3, False)
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from karma.core.errors import KarmaError

__all__ = ["Ranks", "accelerate_argv", "is_main", "rank", "torchrun_argv", "world_size"]
T = TypeVar("T")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes launched together (``WORLD_SIZE``; 1 when not launched)."""
    return int(_env(env).get("WORLD_SIZE", "1"))


def rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (``RANK``; 0 when not launched)."""
    return int(_env(env).get("RANK", "0"))


def is_main(env: Mapping[str, str] | None = None) -> bool:
    """Rank 0, or no launcher: the process that prepares and writes a stage's outputs."""
    return rank(env) == 0


def torchrun_argv(processes: int) -> list[str]:
    """``python -m torch.distributed.run`` on this machine: ``processes`` workers, a free
    rendezvous port (``--standalone``), no restarts; the same on CPU (gloo) and GPU (NCCL)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(processes), "--max_restarts", "0"]  # fmt: skip


def accelerate_argv(processes: int, config_file: str | None = None) -> list[str]:
    """``accelerate launch``: with ``config_file`` that file decides the distributed setup
    (FSDP, DeepSpeed); without one, several processes get ``--multi_gpu`` on a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    n = str(processes)
    if config_file:
        return [*cmd, "--config_file", config_file, "--num_processes", n]
    if processes > 1:
        return [*cmd, "--num_processes", n, "--num_machines", "1", "--multi_gpu",
                "--main_process_port", "0"]  # fmt: skip
    return [*cmd, "--num_processes", n]


@dataclass
class Ranks:
    """This process among the launched processes, with a process group joined when there are
    several (:meth:`start`): barriers, main-only work whose result every process receives."""

    world: int = 1
    rank: int = 0
    state: Any = None  # accelerate's PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, field: str = "launcher") -> Ranks:
        """Join the process group (gloo on CPU, NCCL on GPU) when launched with several."""
        world = world_size()
        if world == 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes != world:
            raise KarmaError(
                f"launched {world} processes but accelerate sees {state.num_processes} "
                f"({state.distributed_type})",
                field=field,
            )
        return cls(world, state.process_index, state)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main process only while the others wait; all get its result.

        An error on the main process is raised there and ends the others quietly (exit 1).
        """
        result: Any = None
        error: BaseException | None = None
        if self.main:
            try:
                result = fn()
            except Exception as err:
                error = err
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [(result, error is not None)]
            broadcast_object_list(box, from_process=0)
            result, failed = box[0]
            if failed and not self.main:
                raise SystemExit(1)
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Leave the process group (after whatever holds it, a DDP model, is freed)."""
        if self.world > 1:
            import torch.distributed as dist

            gc.collect()
            self.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()
