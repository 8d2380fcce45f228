"""The model's contract: a modality the model was not trained on is skipped (unless allowed), a spacing or intensity
far from the training data is flagged in the record, the summary and the QC picture. Pure checks first, then whole
runs with a tiny untrained network whose checkpoint carries the contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from predict_helpers import CLASSES, make_mr, save_checkpoint, tiny_config, write_series

from medseg import cli
from medseg.contract import check, check_intensity, check_modality, check_spacing
from medseg.io import read_json, read_tsv
from medseg.qc import render_qc
from medseg.volume import Image, Label

# write_series' grid in RAS canonical order: x 2.5 mm (the slice step), y 1.2 mm, z 1.5 mm.
SERIES_SPACING = (2.5, 1.2, 1.5)


def ct_contract(**changes: object) -> dict:
    contract = {
        "modalities": ["CT"],
        "classes": CLASSES,
        "spacing_mm": {"min": list(SERIES_SPACING), "max": list(SERIES_SPACING), "median": list(SERIES_SPACING)},
        "intensity": {"scheme": "ct", "image_p01": [-80.0, -20.0], "image_p99": [300.0, 900.0]},
    }
    contract.update(changes)
    return contract


# -- pure checks


def test_modality_rules() -> None:
    ct = {"modalities": ["CT"]}
    refused = check_modality(ct, "MR")
    assert refused.skip_reason == (
        "modality MR: the model was trained on CT only (use --allow-any-modality to predict anyway)"
    )
    assert check_modality(ct, "CT") == check_modality({}, "MR") == check_modality({"modalities": ["unknown"]}, "MR")
    assert check_modality(ct, "CT").skip_reason is None and not check_modality(ct, "CT").flags
    allowed = check_modality(ct, "MR", allow_any=True)
    assert allowed.skip_reason is None and allowed.flags == ["modality MR, trained on CT only"]
    nifti = check_modality(ct, None)  # NIfTI says nothing: never skipped, flagged where the contract knows
    assert nifti.skip_reason is None and nifti.flags == ["modality not stated by the input, trained on CT"]
    assert not check_modality({"modalities": ["unknown"]}, None).flags
    mixed = check_modality({"modalities": ["CT", "unknown"]}, "MR")  # MR may have been among the unstated ones
    assert mixed.skip_reason is None and mixed.flags


def test_spacing_flags_only_beyond_twice_the_range() -> None:
    contract = {"spacing_mm": {"min": [1.0, 1.0, 2.0], "max": [1.0, 1.0, 3.0]}}
    assert check_spacing(contract, [2.0, 0.5, 6.0]) == []  # exactly 2x is still in
    assert check_spacing(contract, [2.01, 1.0, 2.5]) == ["spacing x 2.01 mm, trained on 1-1 mm"]
    assert check_spacing(contract, [1.0, 0.4, 15.0]) == [
        "spacing y 0.4 mm, trained on 1-1 mm",
        "spacing z 15 mm, trained on 2-3 mm",
    ]
    assert check_spacing({}, [100.0, 100.0, 100.0]) == []


def test_intensity_flags_for_ct_and_only_absurd_values_for_zscore() -> None:
    rng = np.random.default_rng(0)
    contract = {"intensity": {"scheme": "ct", "image_p01": [-1000.0, -900.0], "image_p99": [200.0, 400.0]}}
    in_range = np.concatenate([np.full(500, -980.0), rng.uniform(-980.0, 300.0, 9000), np.full(500, 300.0)])
    assert check_intensity(contract, in_range) == []
    # Widened by half the width: p01 in [-1050, -850] passes, p99 in [100, 500] passes.
    assert check_intensity(contract, np.concatenate([np.full(100, -860.0), np.full(9800, 0.0), np.full(100, 480)]))
    # An MR in raw units fed to a CT model: both percentiles far out.
    flags = check_intensity(contract, rng.uniform(0.0, 1500.0, 10000))
    assert [f.split()[1] for f in flags] == ["p01", "p99"] and "trained on -1000 to -900" in flags[0]
    zscore = {"intensity": {"scheme": "zscore", "image_p01": [0.0, 1.0], "image_p99": [10.0, 11.0]}}
    assert check_intensity(zscore, rng.uniform(0.0, 5000.0, 1000)) == []
    assert check_intensity(zscore, np.full(100, 7.0)) == ["intensities constant (7)"]
    assert check_intensity(zscore, np.array([1.0, np.nan])) == ["intensities not finite (NaN or infinite voxels)"]


def test_empty_contract_checks_nothing() -> None:
    verdict = check({}, "MR", [50.0, 50.0, 50.0], np.full((2, 2, 2), 1e6))
    assert verdict.skip_reason is None and verdict.flags == []


def test_flags_are_drawn_in_red_on_the_qc_picture(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = Image(rng.normal(0, 1, (1, 12, 10, 6)).astype(np.float32), np.eye(4))
    label = Label(np.zeros((1, 12, 10, 6), dtype=np.uint8), np.eye(4))

    def red_pixels(path: Path) -> int:
        rgb = imread(path)[..., :3]
        return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)).sum())

    plain = render_qc(image, label, CLASSES, [(0, 255, 0), (0, 0, 255)], tmp_path / "plain.png", 3)
    flagged = render_qc(
        image, label, CLASSES, [(0, 255, 0), (0, 0, 255)], tmp_path / "flagged.png", 3, flags=["spacing z 15 mm"]
    )
    assert red_pixels(plain) == 0 and red_pixels(flagged) > 20


# -- whole runs


def _cli(tmp_path: Path, checkpoint: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    argv = ["predict", "--config", str(tmp_path / "cfg.yaml"), "--model", str(checkpoint)]
    argv += ["--input", str(tmp_path / "in"), "--output", str(out), *extra]
    return cli.main(argv), out


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    """One CT and one MR series; the config file holds only the pseudonym key (the contract is the model's)."""
    (tmp_path / "cfg.yaml").write_text(f"ingest: {{pseudonym_key_file: {tmp_path / 'key'}}}\n")
    write_series(tmp_path / "in" / "ct", seed=1, patient_id="MRN-1")
    make_mr(write_series(tmp_path / "in" / "mr", seed=2, patient_id="MRN-2"))
    return tmp_path


def _by_modality(out: Path) -> dict[str, dict[str, str]]:
    return {r["modality"]: r for r in read_tsv(out / "summary.tsv")}


def test_ct_model_skips_an_mr_series_with_the_reason(batch: Path) -> None:
    checkpoint = save_checkpoint(tiny_config(batch / "key"), batch / "model.pt", contract=ct_contract())
    code, out = _cli(batch, checkpoint)
    assert code == cli.EXIT_SKIPPED
    rows = _by_modality(out)
    assert rows["CT"]["status"] == "predicted" and rows["CT"]["flags"] == ""
    mr = rows["MR"]
    reason = "modality MR: the model was trained on CT only (use --allow-any-modality to predict anyway)"
    assert mr["status"] == "skipped" and mr["reason"] == reason
    assert mr["nifti"] == mr["dicom_seg"] == mr["qc"] == ""
    failures = read_tsv(out / "failures.tsv")
    assert [(f["series_id"], f["reason"]) for f in failures] == [(mr["series_id"], reason)]
    for folder in ("nifti", "dicom_seg", "qc"):
        assert not list((out / folder).glob(f"{mr['series_id']}*")), folder
    record = read_json(out / "records" / f"{mr['series_id']}.json")
    assert record["status"] == "skipped" and record["reason"] == reason
    assert json.loads((out / "summary.json").read_text())["n_skipped"] == 1
    assert _cli(batch, checkpoint, "--skips-ok")[0] == 0


def test_mr_series_is_predicted_with_allow_any_modality(batch: Path) -> None:
    checkpoint = save_checkpoint(tiny_config(batch / "key"), batch / "model.pt", contract=ct_contract())
    code, out = _cli(batch, checkpoint, "--allow-any-modality")
    assert code == 0
    mr = _by_modality(out)["MR"]
    assert mr["status"] == "predicted" and "modality MR, trained on CT only" in mr["flags"]
    for key in ("nifti", "dicom_seg", "qc"):
        assert (out / mr[key]).is_file()
    assert read_json(out / "records" / f"{mr['series_id']}.json")["flags"][0] == "modality MR, trained on CT only"


def test_spacing_five_times_the_training_range_is_flagged(batch: Path) -> None:
    fine = [SERIES_SPACING[0] / 5, *SERIES_SPACING[1:]]  # trained on 0.5 mm along x; the series has 2.5 mm
    contract = ct_contract(modalities=["CT", "MR"], spacing_mm={"min": fine, "max": fine, "median": fine})
    checkpoint = save_checkpoint(tiny_config(batch / "key"), batch / "model.pt", contract=contract)
    code, out = _cli(batch, checkpoint)
    assert code == 0
    rows = _by_modality(out)
    assert rows["CT"]["flags"] == "spacing x 2.5 mm, trained on 0.5-0.5 mm"
    record = read_json(out / "records" / f"{rows['CT']['series_id']}.json")
    assert record["status"] == "done" and record["flags"] == ["spacing x 2.5 mm, trained on 0.5-0.5 mm"]
    # The MR's raw values are the CT's here, so only spacing is flagged; the flag has no identity in it.
    assert rows["MR"]["flags"].startswith("spacing x 2.5 mm")
    assert json.loads((out / "summary.json").read_text())["n_flagged"] == 2


def test_old_checkpoint_without_contract_checks_nothing(batch: Path) -> None:
    checkpoint = save_checkpoint(tiny_config(batch / "key"), batch / "model.pt")
    code, out = _cli(batch, checkpoint)
    assert code == 0
    assert [(r["status"], r["flags"]) for r in read_tsv(out / "summary.tsv")] == [("predicted", "")] * 2
