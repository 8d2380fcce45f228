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


def split_cores(cores: int, device_type: str, workers: int | None = None) -> tuple[int, int]:
    """Torch threads and data-loader worker processes for a training job that may use ``cores`` cores.

    On CUDA the GPU waits for batches, so workers get the cores (nnU-Net feeds a GPU from 12), one stays with the
    training process. On a CPU the network step needs the cores itself: on 2 cores a worker beside 2 torch threads
    gained nothing (``benchmarks/train_speed.py``), so batches are drawn in the training process there; from 4 cores
    a quarter of them draw batches. ``workers`` (``train.num_workers``) overrides the choice.
    """
    cores = max(1, cores)
    if workers is None:
        workers = min(12, cores - 1) if device_type == "cuda" else (0 if cores <= 2 else cores // 4)
    threads = max(1, cores - workers) if device_type == "cpu" else max(1, min(cores - workers, 4))
    return threads, max(0, workers)


class ThreadTuner:
    """Torch's CPU thread count chosen from measured step times, so that training survives a busy machine.

    Beside another process started from another terminal (the kernel's autogroup scheduling then gives each session
    half of the CPU), 2 torch threads on 2 cores wait for each other at every parallel region: the hippocampus
    training fell from 32 to 0.5 samples/s, while 1 thread kept 22 (``benchmarks/train_speed.py levers --busy``).
    No setting is best for both (2 threads are 1.5x faster on a quiet machine; OpenMP's passive waiting only
    recovered 8 samples/s), so this measures: after a sudden slowdown of 2.5x it tries half the threads at once, and
    every ``period`` steps it tries the neighbouring count for ``window`` steps, keeping whichever steps faster (a
    probe whose first step takes 3x longer ends at once; a losing probe waits twice as long before the next one,
    up to 8x; the first step at a count not used before is not judged: it recompiles a compiled network). Call
    :meth:`record` with each step's seconds; it sets torch's threads and returns the count.
    """

    def __init__(self, max_threads: int, period: int = 200, window: int = 5, skip: int = 3) -> None:
        self.max_threads = self.threads = self.home = max(1, max_threads)
        self.period, self.window, self.skip = period, window, skip
        self.recent: list[float] = []
        self.reference = float("inf")  # median step time at `home` before a probe
        self.steps = 0
        self.backoff = 1
        self.probing = False
        self.down_next = True
        self.seen = {self.threads}

    def _median(self, values: list[float]) -> float:
        return float(sorted(values)[len(values) // 2])

    def _switch(self, threads: int, reason: str) -> None:
        if threads != self.threads:
            log.info("torch threads %d -> %d (%s)", self.threads, threads, reason)
            self.threads = threads
            torch.set_num_threads(threads)
            if threads not in self.seen:  # its first step recompiles a compiled network: not a measure of it
                self.seen.add(threads)
                self.skip = 1
        self.recent, self.steps = [], 0

    def _probe(self, reference: float) -> None:
        down = self.threads == self.max_threads or (self.threads > 1 and self.down_next)
        self.down_next = not self.down_next
        target = max(1, self.threads // 2) if down else min(self.max_threads, self.threads * 2)
        self.home, self.reference, self.probing = self.threads, reference, True
        self._switch(target, f"trying {target} against {reference:.3f} s per step")

    def record(self, seconds: float) -> int:
        if self.max_threads == 1:
            return 1
        if self.skip > 0:  # warm-up steps (allocation, compilation) say nothing about the machine
            self.skip -= 1
            return self.threads
        self.recent.append(seconds)
        self.steps += 1
        if self.probing:
            if seconds > 3 * self.reference or len(self.recent) >= self.window:
                won = len(self.recent) >= self.window and self._median(self.recent) < 0.95 * self.reference
                self.probing = False
                self.backoff = 1 if won else min(2 * self.backoff, 8)
                if won:
                    self._switch(self.threads, f"{self._median(self.recent):.3f} s per step, kept")
                else:
                    self._switch(self.home, "the probe stepped slower")
            return self.threads
        earlier = self.recent[-self.window - 2 : -2]
        if self.threads > 1 and len(earlier) >= 3 and min(self.recent[-2:]) > 2.5 * self._median(earlier):
            self._probe(self._median(self.recent[-2:]))  # a sudden slowdown: another process took cores
        elif len(self.recent) >= self.window and (
            self.reference == float("inf") or self.steps >= self.period * self.backoff
        ):  # the first probe comes after `window` steps, then one every `period` (times the backoff) steps
            self._probe(self._median(self.recent[-self.window :]))
        return self.threads
