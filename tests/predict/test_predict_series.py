"""One series end to end with a stand-in model (a threshold): the outputs land on the source grid, the DICOM-SEG
references the source slices frame by frame, empty predictions are valid, bad series are skipped, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from predict_helpers import CLASSES, assert_dciodvfy_ok, save_checkpoint, tiny_config, write_series

from medseg import cli
from medseg.config import Config, CrfConfig
from medseg.errors import MedsegError, ModelLoadError
from medseg.io import read_tsv, read_volume
from medseg.predict import run as predict_run
from medseg.volume import Image, Label

THRESHOLDS = (200.0, 600.0)  # class 1 above the first, class 2 above the second (HU)


def threshold(image: Image) -> Label:
    """Stand-in for the network: works on whatever grid it is given, like the real predictor."""
    values = image.array[0]
    label = (values > THRESHOLDS[0]).astype(np.uint8) + (values > THRESHOLDS[1]).astype(np.uint8)
    return Label(label[None], image.affine.copy())


def expected_by_sop(files: list[Path]) -> dict[str, np.ndarray]:
    """The threshold applied to each stored DICOM slice, keyed by SOPInstanceUID (rows, columns)."""
    out = {}
    for path in files:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out[str(ds.SOPInstanceUID)] = (hu > THRESHOLDS[0]).astype(np.uint8) + (hu > THRESHOLDS[1]).astype(np.uint8)
    return out


def voxel_of(affine: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The NIfTI voxel index of a slice's first pixel, from its ImagePositionPatient (LPS -> RAS)."""
    ras = np.array([-1.0, -1.0, 1.0]) * np.array([float(v) for v in ds.ImagePositionPatient])
    return np.linalg.solve(affine[:3, :3], ras - affine[:3, 3])


