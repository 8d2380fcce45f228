"""The plan stage drives resample: what plan.json says is what resample writes, and a user key wins and is recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.config import validate_config
from medseg.io import read_json, read_volume, write_json, write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS
from medseg.volume import Image, Label

SPACINGS = [(0.8, 0.8, 2.0), (1.0, 1.0, 2.0), (1.2, 1.2, 2.0)]  # median 1.0 x 1.0 x 2.0


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three labelled CT cases (train, train, val) and a test case, with different spacings; the manifest."""
    rng = np.random.default_rng(1)
    rows = []
    for i, (spacing, split) in enumerate(zip([*SPACINGS, SPACINGS[1]], ["train", "train", "val", "test"], strict=True)):
        label = np.zeros((20, 20, 8), np.uint8)
        label[5:12, 5:12, 2:6] = 1
        image = np.where(label > 0, 60.0, -800.0) + rng.normal(0, 20, label.shape)
        affine = np.diag([*spacing, 1.0])
        img = write_volume(Image(image[None].astype(np.float32), affine), tmp_path / "in" / f"c{i}.nii.gz")
        lab = write_volume(Label(label[None], affine), tmp_path / "in" / f"c{i}_label.nii.gz")
        rows.append({"patient_id": f"p{i}", "subject_id": f"s{i}", "image": img, "label": lab, "split": split,
                     "modality": "CT"})  # fmt: skip
    return write_tsv(tmp_path / "manifest.tsv", rows, MANIFEST_COLUMNS)


def _config(tmp_path: Path, **resample: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(validate_config({"classes": ["organ"], "resample": resample}).to_yaml())
    return path


def _plan_and_resample(tmp_path: Path, manifest: Path, config: Path, edit: dict | None = None) -> Path:
    plan = tmp_path / "plan.json"
    assert main(["plan", "--config", str(config), "--manifest", str(manifest), "--output", str(plan)]) == 0
    if edit:
        write_json(plan, {**read_json(plan), "resample": {**read_json(plan)["resample"], **edit}})
    out = tmp_path / "resampled"
    args = ["resample", "--config", str(config), "--manifest", str(manifest), "--plan", str(plan)]
    assert main([*args, "--patient-id", "p0", "--output-dir", str(out), "--threads", "2"]) == 0
    return out


def test_the_plan_decides_what_resample_writes(tmp_path: Path, dataset: Path) -> None:
    config = _config(tmp_path)
    out = _plan_and_resample(tmp_path, dataset, config)
    plan = read_json(tmp_path / "plan.json")
    # nnU-Net's rules: the median spacing; CT clipped to the foreground percentiles, z-scored with its statistics
    assert plan["resample"]["target_spacing_mm"] == pytest.approx([1.0, 1.0, 2.0])
    assert plan["resample"]["normalization"] == "ct" and plan["contract"]["modalities"] == ["CT"]
    image = read_volume(out / "p0_image.nii.gz", Image)
    assert image.spacing == pytest.approx((1.0, 1.0, 2.0)) and image.spatial_shape == (16, 16, 8)
    lo, hi = plan["resample"]["intensity_clip"]
    mean, std = plan["resample"]["intensity_mean"], plan["resample"]["intensity_std"]
    assert image.array.min() >= (lo - mean) / std - 1e-4 and image.array.max() <= (hi - mean) / std + 1e-4
    record = read_json(out / "p0.json")
    assert record["resample"]["target_spacing_mm"] == pytest.approx([1.0, 1.0, 2.0])

    # the same command after the plan changed writes something else: resample reads the plan, not the config
    edited = _plan_and_resample(tmp_path / "edited", dataset, config, {"target_spacing_mm": [2.0, 2.0, 2.0]})
    assert read_volume(edited / "p0_image.nii.gz", Image).spatial_shape == (9, 9, 8)  # 19 x 0.8 mm / 2 + 1


def test_a_key_the_user_sets_wins_over_the_plan_and_is_recorded(tmp_path: Path, dataset: Path) -> None:
    config = _config(tmp_path, target_spacing_mm=[1.6, 1.6, 2.0], normalization="zscore")
    out = _plan_and_resample(tmp_path, dataset, config)
    plan = read_json(tmp_path / "plan.json")
    assert plan["overrides"] == {"resample.target_spacing_mm": [1.6, 1.6, 2.0], "resample.normalization": "zscore"}
    assert plan["planned"]["resample"]["normalization"] == "ct"  # what the data alone suggested, kept for reading
    assert plan["resample"]["target_spacing_mm"] == [1.6, 1.6, 2.0] and plan["resample"]["normalization"] == "zscore"
    image = read_volume(out / "p0_image.nii.gz", Image)
    assert image.spacing == pytest.approx((1.6, 1.6, 2.0))
    assert abs(float(image.array.mean())) < 1e-3 and float(image.array.std()) == pytest.approx(1.0, abs=1e-3)


def test_resample_without_a_resolved_spacing_says_to_plan(tmp_path: Path, dataset: Path) -> None:
    config = _config(tmp_path)
    args = ["resample", "--config", str(config), "--manifest", str(dataset), "--output-dir", str(tmp_path / "o")]
    assert main(args) == 1  # every patient fails, each with the reason
    assert not list((tmp_path / "o").glob("*.nii.gz"))
