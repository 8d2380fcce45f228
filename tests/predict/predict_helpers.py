"""Helpers of the predict tests: a tiny randomly initialised checkpoint, small synthetic DICOM series, dciodvfy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from fast_predict_config import fast_predict_config
from pydicom.uid import MRImageStorage

from medseg import models
from medseg.config import Config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.networks import build_network

CLASSES = ["tumour", "oedema"]


def tiny_config(key_file: Path, **sections: dict) -> Config:
    """A config whose model is small and whose preprocessing is coarse, so that a 512 x 512 MR predicts fast."""
    data = {**fast_predict_config(CLASSES, key_file), **sections}
    return Config.model_validate(data)


def save_checkpoint(
    config: Config, path: Path, background_bias: float = 0.0, contract: dict[str, Any] | None = None
) -> Path:
    """A randomly initialised network in the format `medseg train` writes; ``background_bias`` > 0 makes it
    predict background everywhere (an empty prediction); ``contract`` as training writes it (default: none)."""
    torch.manual_seed(0)
    model = build_network(config.train, config.num_classes)
    if background_bias:
        last_bias = [name for name, p in model.named_parameters() if name.endswith("bias")][-1]
        with torch.no_grad():
            dict(model.named_parameters())[last_bias][0] += background_bias
    member = {"state_dict": model.state_dict(), "fold": None, "epoch": 0, "val_dice": 0.0}
    return models.save_checkpoint(path, config, [member], contract=contract)


def oblique_geometry() -> SeriesGeometry:
    """A sagittal-like stack written in decreasing position: every array axis differs from canonical RAS."""
    return SeriesGeometry(
        origin=np.array([12.0, -30.0, 40.0]),
        row_dir=np.array([0.0, 1.0, 0.0]),
        col_dir=np.array([0.0, 0.0, -1.0]),
        pixel_spacing=(1.5, 1.2),
        slice_step=-2.5,
    )


def write_series(folder: Path, seed: int = 0, shape: tuple[int, int, int] = (14, 11, 6), **identity: str) -> list[Path]:
    """A small CT series holding a bright box (values > 200 HU) on a dark background, with identity values."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(0.0, 20.0, shape)
    hu[3:9, 2:7, 1:5] += 400.0
    hu[4:6, 3:5, 2:4] += 400.0
    ident = Identity(patient_name="Doe^Jane", patient_id=identity.get("patient_id", "MRN-777123"))
    return write_ct_series(hu, oblique_geometry(), ident, folder)


def make_mr(files: list[Path]) -> list[Path]:
    """Turn a series written by :func:`write_series` into an MR series (Modality, SOP class; no CT attributes)."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        for keyword in ("KVP", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    return files


def assert_dciodvfy_ok(path: Path) -> None:
    """dciodvfy (dicom3tools) finds no error in the DICOM object ``path``.

    Skipped where dciodvfy is not installed, except in CI (``CI=true``), where its absence fails the test.
    """
    binary = shutil.which("dciodvfy")
    if binary is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("dciodvfy (dicom3tools) is not installed, and CI must validate the DICOM-SEG")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)
    report = done.stdout + done.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, "dciodvfy:\n" + report
