"""Choosing the compute device."""

from __future__ import annotations

import logging
import os

import torch

from medseg.errors import DeviceError

log = logging.getLogger(__name__)


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present and says so when it falls back to CPU; ``cuda`` fails at once without it.

    Raises:
        DeviceError: ``cuda`` was asked for on a machine without a usable CUDA device.
    """
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device 'cuda' was requested but no CUDA device is available (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda}): install the CUDA build of torch "
                "(see README) or set device: auto / cpu"
            )
        return torch.device("cuda")
    if requested == "auto":
        if torch.cuda.is_available():
            log.info("device auto: using CUDA (%s)", torch.cuda.get_device_name(0))
            return torch.device("cuda")
        log.info("device auto: no CUDA device found, using the CPU")
    return torch.device("cpu")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which cgroup-limited jobs and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_torch_threads(requested: int) -> int:
    """Set torch's CPU threads to ``requested`` (Snakemake's ``threads``), never more than the usable cores.

    ``snakemake --cores 8`` on a 2-core machine hands a job 8 threads; 8 torch threads on 2 cores wait for each
    other at every parallel region (the hippocampus training ran at 6.5 instead of about 19 samples/s).
    """
    threads = max(1, min(int(requested), usable_cores()))
    if threads < requested:
        log.info("%d threads requested, %d core(s) usable: torch uses %d", requested, usable_cores(), threads)
    torch.set_num_threads(threads)
    return threads
