"""Choosing the compute device."""

from __future__ import annotations

import logging

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
