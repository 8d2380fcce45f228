"""A series' outputs are all or nothing: a series whose DICOM-SEG cannot be built leaves no NIfTI, SEG or QC file
(not even an earlier run's), no temporary file, and a record saying why; the rest of the batch is complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from predict_helpers import save_checkpoint, tiny_config, write_series
from pydicom.uid import generate_uid

from medseg.config import Config
from medseg.io import read_json, read_tsv
from medseg.predict import dicom_seg
from medseg.predict import run as predict_run
from medseg.predict.commit import Staging, remove_partials, staged


def _all_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and ".model" not in p.parts)


def _assert_complete_or_absent(out: Path, rows: dict[str, dict[str, str]], bad: str) -> None:
    for series_id, row in rows.items():
        present = {folder: (out / folder).glob(f"{series_id}.*") for folder in ("nifti", "dicom_seg", "qc")}
        counts = {folder: len(list(found)) for folder, found in present.items()}
        record = read_json(out / "records" / f"{series_id}.json")
        if series_id == bad:
            assert counts == {"nifti": 0, "dicom_seg": 0, "qc": 0}
            assert record["status"] == "failed" and "cannot build a DICOM-SEG" in record["reason"]
            assert row["status"] == "failed" and row["nifti"] == ""
        else:
            assert counts == {"nifti": 1, "dicom_seg": 1, "qc": 1}
            assert record["status"] == "done" and row["status"] in ("predicted", "done")
    assert not [p.name for p in out.rglob("*partial*")], "temporary files left behind"


@pytest.fixture
def two_series(tmp_path: Path) -> dict[str, Any]:
    config = tiny_config(tmp_path / "key")
    write_series(tmp_path / "in" / "good", seed=1, patient_id="MRN-1")
    bad_files = write_series(tmp_path / "in" / "bad", seed=2, patient_id="MRN-2")
    checkpoint = save_checkpoint(config, tmp_path / "model.pt")
    return {"config": config, "checkpoint": checkpoint, "bad_files": bad_files, "tmp": tmp_path}


def _bad_id(config: Config, scans: Path, bad_file: Path) -> str:
    uid = str(pydicom.dcmread(bad_file, stop_before_pixels=True).SeriesInstanceUID)
    jobs, _, _ = predict_run.plan(config, scans)
    return next(j.series_id for j in jobs if uid in {str(pydicom.dcmread(f).SeriesInstanceUID) for f in j.files})


def test_a_series_whose_seg_fails_leaves_nothing_but_its_record(
    two_series: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tmp = two_series["config"], two_series["tmp"]
    scans, out = tmp / "in", tmp / "out"
    bad = _bad_id(config, scans, two_series["bad_files"][0])
    # First a clean run: both series complete. Then the bad series is redone (its record removed) and its SEG
    # fails: the earlier run's outputs must go too, or they would pass for this run's.
    first = predict_run.run(config, str(two_series["checkpoint"]), scans, out)
    assert first.predicted == 2
    (out / "records" / f"{bad}.json").unlink()
    real_build = dicom_seg.build_segmentation

    def build_or_fail(label: Any, frames: Any, classes: Any, cfg: Any) -> Any:
        if str(frames[0].dataset.PatientID) == "MRN-2":
            raise ValueError("a stand-in for highdicom refusing the sources")
        return real_build(label, frames, classes, cfg)

    monkeypatch.setattr(predict_run, "build_segmentation", build_or_fail)
    again = predict_run.run(config, str(two_series["checkpoint"]), scans, out)
    assert again.predicted == 0 and [f["series_id"] for f in again.failures] == [bad]
    rows = {r["series_id"]: r for r in read_tsv(out / "summary.tsv")}
    assert len(rows) == 2
    _assert_complete_or_absent(out, rows, bad)


def test_a_real_seg_failure_mixed_study_uids(two_series: dict[str, Any]) -> None:
    """Some exports give each slice another StudyInstanceUID: ingest reads the series, highdicom refuses the SEG."""
    config, tmp = two_series["config"], two_series["tmp"]
    for path in two_series["bad_files"]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    scans, out = tmp / "in", tmp / "out"
    bad = _bad_id(config, scans, two_series["bad_files"][0])
    result = predict_run.run(config, str(two_series["checkpoint"]), scans, out)
    assert result.predicted == 1
    rows = {r["series_id"]: r for r in read_tsv(out / "summary.tsv")}
    _assert_complete_or_absent(out, rows, bad)
    assert "same series" in read_json(out / "records" / f"{bad}.json")["reason"]


def test_stray_temporaries_of_a_killed_run_are_removed(two_series: dict[str, Any]) -> None:
    config, tmp = two_series["config"], two_series["tmp"]
    scans, out = tmp / "in", tmp / "out"
    jobs, _, _ = predict_run.plan(config, scans)
    mine, other = jobs[0].series_id, jobs[1].series_id
    strays = [
        out / "nifti" / f".{mine}.nii.gz.partial-abc123.nii.gz",
        out / "dicom_seg" / f".{mine}.dcm.partial-x1.dcm",
        out / "records" / f"..{mine}.json.partial-q.json.partial-r.json",
        out / ".summary.tsv.partial-zz.tsv",
    ]
    theirs = out / "qc" / f".{other}.png.partial-yy.png"
    for path in [*strays, theirs]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    # A per-series job clears only its own series' temporaries: another job may be writing the others right now.
    predict_run.run(config, str(two_series["checkpoint"]), scans, out, series_ids=[mine])
    assert not any(p.exists() for p in strays[:3]) and theirs.exists() and strays[3].exists()
    predict_run.run(config, str(two_series["checkpoint"]), scans, out)
    assert not [p.name for p in out.rglob("*partial*")]


def test_staging_commits_in_order_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staged() as stage:
        stage.path(tmp_path / "a.txt").write_text("a")
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []

    stage = Staging()
    stage.path(tmp_path / "a.txt").write_text("a")
    stage.path(tmp_path / "sub" / "b.nii.gz").write_text("b")
    assert all(p.name.startswith(".") and "partial" in p.name for p in tmp_path.rglob("*") if p.is_file())
    assert [p.name for p in stage.commit()] == ["a.txt", "b.nii.gz"]
    assert (tmp_path / "sub" / "b.nii.gz").read_text() == "b"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "b.nii.gz"]
    assert remove_partials([tmp_path]) == 0
