"""Device choice: ``cuda`` without CUDA fails at once and says why; ``auto`` falls back to the CPU and says so."""

from __future__ import annotations

import logging

import pytest
import torch

from medseg.device import select_device
from medseg.errors import DeviceError


def test_cuda_without_cuda_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"'cuda' was requested but no CUDA device.*device: auto / cpu"):
        select_device("cuda")


def test_auto_falls_back_to_cpu_and_says_so(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="medseg.device"):
        assert select_device("auto") == torch.device("cpu")
    assert "no CUDA device found, using the CPU" in caplog.text


def test_train_with_cuda_on_a_cpu_machine_fails_before_loading_data(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from medseg.config import validate_config
    from medseg.train.run import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = validate_config({"train": {"device": "cuda"}})
    with pytest.raises(DeviceError):  # the manifest does not even exist: the device check comes first
        run(config, tmp_path / "missing.tsv", tmp_path, tmp_path / "train")
