"""Privacy on failure paths: every hostile kind inside a folder named after the patient, that folder given as
``--input`` itself and as a folder below the input; the planted name and record number appear nowhere (files,
file names, logs, stderr) except inside the DICOM-SEG objects, which must carry the patient's identity."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hostile_inputs import KINDS, plant, write_checkpoint, write_config

from medseg.cli import EXIT_SKIPPED, main

PATIENT_FOLDER = "Roe^Richard_MRN555"
PLANTED = ["Roe^Richard", "Richard", "MRN555"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("privacy-setup")
    return write_config(folder), write_checkpoint(folder)


def _leaks(folder: Path) -> list[str]:
    """Files below ``folder`` whose name or bytes hold a planted value (DICOM-SEG objects excepted)."""
    found = []
    for path in folder.rglob("*"):
        if any(value in str(path.relative_to(folder)) for value in PLANTED):
            found.append(f"name: {path.relative_to(folder)}")
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            found += [f"{path.relative_to(folder)}: {v}" for v in PLANTED if v.encode() in data]
    return found


@pytest.mark.parametrize("as_input", [True, False], ids=["patient-folder-is-input", "patient-folder-below-input"])
def test_no_planted_value_outside_the_seg_on_failure_paths(
    tmp_path: Path,
    setup: tuple[Path, Path],
    as_input: bool,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, model = setup
    patient = tmp_path / "in" / PATIENT_FOLDER
    plant(patient, KINDS)
    source = patient if as_input else tmp_path / "in"
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):  # debug too: tracebacks of unexpected errors are logged there
        ingest = ["ingest", "--config", str(config), "--input", str(source), "--output", str(out / "ingest")]
        assert main([*ingest, "--manifest", str(out / "manifest.tsv")]) == EXIT_SKIPPED
        predict = ["predict", "--config", str(config), "--model", str(model), "--input", str(source)]
        assert main([*predict, "--output", str(out / "predict")]) == EXIT_SKIPPED
    logged = caplog.text + capsys.readouterr().err
    assert not [v for v in PLANTED if v in logged], [line for line in logged.splitlines() if "Richard" in line][:5]
    assert not _leaks(out), _leaks(out)
    assert list((out / "predict" / "dicom_seg").glob("*.dcm"))  # the good series' SEG was written
