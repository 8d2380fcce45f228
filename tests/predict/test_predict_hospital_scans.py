"""Acceptance on real scans: ../shared/data/hospital_scans (two MR studies exported as a scanner does), a tiny
randomly initialised model in the exact checkpoint format of `medseg train`."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from predict_helpers import assert_dciodvfy_ok, save_checkpoint, tiny_config

from medseg.ingest.discover import discover, rank_series
from medseg.io import read_json, read_tsv, read_volume
from medseg.predict import run as predict_run
from medseg.volume import Label


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    scans = Path(__file__).resolve().parents[3] / "shared" / "data" / "hospital_scans"
    if not scans.is_dir():
        pytest.fail(f"real test data missing: {scans}")
    tmp = tmp_path_factory.mktemp("hospital")
    config = tiny_config(tmp / "key")
    checkpoint = save_checkpoint(config, tmp / "model.pt")
    handler = _Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        first = predict_run.run(config, str(checkpoint), scans, tmp / "out")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return {"config": config, "checkpoint": checkpoint, "scans": scans, "out": tmp / "out", "first": first,
            "log": handler.lines}  # fmt: skip


def _eligible(config: Any, scans: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> files of every eligible series, found with ingest's own rules."""
    eligible = {}
    for case in discover(scans).cases:
        for series in rank_series(case, config.ingest.series)[0]:
            eligible[series.series_uid] = series.files
    return eligible


def test_one_nifti_seg_and_picture_per_eligible_series(predicted: dict[str, Any]) -> None:
    out, eligible = predicted["out"], _eligible(predicted["config"], predicted["scans"])
    assert len(eligible) >= 4
    assert predicted["first"].predicted == len(eligible) and not predicted["first"].failures
    for folder, suffix in (("nifti", ".nii.gz"), ("dicom_seg", ".dcm"), ("qc", ".png")):
        assert len(list((out / folder).glob(f"*{suffix}"))) == len(eligible), folder
    assert len(read_tsv(out / "summary.tsv")) == len(eligible)


def test_every_seg_references_its_series_and_equals_the_nifti(predicted: dict[str, Any]) -> None:
    out, eligible = predicted["out"], _eligible(predicted["config"], predicted["scans"])
    referenced = set()
    nonempty = 0
    for row in read_tsv(out / "summary.tsv"):
        ds = pydicom.dcmread(out / row["dicom_seg"])
        assert ds.Modality == "SEG"
        assert_dciodvfy_ok(out / row["dicom_seg"])
        series_uid = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        assert series_uid in eligible and series_uid not in referenced
        referenced.add(series_uid)
        nifti = read_volume(out / row["nifti"], Label)
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in eligible[series_uid]]
        assert nifti.spatial_shape == (int(sources[0].Columns), int(sources[0].Rows), len(sources))
        seg = hd.seg.segread(out / row["dicom_seg"])
        uids = [str(s.SOPInstanceUID) for s in sources]
        decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
        for source, frame in zip(sources, decoded, strict=True):
            # Which NIfTI slice is this DICOM slice? From its own position, not from our frame ordering.
            ras = np.array([-1.0, -1.0, 1.0]) * np.array([float(v) for v in source.ImagePositionPatient])
            i, j, k = np.linalg.solve(nifti.affine[:3, :3], ras - nifti.affine[:3, 3])
            assert abs(i) < 1e-2 and abs(j) < 1e-2 and abs(k - round(k)) < 1e-2
            assert np.array_equal(frame, nifti.array[0, :, :, round(k)].T)
        nonempty += int(nifti.array.any())
    assert referenced == set(eligible)
    assert nonempty > 0  # the comparison above must have compared some foreground


def test_no_identity_outside_the_seg(predicted: dict[str, Any]) -> None:
    out, eligible = predicted["out"], _eligible(predicted["config"], predicted["scans"])
    identity = set()
    for files in eligible.values():
        for f in files[:2]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if ds.get(keyword):
                    identity.add(str(ds.get(keyword)))
    assert identity
    for path in out.rglob("*"):
        if not path.is_file() or path.suffix == ".dcm" or ".model" in path.parts:
            continue
        data = path.read_bytes()
        if path.name.endswith(".nii.gz"):
            data = gzip.decompress(data)[:2048]  # header and extensions
        for value in identity:
            assert value.encode() not in data, f"{value} in {path.name}"
            assert value not in path.name
    for line in predicted["log"]:
        for value in identity:
            assert value not in line, f"identity in a log line: {line}"


def test_rerun_does_no_work(predicted: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    out = predicted["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".gz", ".dcm", ".png", ".json")}

    def no_model(*_args: object) -> None:
        raise AssertionError("a rerun loaded the model")

    monkeypatch.setattr("medseg.models.load_checkpoint", no_model)
    again = predict_run.run(predicted["config"], str(predicted["checkpoint"]), predicted["scans"], out)
    assert again.predicted == 0 and {r["status"] for r in again.records} == {"done"}
    assert read_json(out / "summary.json")["n_done_before"] == len(again.records)
    changed = [p.name for p, t in stamps.items() if p.name != "summary.json" and p.stat().st_mtime_ns != t]
    assert not changed
