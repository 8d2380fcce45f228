"""Acceptance: hostile inputs through `medseg ingest` and `medseg predict` (in-process, ``medseg.cli.main``).

Each kind alone beside one good series, and every kind mixed in one folder: no traceback on stderr or in the log
at INFO, exit status 3, one failures-report row naming each bad input by its relative, redacted path, the good
series complete, and nothing written for the bad ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hostile_inputs import KINDS, PATIENT_NAME, PREDICT_KINDS, Kind, naming, plant, write_checkpoint, write_config

from medseg.cli import EXIT_SKIPPED, main
from medseg.io import read_tsv, read_volume
from medseg.volume import Image

IDENTITY = [*PATIENT_NAME.split("^"), "MRN-99"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The config file and a tiny untrained checkpoint, shared by every test of the module."""
    folder = tmp_path_factory.mktemp("hostile-setup")
    return write_config(folder), write_checkpoint(folder)


def _run(argv: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> int:
    """``medseg argv`` in-process, checking that no traceback reached stderr or the log at INFO."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Traceback" not in caplog.text, err + caplog.text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    for value in IDENTITY:
        assert value not in caplog.text and value not in err
    return code


def _check_failures(out: Path, markers: dict[str, str]) -> None:
    rows = read_tsv(out / "failures.tsv")
    for name, marker in markers.items():
        assert len(naming(rows, marker)) == 1, f"{name}: no single row names {marker}: {rows}"
        assert naming(rows, marker)[0]["reason"], name
    assert len(rows) == len(markers), rows  # nothing else failed: the good series least of all
    text = (out / "failures.tsv").read_text(encoding="utf-8")
    assert not [value for value in IDENTITY if value in text], text


def _ingest(tmp_path: Path, config: Path, kinds: list[Kind], caplog, capsys) -> None:
    _, markers = plant(tmp_path / "in", kinds)
    out, manifest = tmp_path / "out", tmp_path / "manifest.tsv"
    argv = ["ingest", "--config", str(config), "--input", str(tmp_path / "in"), "--output", str(out)]
    assert _run([*argv, "--manifest", str(manifest)], caplog, capsys) == EXIT_SKIPPED
    _check_failures(out, markers)
    (row,) = read_tsv(manifest)  # the good series, and only it
    assert read_volume(row["image"], Image).spatial_shape == (16, 16, 4)
    assert [p.name for p in (out / "images").iterdir()] == [f"{row['patient_id']}.nii.gz"]
    assert [p.name for p in (out / "sidecars").iterdir()] == [f"{row['patient_id']}.json"]
    assert not (out / "labels").exists() or not list((out / "labels").iterdir())


def _predict(tmp_path: Path, config: Path, model: Path, kinds: list[Kind], caplog, capsys) -> None:
    _, markers = plant(tmp_path / "in", kinds)
    out = tmp_path / "out"
    argv = ["predict", "--config", str(config), "--model", str(model), "--input", str(tmp_path / "in")]
    assert _run([*argv, "--output", str(out)], caplog, capsys) == EXIT_SKIPPED
    _check_failures(out, markers)
    summary = read_tsv(out / "summary.tsv")
    (done,) = [r for r in summary if r["status"] == "predicted"]  # the good series, complete
    assert done["nifti"] and done["dicom_seg"] and done["qc"]
    for folder, name in (("nifti", done["nifti"]), ("dicom_seg", done["dicom_seg"]), ("qc", done["qc"])):
        assert [str(p.relative_to(out)) for p in (out / folder).iterdir()] == [name]
    assert read_volume(out / done["nifti"], Image).spatial_shape == (16, 16, 4)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_ingest_lists_each_hostile_kind_and_ingests_the_good_series(kind, tmp_path, setup, caplog, capsys):
    _ingest(tmp_path, setup[0], [kind], caplog, capsys)


@pytest.mark.parametrize("kind", PREDICT_KINDS, ids=lambda k: k.name)
def test_predict_lists_each_hostile_kind_and_predicts_the_good_series(kind, tmp_path, setup, caplog, capsys):
    _predict(tmp_path, setup[0], setup[1], [kind], caplog, capsys)


def test_ingest_of_every_kind_mixed_in_one_folder(tmp_path, setup, caplog, capsys):
    _ingest(tmp_path, setup[0], KINDS, caplog, capsys)


def test_predict_of_every_kind_mixed_in_one_folder(tmp_path, setup, caplog, capsys):
    _predict(tmp_path, setup[0], setup[1], PREDICT_KINDS, caplog, capsys)


def test_the_suite_covers_the_kinds_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    names = [k.name for k in KINDS]
    assert len(set(names)) == len(names) >= 25
    with capsys.disabled():
        print(f"\nhostile input kinds: {len(KINDS)} ({len(PREDICT_KINDS)} also through predict)")
