"""``--name-after-input``: a NIfTI input's outputs are named after its file (nnU-Net's habit), DICOM outputs stay
pseudonymised; without the option every output is named by its pseudonymised series id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from predict_helpers import save_checkpoint, tiny_config, write_series

from medseg import cli
from medseg.io import read_json, read_tsv, write_volume
from medseg.predict.run import input_name
from medseg.volume import Image


def _scans(root: Path) -> None:
    rng = np.random.default_rng(3)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for case in ("case_017", "case_018"):
        write_volume(Image(rng.normal(0, 1, (1, 16, 14, 6)).astype(np.float32), affine), root / f"{case}_0000.nii.gz")
    write_series(root / "pat" / "ct", seed=1, patient_id="MRN-1")


def _predict(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    (tmp_path / "cfg.yaml").write_text(f"ingest: {{pseudonym_key_file: {tmp_path / 'key'}}}\n")
    checkpoint = tmp_path / "model.pt"
    if not checkpoint.exists():
        save_checkpoint(tiny_config(tmp_path / "key"), checkpoint)
    out = tmp_path / "out"
    argv = ["predict", "--config", str(tmp_path / "cfg.yaml"), "--model", str(checkpoint)]
    return cli.main([*argv, "--input", str(tmp_path / "in"), "--output", str(out), *extra]), out


def test_input_name() -> None:
    assert input_name(Path("case_017_0000.nii.gz")) == "case_017"
    assert input_name(Path("a/liver_3.nii")) == "liver_3"
    assert input_name(Path("scan.NRRD")) == "scan"
    assert input_name(Path("_0000.nii.gz")) == "_0000"


def test_nifti_outputs_named_after_the_input_dicom_stays_pseudonymised(tmp_path: Path) -> None:
    _scans(tmp_path / "in")
    code, out = _predict(tmp_path, "--name-after-input")
    assert code == 0
    rows = read_tsv(out / "summary.tsv")
    nifti_rows = sorted((r for r in rows if r["source_format"] == "nifti"), key=lambda r: r["nifti"])
    assert [r["nifti"] for r in nifti_rows] == ["nifti/case_017.nii.gz", "nifti/case_018.nii.gz"]
    assert [r["qc"] for r in nifti_rows] == ["qc/case_017.png", "qc/case_018.png"]
    for case in ("case_017", "case_018"):
        assert (out / "nifti" / f"{case}.nii.gz").is_file() and (out / "qc" / f"{case}.png").is_file()
        assert read_json(out / "records" / f"{case}.json")["status"] == "done"
    dicom = next(r for r in rows if r["source_format"] == "dicom")
    assert dicom["nifti"] == f"nifti/{dicom['series_id']}.nii.gz" and dicom["series_id"].startswith("P")
    assert (out / "dicom_seg" / f"{dicom['series_id']}.dcm").is_file()
    # A rerun resumes the named outputs (their records are found under the same names).
    again, _ = _predict(tmp_path, "--name-after-input")
    assert again == 0 and read_json(out / "summary.json")["n_done_before"] == 3


def test_without_the_option_nifti_outputs_are_pseudonymised(tmp_path: Path) -> None:
    _scans(tmp_path / "in")
    code, out = _predict(tmp_path)
    assert code == 0
    names = sorted(p.name for p in (out / "nifti").iterdir())
    assert len(names) == 3 and not [n for n in names if "case" in n]


def test_inputs_whose_names_clash_are_failures_not_overwrites(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for folder in ("a", "b"):
        image = Image(rng.normal(0, 1, (1, 12, 12, 4)).astype(np.float32), np.eye(4))
        write_volume(image, tmp_path / "in" / folder / "case_1_0000.nii.gz")
    code, out = _predict(tmp_path, "--name-after-input")
    assert code == cli.EXIT_SKIPPED
    failures = read_tsv(out / "failures.tsv")
    assert len(failures) == 2 and all("also named case_1" in f["reason"] for f in failures)
    assert not (out / "nifti").exists() or not list((out / "nifti").iterdir())
