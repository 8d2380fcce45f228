"""The DICOM series reader: slice order, spacing from positions, rescale, oblique, multi-frame, compressed, refusals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, generate_uid

from medseg.config import validate_config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.errors import GeometryError
from medseg.ingest.dicom import read_series
from medseg.ingest.run import run
from medseg.io import read_json, read_volume, to_canonical
from medseg.volume import Image, Label


def _geometry(row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), step=2.5) -> SeriesGeometry:
    return SeriesGeometry(np.array([-10.0, 20.0, 30.0]), np.array(row), np.array(col), (0.7, 0.9), step)


def _hu(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float64)


def test_oblique_series_read_in_any_file_order_matches_written_volume(tmp_path):
    angle = np.deg2rad(20)
    geometry = _geometry(row=(np.cos(angle), np.sin(angle), 0.0), col=(0.0, 0.0, -1.0), step=-3.0)
    hu = _hu()
    files = write_ct_series(hu, geometry, Identity("A^B", "123"), tmp_path, rescale_slope=0.5, rescale_intercept=-1024)
    series = read_series(list(reversed(files)))
    image, facts = series.image, series.facts
    # A negative step reverses slice order: the reader sorts along the normal, so expect the flipped stack.
    np.testing.assert_allclose(image.array[0], hu[:, :, ::-1], atol=0.5)
    expected = geometry.ras_affine() @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-4)
    assert facts["source_spacing_mm"] == pytest.approx([0.9, 0.7, 3.0])


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path):
    files = write_ct_series(_hu(), _geometry(step=2.0), Identity("A^B", "123"), tmp_path)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "3"  # as in the TotalSegmentator export: thickness 3, step 2
        ds.save_as(path)
    image = read_series(files).image
    assert image.spacing[2] == pytest.approx(2.0)


def test_missing_slice_is_refused_naming_the_gap(tmp_path):
    files = write_ct_series(_hu(shape=(4, 4, 6)), _geometry(step=2.0), Identity("A^B", "123"), tmp_path)
    files[3].unlink()
    with pytest.raises(GeometryError, match=r"gap of 4\.000 mm .*about 1\.0 missing slice"):
        read_series([f for f in files if f.exists()])


def test_mixed_sizes_and_orientations_are_refused(tmp_path):
    a = write_ct_series(_hu(shape=(4, 4, 3)), _geometry(), Identity("A^B", "1"), tmp_path / "a")
    b = write_ct_series(_hu(shape=(5, 4, 3)), _geometry(), Identity("A^B", "1"), tmp_path / "b")
    with pytest.raises(GeometryError, match="mixed image sizes"):
        read_series([a[0], a[1], b[2]])
    c = write_ct_series(_hu(shape=(4, 4, 3)), _geometry(col=(0.0, 0.0, 1.0)), Identity("A^B", "1"), tmp_path / "c")
    with pytest.raises(GeometryError, match="mixed orientations"):
        read_series([a[0], a[1], c[2]])


def test_real_series_with_uneven_gaps_is_refused(shared_data):
    folder = shared_data / "dicom" / "ct_slice_gaps_monai"
    with pytest.raises(GeometryError, match=r"uneven slice spacing: a gap of 202\.500 mm"):
        read_series(sorted(folder.iterdir()))


def _multiframe(files: list[Path]) -> Dataset:
    """An enhanced (multi-frame) object holding the given single-frame slices, geometry per frame."""
    slices = [pydicom.dcmread(p) for p in files]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = first.BitsStored, first.HighBit, first.PixelRepresentation
    ds.SOPClassUID, ds.Modality = ds.file_meta.MediaStorageSOPClassUID, "CT"
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    measures, orientation, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = first.PixelSpacing
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleSlope, rescale.RescaleIntercept = first.RescaleSlope, first.RescaleIntercept
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    groups = []
    order = [2, 0, 3, 1]  # frames stored out of slice order: the reader must sort them
    for k in order:
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = slices[k].ImagePositionPatient
        group.PlanePositionSequence = Sequence([position])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.PixelData = b"".join(slices[k].PixelData for k in order)
    return ds


def test_multiframe_object_reads_like_its_single_frame_series(tmp_path):
    geometry = _geometry(row=(0.0, 1.0, 0.0), col=(0.0, 0.0, -1.0), step=1.5)
    files = write_ct_series(_hu(shape=(5, 6, 4)), geometry, Identity("A^B", "1"), tmp_path / "single")
    path = tmp_path / "multi.dcm"
    _multiframe(files).save_as(path, enforce_file_format=True)
    single = read_series(files).image
    multi = read_series([path]).image
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)


def test_jpeg2000_lossless_series_decodes_to_the_uncompressed_values(tmp_path):
    files = write_ct_series(_hu(shape=(64, 64, 3)), _geometry(), Identity("A^B", "1"), tmp_path / "raw")
    compressed = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg encodes, as the TotalSegmentator export is stored
        out = tmp_path / "j2k" / path.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out)
        compressed.append(out)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(read_series(compressed).image.array, read_series(files).image.array)


def test_jpeg_lossless_series_decodes_to_the_uncompressed_values(tmp_path):
    """JPEG lossless (process 14), as many CT and MR archives store it: encoded here with imagecodecs' LJ92."""
    imagecodecs = pytest.importorskip("imagecodecs")  # a dev dependency; pydicom cannot encode this syntax
    files = write_ct_series(_hu(shape=(32, 24, 3)), _geometry(), Identity("A^B", "1"), tmp_path / "raw")
    compressed = []
    for path in files:
        ds = pydicom.dcmread(path)
        # Unsigned stored values (the encoder's domain); the intercept keeps the same Hounsfield units.
        stored = (ds.pixel_array.astype(np.int32) + 2048).astype(np.uint16)
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = str(float(ds.RescaleIntercept) - 2048)
        stream = imagecodecs.ljpeg_encode(stored, bitspersample=16)
        sos = stream.index(b"\xff\xda")
        predictor = stream[sos + 5 + 2 * stream[sos + 4]]
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1 if predictor == 1 else JPEGLossless
        ds.PixelData = encapsulate([stream])
        ds["PixelData"].VR = "OB"
        out = tmp_path / "ljpeg" / path.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out)
        compressed.append(out)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID in (JPEGLosslessSV1, JPEGLossless)
    np.testing.assert_array_equal(read_series(compressed).image.array, read_series(files).image.array)


