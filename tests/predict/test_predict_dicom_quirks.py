"""Real archives' DICOM quirks: an oblique MR series whose slices write the same orientation with different decimal
digits reads fine, and must also get a valid DICOM-SEG (highdicom compares the written values exactly)."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from predict_helpers import CLASSES, assert_dciodvfy_ok, make_mr, tiny_config

from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.io import read_volume
from medseg.predict import run as predict_run
from medseg.predict.dicom_seg import harmonised_sources, source_frames
from medseg.volume import Image, Label

# A slightly oblique coronal MR; -0.0597709 is written "-0.059771" on every other slice.
ROW = np.array([np.sqrt(1.0 - 0.0597709**2), -0.0597709, 0.0])
COL = np.array([0.0, 0.0, -1.0])


def _iop_strings(digits: int) -> list[str]:
    return [f"{v:.{digits}g}" if abs(v) > 1e-12 else "0" for v in (*ROW, *COL)]


def write_quirky_mr(folder: Path, shape: tuple[int, int, int] = (32, 32, 8)) -> list[Path]:
    """An oblique MR series with a bright ball; odd slices write the orientation with one digit fewer."""
    geometry = SeriesGeometry(
        origin=np.array([-20.0, -30.0, 15.0]), row_dir=ROW, col_dir=COL, pixel_spacing=(0.9375, 0.9375), slice_step=4.0
    )
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    ball = np.linalg.norm((grid - np.array([14, 17, 4])) * np.array([1.0, 1.0, 4.0]), axis=-1) < 9
    values = rng.normal(100.0, 10.0, shape) + 500.0 * ball
    ident = Identity(patient_name="Roe^Richard", patient_id="MRN-4242")
    files = make_mr(write_ct_series(values, geometry, ident, folder))
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = _iop_strings(7 if k % 2 else 5)
        ds.PixelSpacing = ["0.9375", "0.937500"] if k % 2 else ["0.9375", "0.9375"]
        ds.SliceThickness = "4" if k % 2 else "4.000000"
        ds.save_as(path, enforce_file_format=True)
    return files


def threshold(image: Image) -> Label:
    return Label((image.array > 350.0).astype(np.uint8), image.affine.copy())


def test_the_quirk_is_real_and_harmonising_fixes_only_the_copies(tmp_path: Path) -> None:
    files = write_quirky_mr(tmp_path / "mr")
    written = {str(pydicom.dcmread(f).ImageOrientationPatient[1]) for f in files}
    assert written == {"-0.059771", "-0.0597709"}  # the quirk as real archives write it
    frames, _ = source_frames(files, 0.05)
    datasets = [f.dataset for f in frames]
    before = [copy.deepcopy(ds.ImageOrientationPatient) for ds in datasets]
    harmonised = harmonised_sources(datasets)
    for keyword in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        assert len({str(ds[keyword].value) for ds in datasets}) == 2, keyword  # the synthetic quirk is there
        assert len({str(ds[keyword].value) for ds in harmonised}) == 1, keyword
    assert [ds.SOPInstanceUID for ds in harmonised] == [ds.SOPInstanceUID for ds in datasets]
    assert [ds.ImagePositionPatient for ds in harmonised] == [ds.ImagePositionPatient for ds in datasets]
    assert [ds.ImageOrientationPatient for ds in datasets] == before  # the caller's headers are untouched
    with pytest.raises(ValueError, match="shared orientation"):  # what highdicom does without the harmonising
        hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=np.zeros((len(datasets), 32, 32), dtype=np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[
                hd.seg.SegmentDescription(
                    segment_number=1,
                    segment_label="x",
                    segmented_property_category=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
                    segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                )
            ],
            series_instance_uid=hd.UID(),
            series_number=1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="t",
            manufacturer_model_name="t",
            software_versions="0",
            device_serial_number="0",
        )


def test_oblique_mr_with_mixed_decimals_gets_a_valid_seg_equal_to_the_nifti(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "key")
    files = write_quirky_mr(tmp_path / "in" / "pat" / "mr")
    jobs, failures, _ = predict_run.plan(config, tmp_path / "in")
    assert len(jobs) == 1 and not failures
    out = tmp_path / "out"
    facts = predict_run.predict_series(jobs[0], threshold, CLASSES, config, out)
    assert not facts["empty"]
    seg_path = out / facts["outputs"]["dicom_seg"]
    assert_dciodvfy_ok(seg_path)

    nifti = read_volume(out / facts["outputs"]["nifti"], Label)
    assert nifti.spatial_shape == (32, 32, 8)
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(s.SOPInstanceUID) for s in sources}  # every source instance, none dropped
    uids = [str(s.SOPInstanceUID) for s in sources]
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    compared = 0
    for source, frame in zip(sources, decoded, strict=True):
        # The NIfTI slice of this DICOM slice, found from its own position (LPS -> RAS), not from our ordering.
        ras = np.array([-1.0, -1.0, 1.0]) * np.array([float(v) for v in source.ImagePositionPatient])
        i, j, k = np.linalg.solve(nifti.affine[:3, :3], ras - nifti.affine[:3, 3])
        assert abs(i) < 1e-2 and abs(j) < 1e-2 and abs(k - round(k)) < 1e-2
        assert np.array_equal(frame, nifti.array[0, :, :, round(k)].T)  # NIfTI X = columns, Y = rows
        compared += int(frame.sum())
    assert compared > 50
