"""The boundaries themselves: any exception of one case or series becomes its one-line failure row (traceback at
debug only), limits are checked from headers before allocating, report writers survive undecodable file names,
and unusable output locations fail before any work."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hostile_inputs import (
    AFFINE,
    GEOMETRY,
    SHAPE,
    config_data,
    identity,
    write_checkpoint,
    write_config,
    write_good_series,
)

from medseg.cli import EXIT_ERROR, main
from medseg.config import Config
from medseg.demo_data.dicom import write_ct_series
from medseg.errors import GeometryError, ImageReadError, one_line_reason, safe_text
from medseg.ingest import run as ingest_run
from medseg.ingest.dicom import frames_of, read_series
from medseg.ingest.pseudonym import pseudonym
from medseg.io import read_tsv, read_volume, write_json, write_tsv
from medseg.predict import run as predict_run
from medseg.volume import Image, check_affine, check_image

LATIN1 = os.fsdecode(b"M\xfcller")  # a folder name written by an old Latin-1 share: not UTF-8


def _config(tmp_path: Path, **ingest: object) -> Config:
    data = config_data(tmp_path / "key")
    data["ingest"].update(ingest)
    return Config.model_validate(data)


def _two_patients(root: Path) -> None:
    write_good_series(root)
    write_ct_series(np.zeros(SHAPE), GEOMETRY, identity(1), root / "second" / "ct")


def test_one_line_reason_names_the_type_of_an_unforeseen_error_and_cuts_the_root() -> None:
    assert one_line_reason(KeyError("Rows")) == "KeyError: 'Rows'"
    assert one_line_reason(ValueError("/data/in/p1/x.dcm:\nbad")) == "ValueError: /data/in/p1/x.dcm: bad"
    assert one_line_reason(ValueError("/data/in/p1/x.dcm: bad"), "/data/in") == "ValueError: p1/x.dcm: bad"
    assert one_line_reason(ImageReadError("p1/x.dcm: no Rows")) == "p1/x.dcm: no Rows"  # ours: already clear
    assert one_line_reason(RuntimeError()) == "RuntimeError"
    assert len(one_line_reason(ValueError("x" * 5000))) <= 500
    assert one_line_reason(OSError(f"{LATIN1}/a")) == "OSError: M\ufffdller/a"


def test_report_writers_and_pseudonyms_survive_undecodable_file_names(tmp_path: Path) -> None:
    assert safe_text(LATIN1) == "M\ufffdller"
    write_tsv(tmp_path / "f.tsv", [{"source": f"{LATIN1}/IM1.dcm", "reason": LATIN1}], ["source", "reason"])
    assert read_tsv(tmp_path / "f.tsv") == [{"source": "M\ufffdller/IM1.dcm", "reason": "M\ufffdller"}]
    write_json(tmp_path / "f.json", {"source": LATIN1})
    assert pseudonym(b"0123456789abcdef", LATIN1) != pseudonym(b"0123456789abcdef", "M?ller")


def test_a_good_series_in_a_folder_named_in_latin1_is_ingested(tmp_path: Path) -> None:
    write_ct_series(np.zeros(SHAPE), GEOMETRY, identity(2), tmp_path / "in" / LATIN1 / "ct")
    result = ingest_run.run(_config(tmp_path), tmp_path / "in", tmp_path / "out", tmp_path / "manifest.tsv")
    assert len(result.rows) == 1 and not result.failures


def test_any_exception_of_one_case_is_its_row_and_the_batch_goes_on(tmp_path, monkeypatch, caplog) -> None:
    _two_patients(tmp_path / "in")
    real = ingest_run.ingest_case
    calls = []

    def first_case_breaks(case, pid, *args, **kwargs):
        calls.append(pid)
        if len(calls) == 1:
            raise KeyError("Rows")  # not a MedsegError: a bug, or a header nobody foresaw
        return real(case, pid, *args, **kwargs)

    monkeypatch.setattr(ingest_run, "ingest_case", first_case_breaks)
    with caplog.at_level(logging.DEBUG):
        result = ingest_run.run(_config(tmp_path), tmp_path / "in", tmp_path / "out", tmp_path / "manifest.tsv")
    assert len(result.rows) == 1
    (failure,) = result.failures
    assert failure["patient_id"] == calls[0] and failure["reason"] == "KeyError: 'Rows'"
    assert failure["source"] == "[redacted]/ct"  # the case's folder, relative, its patient folder redacted
    assert not list((tmp_path / "out" / "images").glob(f"{calls[0]}*"))
    # the traceback, redacted, at debug level only
    with_traceback = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert with_traceback and all(r.levelno == logging.DEBUG for r in with_traceback)
    assert "KeyError" in with_traceback[0].getMessage()


def test_any_exception_of_one_series_fails_it_alone_in_predict(tmp_path, monkeypatch) -> None:
    _two_patients(tmp_path / "in")
    config = _config(tmp_path)
    checkpoint = write_checkpoint(tmp_path / "model")
    real = predict_run._predict_and_commit
    calls = []

    def first_series_breaks(job, *args, **kwargs):
        calls.append(job.series_id)
        if len(calls) == 1:
            raise ZeroDivisionError("division by zero")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(predict_run, "_predict_and_commit", first_series_breaks)
    result = predict_run.run(config, str(checkpoint), tmp_path / "in", tmp_path / "out")
    status = {r["series_id"]: r["status"] for r in result.records}
    assert status[calls[0]] == "failed" and status[calls[1]] == "predicted"
    (failure,) = result.failures
    assert failure["reason"] == "ZeroDivisionError: division by zero" and failure["source"] == "[redacted]/ct"


@pytest.mark.parametrize(
    ("values", "error", "words"),
    [
        ({"Rows": 65535, "Columns": 65535}, ImageReadError, "max_image_mb"),
        ({"PixelSpacing": ["0", "1"]}, GeometryError, "PixelSpacing must be positive"),
        ({"PixelSpacing": ["-1", "1"]}, GeometryError, "PixelSpacing must be positive"),
        ({"ImagePositionPatient": ["inf", "0", "0"]}, GeometryError, "NaN or Inf"),
        ({"ImageOrientationPatient": ["0", "0", "0", "0", "1", "0"]}, GeometryError, "unit vectors"),
        ({"SamplesPerPixel": 3}, ImageReadError, "samples per pixel"),
        ({"RescaleSlope": "inf"}, ImageReadError, "RescaleSlope"),
    ],
)
def test_header_values_are_refused_before_any_pixel_is_read(tmp_path, values, error, words) -> None:
    ds = pydicom.dcmread(write_good_series(tmp_path)[0], stop_before_pixels=True)  # headers only: no pixel data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we plant
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    with pytest.raises(error, match=words):
        frames_of(ds)


def test_the_ceiling_is_the_config_s(tmp_path: Path) -> None:
    files = write_good_series(tmp_path / "in")
    with pytest.raises(ImageReadError, match=r"max_image_mb=0\.001"):
        read_series(files, max_image_mb=0.001)
    result = ingest_run.run(_config(tmp_path, max_image_mb=0.001), tmp_path / "in", tmp_path / "o", tmp_path / "m.tsv")
    assert not result.rows and "max_image_mb" in result.failures[0]["reason"]


def test_a_nifti_header_is_checked_before_its_data_is_read(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000, 20000))
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    path = tmp_path / "huge.nii"
    with path.open("wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * 100)
    with pytest.raises(ImageReadError, match=r"\[20000, 20000, 20000\] voxels of float32"):
        read_volume(path, Image)


def test_unusable_images_are_refused_with_the_reason() -> None:
    good = Image(np.zeros((1, *SHAPE), np.float32), AFFINE)
    check_image(good)
    with pytest.raises(ImageReadError, match="2 channels"):
        check_image(Image(np.zeros((2, *SHAPE), np.float32), AFFINE))
    array = np.zeros((1, *SHAPE), np.float32)
    array[0, 0, 0, :2] = [np.nan, -np.inf]
    with pytest.raises(ImageReadError, match="2 non-finite voxel"):
        check_image(Image(array, AFFINE))
    for broken in (np.diag([1.0, 1.0, 0.0, 1.0]), np.full((4, 4), np.nan)):
        with pytest.raises(GeometryError):
            check_affine(broken, "x")


def test_unusable_output_locations_fail_before_any_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "cfg")
    write_good_series(tmp_path / "in")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    predict = ["predict", "--config", str(config), "--model", "none.pt", "--input", str(tmp_path / "in")]
    with caplog.at_level(logging.INFO):
        assert main([*predict, "--output", str(a_file)]) == EXIT_ERROR
    assert "is an existing file, not a folder" in caplog.text and a_file.read_text() == "keep me"
    ingest = ["ingest", "--config", str(config), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*ingest, "--manifest", str(a_file / "manifests" / "m.tsv")]) == EXIT_ERROR
    assert "is an existing file, so nothing can be written below it" in caplog.text
    assert not (tmp_path / "out").exists()  # failed before any work
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*ingest[:-1], str(a_file), "--manifest", str(tmp_path / "m.tsv")]) == EXIT_ERROR
    assert "is an existing file, not a folder" in caplog.text and a_file.read_text() == "keep me"
