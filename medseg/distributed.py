"""Multi-process training with torch DistributedDataParallel, launched by ``torchrun`` (or ``medseg train`` itself).

``train.processes`` is the switch: ``auto`` (one process per visible CUDA device, so one on a CPU or a single GPU)
or a number (on a CPU: gloo processes that share the cores, mainly for testing). ``medseg train`` with more than one
process re-runs itself under ``torch.distributed.run`` (torchrun) on this node; ``torchrun --nproc_per_node N -m
medseg.cli train ...`` works directly too. Each process (a *rank*) draws its own part of every global batch
(:class:`medseg.train.data.BatchLoader`), DDP averages the gradients, and rank 0 alone plans, validates, writes
checkpoints and logs to MLflow; the others follow its decisions (elapsed time for the schedule and the budget,
when to stop). A resumed run reads rank 0's ``last.pt`` in every rank, as a single process does.

Folds of a cross-validation are separate jobs, not ranks: each fold is its own Snakemake job that a cluster can place
on any free GPU (see ``configs/profiles``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (``world`` 1: no DDP)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: plans, validates, writes checkpoints and logs to MLflow."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (every rank gets the same number)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag``, in every rank."""
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Ranks()  # no DDP


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> Ranks:
    """The ranks torchrun set up in this process's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on a CPU); returns the ranks and this rank's
    device (``cuda:<local rank>``). Without torchrun: one rank, the device unchanged."""
    ranks = launched()
    if not ranks.active:
        return ranks, device
    _die_with_parent()
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # a long timeout: rank 0 validates and writes checkpoints while the others wait at the next collective
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    log.info("rank %d of %d (local rank %d) on %s", ranks.rank, ranks.world, ranks.local_rank, device)
    return ranks, device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """Ask Linux to kill this rank when torchrun dies, even by SIGKILL: an orphaned rank would otherwise train on
    (or hang in a collective) beside the run that resumes it."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def processes(requested: int | str, device: str = "auto") -> int:
    """``train.processes`` as a number: ``auto`` is one per visible CUDA device (at least one; one when
    ``train.device`` is ``cpu``)."""
    if requested == "auto":
        return 1 if device == "cpu" else max(1, torch.cuda.device_count())
    return int(requested)


def relaunch(argv: list[str], nproc: int) -> NoReturn:
    """Become ``torchrun --standalone --nproc_per_node <nproc> -m medseg.cli <argv>`` (exec: same process id, so
    Snakemake or a scheduler that stops this job stops torchrun, whose ranks die with it)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "medseg.cli", *argv,
    ]  # fmt: skip
    log.info("training with %d processes (DistributedDataParallel, torchrun)", nproc)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, command)