def test_series_outputs_match_the_source_slices(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path / "key",
        predict={"segments": {"tumour": {"label": "Tumour core", "color_rgb": [255, 0, 0]}}},
    )
    files = write_series(tmp_path / "in" / "pat" / "ct")
    jobs, failures, _ = predict_run.plan(config, tmp_path / "in")
    assert len(jobs) == 1 and not failures
    out = tmp_path / "out"
    facts = predict_run.predict_series(jobs[0], threshold, CLASSES, config, out)
    assert not facts["empty"]

    nifti = read_volume(out / facts["outputs"]["nifti"], Label)
    expected = expected_by_sop(files)
    # NIfTI on the ORIGINAL grid: slice k of the file is the DICOM slice at position k, rows x columns transposed.
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        i, j, k = np.rint(voxel_of(nifti.affine, ds)).astype(int)
        assert (i, j) == (0, 0)
        assert np.array_equal(nifti.array[0, :, :, k].T, expected[str(ds.SOPInstanceUID)])

    assert_dciodvfy_ok(out / facts["outputs"]["dicom_seg"])
    seg = hd.seg.segread(out / facts["outputs"]["dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    assert seg.PatientID == "MRN-777123"  # the SEG files back into the patient's record
    uids = list(expected)
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    for uid, frame in zip(uids, decoded, strict=True):
        assert np.array_equal(frame, expected[uid])
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert segments[1].SegmentLabel == "Tumour core" and segments[2].SegmentLabel == "oedema"
    rgb = hd.color.CIELabColor.from_dicom_value(segments[1].RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, (255, 0, 0), atol=2)
    png = (out / facts["outputs"]["qc"]).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_empty_prediction_still_gets_every_output(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "key")
    files = write_series(tmp_path / "in" / "pat")
    jobs, _, _ = predict_run.plan(config, tmp_path / "in")

    def nothing(image: Image) -> Label:
        return Label(np.zeros_like(image.array, dtype=np.uint8), image.affine.copy())

    facts = predict_run.predict_series(jobs[0], nothing, CLASSES, config, tmp_path / "out")
    assert facts["empty"] and facts["volume_ml"] == {"tumour": 0.0, "oedema": 0.0}
    assert_dciodvfy_ok(tmp_path / "out" / facts["outputs"]["dicom_seg"])
    seg = hd.seg.segread(tmp_path / "out" / facts["outputs"]["dicom_seg"])
    assert len(seg.SegmentSequence) == 2  # both classes described although absent
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert decoded.shape == (6, 11, 14) and not decoded.any()
    assert not read_volume(tmp_path / "out" / facts["outputs"]["nifti"], Label).array.any()
    assert (tmp_path / "out" / facts["outputs"]["qc"]).exists()


def _folder_with_a_bad_series(root: Path) -> None:
    write_series(root / "good" / "ct", seed=1, patient_id="MRN-1")
    bad = write_series(root / "bad" / "ct", seed=2, patient_id="MRN-2")
    bad[2].unlink()  # a missing slice: ingest's reader refuses the uneven gap


def test_batch_skips_a_bad_series_flags_empty_and_resumes(
    tmp_path: Path, tiny: tuple[Config, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, checkpoint = tiny
    (tmp_path / "cfg.yaml").write_text(config.to_yaml())
    _folder_with_a_bad_series(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["predict", "--config", str(tmp_path / "cfg.yaml"), "--model", str(checkpoint)]
    argv += ["--input", str(tmp_path / "in"), "--output", str(out)]
    monkeypatch.setattr("medseg.infer.run.predict", lambda model, trained, image, cfg, device: threshold(image))
    assert cli.main(argv) == cli.EXIT_SKIPPED  # finished, but one series failed

    rows = {r["series_id"]: r for r in read_tsv(out / "summary.tsv")}
    assert sorted(r["status"] for r in rows.values()) == ["failed", "predicted"]
    failures = read_tsv(out / "failures.tsv")
    assert len(failures) == 1 and "uneven slice spacing" in failures[0]["reason"]
    good = next(r for r in rows.values() if r["status"] == "predicted")
    assert good["empty"] == "false" and float(good["volume_ml_tumour"]) > 0
    for key in ("nifti", "dicom_seg", "qc"):
        assert (out / good[key]).exists()

    # A rerun does no work: the model is not even loaded; the failed series is retried (and fails again).
    def no_model(*_args: object) -> None:
        raise AssertionError("the model was loaded on a rerun")

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".gz", ".dcm", ".png")}
    monkeypatch.setattr("medseg.models.load_checkpoint", no_model)
    monkeypatch.setattr("medseg.infer.run.predict", no_model)
    _folder_without_bad = tmp_path / "in" / "bad"
    for f in _folder_without_bad.rglob("*.dcm"):
        f.unlink()
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_done_before"] == 1 and summary["n_predicted_now"] == 0 and summary["n_failed"] == 0


def test_empty_series_are_flagged_in_the_summary(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "key")
    checkpoint = save_checkpoint(config, tmp_path / "model.pt", background_bias=100.0)
    write_series(tmp_path / "in" / "pat")
    result = predict_run.run(config, str(checkpoint), tmp_path / "in", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_empty"] == 1 and summary["empty_series"] == [result.records[0]["series_id"]]
    assert read_tsv(tmp_path / "out" / "summary.tsv")[0]["empty"] == "true"


def test_model_reference_by_mlflow_run_id_and_uri(tmp_path: Path, tiny: tuple[Config, Path]) -> None:
    from medseg import tracking

    config, checkpoint = tiny
    config = config.model_copy(
        update={
            "tracking": config.tracking.model_copy(
                update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_dir": tmp_path / "artifacts"}
            )
        }
    )
    with tracking.run(config.tracking) as run_id:
        tracking.log_artifact(checkpoint, "train")
    by_id = predict_run.resolve_model(run_id, config, tmp_path / "cache").path
    by_uri = predict_run.resolve_model(f"runs:/{run_id}/train/model.pt", config, tmp_path / "cache").path
    assert by_id.read_bytes() == checkpoint.read_bytes() == by_uri.read_bytes()
    with pytest.raises(Exception, match="not a checkpoint file"):
        predict_run.resolve_model("no-such-model", config, tmp_path / "cache")

    # the registry: a version per registration, an alias moved by review, a checksum checked at every use
    first = tracking.register_model(config.tracking, run_id, "liver", checkpoint, {"best_val_dice": "0.5"})
    second = tracking.register_model(config.tracking, run_id, "liver", checkpoint, {})
    assert (first.version, second.version) == ("1", "2")
    assert tracking.registered_version(config.tracking, run_id, "liver") == "2"
    with pytest.raises(MedsegError, match="not found in the registry"):
        predict_run.resolve_model("models:/liver@champion", config, tmp_path / "cache")  # no alias yet
    tracking.set_alias(config.tracking, "liver", "1", "champion")
    champion = predict_run.resolve_model("models:/liver@champion", config, tmp_path / "cache")
    assert champion.registered is not None and champion.registered.label == "liver v1"
    assert champion.path == tmp_path / "cache" / "liver-v1" / "model.pt"
    assert champion.path.read_bytes() == checkpoint.read_bytes()
    assert predict_run.resolve_model("models:/liver/2", config, tmp_path / "cache").registered.version == "2"
    tracking.set_alias(config.tracking, "liver", "2", "champion")
    assert predict_run.resolve_model("models:/liver@champion", config, tmp_path / "cache").registered.version == "2"
    with pytest.raises(MedsegError, match="cannot set alias"):
        tracking.set_alias(config.tracking, "liver", "7", "champion")
    # a cached copy that no longer matches the registered checksum is refused, not used
    champion.path.write_bytes(champion.path.read_bytes() + b"tampered")
    with pytest.raises(ModelLoadError, match="SHA-256"):
        predict_run.resolve_model("models:/liver/1", config, tmp_path / "cache")
    with pytest.raises(MedsegError, match="models:/<name>@<alias>"):
        predict_run.resolve_model("models:/liver@", config, tmp_path / "cache")


def test_one_segment_per_instance_on_request(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "key", predict={"seg_instances": True})
    write_series(tmp_path / "in" / "pat")
    jobs, _, _ = predict_run.plan(config, tmp_path / "in")

    def two_lesions(image: Image) -> Label:
        label = np.zeros_like(image.array, dtype=np.uint8)
        label[0, 0:2, 0:3, 0:2] = 1  # 12 voxels (every axis of the series has 6 or more)
        label[0, 4:6, 4:6, 4:6] = 1  # 8 voxels, apart from the first
        label[0, 0, 5, 5] = 2
        return Label(label, image.affine.copy())

    out = tmp_path / "out"
    facts = predict_run.predict_series(jobs[0], two_lesions, CLASSES, config, out)
    assert [len(v) for v in facts["instances_ml"].values()] == [2, 1]
    assert facts["instances_ml"][CLASSES[0]][0] > facts["instances_ml"][CLASSES[0]][1]  # largest first
    assert_dciodvfy_ok(out / facts["outputs"]["dicom_seg"])
    seg = hd.seg.segread(out / facts["outputs"]["dicom_seg"])
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert labels == [f"{CLASSES[0]} 1", f"{CLASSES[0]} 2", f"{CLASSES[1]} 1"]
    assert [str(s.TrackingID) for s in seg.SegmentSequence] == labels
    assert len({str(s.TrackingUID) for s in seg.SegmentSequence}) == 3


def test_more_instances_than_segment_numbers_fall_back_to_one_segment_per_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A DICOM-SEG numbers its segments with 16 bits: a speckled prediction with more components than that gets one
    segment per class (and a warning), and ``instances_ml`` still counts every component."""
    from medseg.predict import dicom_seg

    monkeypatch.setattr(dicom_seg, "MAX_SEGMENTS", 2)  # 65535 in a DICOM-SEG; 3 components here
    config = tiny_config(tmp_path / "key", predict={"seg_instances": True})
    write_series(tmp_path / "in" / "pat")
    jobs, _, _ = predict_run.plan(config, tmp_path / "in")

    def two_lesions(image: Image) -> Label:
        label = np.zeros_like(image.array, dtype=np.uint8)
        label[0, 0:2, 0:3, 0:2] = 1
        label[0, 4:6, 4:6, 4:6] = 1
        label[0, 0, 5, 5] = 2
        return Label(label, image.affine.copy())

    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="medseg.predict.dicom_seg"):
        facts = predict_run.predict_series(jobs[0], two_lesions, CLASSES, config, out)
    assert [len(v) for v in facts["instances_ml"].values()] == [2, 1]
    assert sum("connected components" in r.getMessage() for r in caplog.records) == 1  # counted once
    assert_dciodvfy_ok(out / facts["outputs"]["dicom_seg"])
    seg = hd.seg.segread(out / facts["outputs"]["dicom_seg"])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(CLASSES)


def test_a_finished_series_is_redone_when_a_setting_that_shapes_it_changes(tmp_path: Path, tiny: tuple) -> None:
    config, checkpoint = tiny
    base = predict_run.model_identity(checkpoint, config)
    assert base == predict_run.model_identity(checkpoint, config, predict_run.file_sha256(checkpoint))
    crf = config.model_copy(
        update={"postprocess": config.postprocess.model_copy(update={"crf": CrfConfig(enabled=True)})}
    )
    instances = config.model_copy(update={"predict": config.predict.model_copy(update={"seg_instances": True})})
    assert (
        len({base, predict_run.model_identity(checkpoint, crf), predict_run.model_identity(checkpoint, instances)}) == 3
    )