def test_real_oblique_series_matches_simpleitk(shared_data, tmp_path):
    files = sorted((shared_data / "dicom" / "rtstruct_rtutils" / "oriented_data").glob("*.dcm"))
    image = read_series(files).image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reference = reader.Execute()
    ref_array = np.transpose(sitk.GetArrayFromImage(reference), (2, 1, 0))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    lps[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(image.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-3)
    np.testing.assert_allclose(image.array[0], ref_array, atol=1e-3)


def test_totalsegmentator_jpeg2000_ct_lies_under_its_segmentation(shared_data, tmp_path):
    """Acceptance: the ingested CT and example_seg_dicom.nii.gz share the canonical grid, and the organs sit where
    the CT says. The file uses TotalSegmentator v2's 'total' numbering (31 of its 117 classes present): liver 5,
    aorta 52, ribs 92-115; checked on the data: liver 89 HU, aorta 177 HU (contrast), ribs about 290 HU."""
    folder = shared_data / "dicom" / "ct_totalsegmentator"
    # Through ingest itself: the series and the segmentation beside it in one patient folder (links, not copies).
    case = tmp_path / "in" / "patient"
    case.mkdir(parents=True)
    for path in (folder / "example_ct_dicom").iterdir():
        os.symlink(path, case / path.name)
    os.symlink(folder / "example_seg_dicom.nii.gz", case / "example_seg_dicom.nii.gz")
    config = validate_config(
        {"classes": [f"class_{i}" for i in range(1, 118)], "ingest": {"pseudonym_key_file": str(tmp_path / "key")}}
    )
    result = run(config, tmp_path / "in", tmp_path / "out", tmp_path / "manifest.tsv")
    assert not result.failures, result.failures
    (row,) = result.rows
    sidecar = read_json(tmp_path / "out" / "sidecars" / f"{row['patient_id']}.json")
    assert sidecar["transfer_syntax"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless only
    ct = read_volume(row["image"], Image)  # canonical, as ingest wrote it
    seg = to_canonical(read_volume(folder / "example_seg_dicom.nii.gz", Label))  # stored LAS
    assert ct.spatial_shape == seg.spatial_shape == (512, 512, 20)
    np.testing.assert_allclose(ct.affine, seg.affine, atol=1e-3)
    assert ct.spacing[2] == pytest.approx(2.0)  # from positions; SliceThickness says 3
    np.testing.assert_array_equal(read_volume(row["label"], Label).array, seg.array)
    labels = seg.array[0]
    ribs = (labels >= 92) & (labels <= 115)

    def organs_fit(hu: np.ndarray) -> bool:
        liver, aorta = float(hu[labels == 5].mean()), float(hu[labels == 52].mean())
        return 0 < liver < 150 and 150 < aorta < 300 and float(hu[ribs].mean()) > 200

    hu = ct.array[0]
    assert organs_fit(hu), (float(hu[labels == 5].mean()), float(hu[labels == 52].mean()), float(hu[ribs].mean()))
    # The check can fail: a left-right, front-back or slice-order flip (the classic reader bugs) puts the labels on
    # other tissue (e.g. a left-right flip: aorta 109 HU, ribs about 110 HU).
    for axis in range(3):
        assert not organs_fit(np.flip(hu, axis))


def test_files_without_dcm_suffix_read(tmp_path, shared_data):
    source = shared_data / "dicom" / "ct_dicom_seg_dcmqi" / "ct-3slice"
    for i, path in enumerate(sorted(source.iterdir())):
        shutil.copy(path, tmp_path / f"IM{i}")
    series = read_series(sorted(tmp_path.iterdir()))
    image, facts = series.image, series.facts
    assert image.spatial_shape == (512, 512, 3)
    assert facts["modality"] == "CT"


def test_fast_uncompressed_path_equals_pydicom_pixel_array(shared_data):
    from medseg.ingest.dicom import _raw_pixels

    files = [
        *sorted((shared_data / "dicom" / "ct_dicom_seg_dcmqi" / "ct-3slice").iterdir()),
        *sorted((shared_data / "dicom" / "rtstruct_rtutils" / "oriented_data").glob("*.dcm")),
        *sorted((shared_data / "hospital_scans").rglob("*.dcm"))[::40],
        next((shared_data / "dicom" / "ct_totalsegmentator" / "example_ct_dicom").iterdir()),  # JPEG 2000: no
    ]
    taken = 0
    for path in files:
        ds = pydicom.dcmread(path)
        raw = _raw_pixels(ds, (int(ds.Rows), int(ds.Columns)))
        if raw is not None:
            taken += 1
            np.testing.assert_array_equal(raw, ds.pixel_array)
            assert raw.dtype == ds.pixel_array.dtype
    assert 3 <= taken < len(files)


def test_compressed_series_decode_through_gdcm_equals_pydicom(shared_data, monkeypatch):
    from medseg.ingest import dicom

    files = sorted((shared_data / "dicom" / "ct_totalsegmentator" / "example_ct_dicom").iterdir())
    calls = []
    real = dicom._gdcm_rescaled
    monkeypatch.setattr(dicom, "_gdcm_rescaled", lambda frame: calls.append(1) or real(frame))
    through_gdcm = dicom.read_series(files).image
    assert len(calls) == len(files)  # every slice, in the reading threads
    assert through_gdcm.array.dtype == np.int16  # slope 1, intercept -1024, 12 bits: exact in int16

    monkeypatch.setattr(dicom, "_gdcm_rescaled", lambda frame: None)  # GDCM unavailable: pydicom decodes all
    np.testing.assert_array_equal(dicom.read_series(files).image.array, through_gdcm.array)

    # GDCM disagreeing with pydicom on the first slice: the whole series goes through pydicom
    monkeypatch.setattr(dicom, "_gdcm_rescaled", lambda frame: real(frame) + 1)
    np.testing.assert_array_equal(dicom.read_series(files).image.array, through_gdcm.array)


def test_volume_is_int16_only_when_that_is_exact(tmp_path):
    hu = _hu(shape=(8, 8, 3))
    exact = read_series(write_ct_series(hu, _geometry(), Identity("A^B", "1"), tmp_path / "a")).image
    assert exact.array.dtype == np.int16  # signed 16-bit storage, intercept -1024: checked on the values
    wide = write_ct_series(hu + 40000, _geometry(), Identity("A^B", "1"), tmp_path / "w", rescale_intercept=39000)
    assert read_series(wide).image.array.dtype == np.int32
    halves = write_ct_series(hu, _geometry(), Identity("A^B", "1"), tmp_path / "b", rescale_slope=0.5)
    scaled = read_series(halves).image
    assert scaled.array.dtype == np.float32
    np.testing.assert_array_equal(scaled.array, exact.array.astype(np.float32))
