"""Series selection on a real PACS-like export, MSD / nnU-Net folders, the CLI's progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from medseg import cli
from medseg.config import validate_config
from medseg.ingest.discover import discover
from medseg.ingest.run import run
from medseg.io import read_json, read_tsv, read_volume
from medseg.volume import Image, Label


def _config(tmp_path: Path, classes: int = 2, **ingest):
    return validate_config(
        {
            "classes": [f"c{i}" for i in range(classes)],
            "ingest": {"pseudonym_key_file": str(tmp_path / "key"), **ingest},
        }
    )


def test_hospital_scans_one_series_per_study_with_a_reason_for_every_other(tmp_path, shared_data):
    """Acceptance: two MR studies, one chosen series each, every other series skipped with a reason; the derived
    HippoCrop series (fake positions) is never chosen."""
    result = run(_config(tmp_path), shared_data / "hospital_scans", tmp_path / "out", tmp_path / "m.tsv")
    assert len(result.rows) == 2 and not result.failures
    report = read_tsv(tmp_path / "out" / "series.tsv")
    assert len(report) == 10  # 5 series per study
    for pid in {r["patient_id"] for r in report}:
        rows = [r for r in report if r["patient_id"] == pid]
        chosen = [r for r in rows if r["status"] == "chosen"]
        assert len(chosen) == 1 and "T1post" in chosen[0]["series"]
        assert all(r["reason"] for r in rows)
        (crop,) = [r for r in rows if "HippoCrop" in r["series"]]
        assert crop["status"] == "skipped" and "DERIVED" in crop["reason"]
    for row in result.rows:
        sidecar = read_json(tmp_path / "out" / "sidecars" / f"{row['patient_id']}.json")
        assert sidecar["modality"] == "MR" and sidecar["field_strength_t"] in (1.5, 3.0)
        assert sidecar["source_spacing_mm"][2] > 4.9  # 5 mm slices, from positions
        image = read_volume(row["image"], Image)
        assert image.spatial_shape == tuple(sidecar["canonical_shape"])


def test_description_rule_picks_another_series(tmp_path, shared_data):
    config = _config(tmp_path, series={"description_include": "FLAIR"})
    run(config, shared_data / "hospital_scans", tmp_path / "out", tmp_path / "m.tsv")
    chosen = [r for r in read_tsv(tmp_path / "out" / "series.tsv") if r["status"] == "chosen"]
    assert len(chosen) == 2 and all("FLAIR" in r["series"] for r in chosen)


def _msd_subset(hippocampus: Path, root: Path, names: list[str], nnunet: bool = False) -> Path:
    """A small MSD (or nnU-Net v2) folder of links to the shared hippocampus cases."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for name in names:
        image_name = name.replace(".nii.gz", "_0000.nii.gz") if nnunet else name
        os.symlink(hippocampus / "imagesTr" / name, root / "imagesTr" / image_name)
        os.symlink(hippocampus / "labelsTr" / name, root / "labelsTr" / name)
    os.symlink(hippocampus / "imagesTr" / "hippocampus_001.nii.gz", root / "imagesTs" / "hippocampus_001.nii.gz")
    dataset = json.loads((hippocampus / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({k: dataset[k] for k in ("name", "labels", "modality")}))
    return root


def test_msd_folder_pairs_images_and_labels(tmp_path, shared_data):
    hippocampus = shared_data / "hippocampus"
    names = sorted(p.name for p in (hippocampus / "imagesTr").iterdir())[1:5]
    for nnunet in (False, True):
        root = _msd_subset(hippocampus, tmp_path / f"in{nnunet}", names, nnunet=nnunet)
        found = discover(root)
        assert sorted(c.patient_key for c in found.cases if c.nifti_label) == sorted(n[:-7] for n in names)
        out = tmp_path / f"out{nnunet}"
        result = run(_config(tmp_path), root, out, tmp_path / "m.tsv")
        assert len(result.rows) == 5 and not result.failures
        labelled = [r for r in result.rows if r["label"]]
        assert len(labelled) == 4 and sum(r["split"] == "unlabelled" for r in result.rows) == 1
        label = read_volume(labelled[0]["label"], Label)
        assert set(np.unique(label.array)) == {0, 1, 2}


def test_progress_bar_only_on_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli._track(items, "ingest", 3) is items
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    tracked = cli._track(items, "ingest", 3)
    assert tracked is not items and list(tracked) == items


def test_a_2d_dataset_of_png_and_jpeg_pictures(tmp_path):
    """An nnU-Net 2D dataset: PNG/JPEG pictures become X x Y x 1 images; colour becomes grey, a 0/255 mask 0/1; a
    colour mask is refused with the file named, and the other cases go on."""
    from PIL import Image as PILImage

    root = tmp_path / "in"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "DX"}, "file_ending": ".png"}))
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 40), np.uint8)  # rows x columns
    mask[5:15, 10:30] = 255
    grey = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    PILImage.fromarray(grey).save(root / "imagesTr" / "a_0000.png")
    PILImage.fromarray(mask).save(root / "labelsTr" / "a.png")
    PILImage.fromarray(np.stack([grey] * 3, -1)).save(root / "imagesTr" / "b_0000.jpg", quality=95)  # colour JPEG
    PILImage.fromarray((mask > 0).astype(np.uint8)).save(root / "labelsTr" / "b.png")
    PILImage.fromarray(grey).save(root / "imagesTr" / "c_0000.png")
    PILImage.fromarray(np.stack([mask, mask * 0, mask], -1)).save(root / "labelsTr" / "c.png")  # a colour mask
    image = read_volume(root / "imagesTr" / "a_0000.png", Image)
    assert image.spatial_shape == (40, 30, 1) and image.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(image.array[0, :, :, 0], grey.T)  # X = columns, Y = rows
    label = read_volume(root / "labelsTr" / "a.png", Label)
    assert set(np.unique(label.array)) == {0, 1} and int(label.array.sum()) == 200
    assert read_volume(root / "imagesTr" / "b_0000.jpg", Image).spatial_shape == (40, 30, 1)
    result = run(_config(tmp_path, classes=1), root, tmp_path / "out", tmp_path / "m.tsv")
    assert sorted(r["split"] != "unlabelled" for r in result.rows).count(True) == 2
    assert len(result.failures) == 1 and "single-channel" in result.failures[0]["reason"]
    assert "labelsTr/c.png" in result.failures[0]["reason"]  # the file and the problem
