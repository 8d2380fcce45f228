"""Tiny synthetic training sets: a few 24x24x12 volumes with two blobs (labels 1 and 2), a manifest, and their
"resampled" copies where `medseg resample` would have put them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.config import Config, validate_config
from medseg.io import write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS
from medseg.resample.run import output_paths
from medseg.volume import Image, Label

SHAPE = (24, 24, 12)
SPACING = (1.5, 1.5, 2.5)


def blob_case(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(1, X, Y, Z)`` with a bright sphere (label 1) and a darker box (label 2), plus noise."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cx, cy = rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] // 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[(x - cx) ** 2 + (y - cy) ** 2 + ((z - shape[2] // 2) * 1.7) ** 2 <= 16] = 1
    bx, by = rng.integers(3, shape[0] - 9), rng.integers(shape[1] // 2 + 1, shape[1] - 7)
    label[bx : bx + 6, by : by + 5, 3:9] = 2
    image = np.where(label == 1, 3.0, np.where(label == 2, -2.0, 0.0)) + rng.normal(0, 0.4, shape)
    return image[None].astype(np.float32), label[None]


def affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> dict[str, Any]:
    """6 cases: 4 train, 1 val, 1 test; canonical files, resampled files (same grid) and the manifest."""
    rng = np.random.default_rng(0)
    splits = ["train", "train", "train", "train", "val", "test"]
    rows, resample_dir = [], tmp_path / "resample"
    for i, split in enumerate(splits):
        pid = f"p{i:02d}"
        image, label = blob_case(rng)
        img_path = write_volume(Image(image, affine()), tmp_path / "raw" / f"{pid}_image.nii.gz")
        lab_path = write_volume(Label(label, affine()), tmp_path / "raw" / f"{pid}_label.nii.gz")
        paths = output_paths(resample_dir, pid)
        write_volume(Image(image, affine()), paths["image"])
        write_volume(Label(label, affine()), paths["label"])
        rows.append(
            {"patient_id": pid, "subject_id": f"s{i:02d}", "image": img_path, "label": lab_path, "split": split}
        )
    manifest = write_tsv(tmp_path / "manifest.tsv", rows, MANIFEST_COLUMNS)
    return {"root": tmp_path, "manifest": manifest, "resample_dir": resample_dir, "rows": rows}


def tiny_config(root: Path, tracking_dir: Path | None = None, **train: Any) -> Config:
    """A config that trains in seconds: a 3-level network on 16x16x8 patches, 2 epochs of 2 iterations.

    MLflow goes to ``tracking_dir`` (default ``root``), into an experiment named after ``root``.
    """
    tracking_dir = tracking_dir or root
    settings: dict[str, Any] = {
        "channels": [4, 8, 16],
        "patch_size_vox": [16, 16, 8],
        "batch_size": 2,
        "epochs": 2,
        "iterations_per_epoch": 2,
        "val_every_epochs": 1,
        "log_model": False,
        "device": "cpu",
        # the narrow layers' layout rests on a timing (medseg.train.layout): off, so that two runs compared
        # compute alike; tests/train/test_layout.py covers it
        "channels_last_narrow": False,
        **train,
    }
    return validate_config(
        {
            "dataset": "tiny",
            "resample": {"target_spacing_mm": list(SPACING), "normalization": "zscore"},
            "train": settings,
            "infer": {"device": "cpu"},
            "tracking": {
                "uri": f"sqlite:///{tracking_dir / 'mlflow.db'}",
                "artifact_dir": str(tracking_dir / "mlartifacts" / root.name),
                "experiment": f"tiny-{root.name}",
            },
        }
    )


@pytest.fixture(scope="session")
def tracking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow database for the session: creating a SQLite backend costs seconds of migrations."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def make_config(tracking_dir: Path) -> Any:
    """:func:`tiny_config` with the session's MLflow database (test folders are not packages: no imports)."""
    return functools.partial(tiny_config, tracking_dir=tracking_dir)
