"""Radiographs from DICOM (DX/CR): read in the PNG layout, predicted, answered with a DICOM-SEG on the radiograph."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from predict_helpers import assert_dciodvfy_ok, tiny_config

from medseg.demo_data.dicom import Identity, write_dx_image
from medseg.demo_data.xray import radiograph
from medseg.errors import GeometryError
from medseg.ingest.dicom import read_series
from medseg.ingest.labels import read_seg
from medseg.ingest.run import run as ingest
from medseg.io import read_volume, to_canonical
from medseg.predict import run as predict_run
from medseg.volume import Image, Label

IDENTITY = Identity(patient_name="Roe^Richard", patient_id="MRN-424242", accession_number="ACC-9911")


def test_a_dx_radiograph_reads_as_the_same_picture_does_from_png(tmp_path: Path) -> None:
    picture, _ = radiograph(np.random.default_rng(3), (48, 64))  # 48 rows, 64 columns
    PILImage.fromarray(picture).save(tmp_path / "xray.png")
    dx = write_dx_image(picture, 0.4, IDENTITY, tmp_path / "dicom" / "xray.dcm")
    from_png = read_volume(tmp_path / "xray.png", Image)
    from_dicom = to_canonical(read_series([dx]).image)
    assert from_png.spatial_shape == from_dicom.spatial_shape == (64, 48, 1)  # columns along X, rows along Y
    assert from_dicom.spacing == pytest.approx((0.4, 0.4, 1.0))
    assert np.allclose(from_dicom.array, from_png.array * 4095 / 255, atol=0.51)  # 12 stored bits, same layout
    # no spacing at all: 1 mm pixels, as a PNG; a broken spacing is refused with the file named
    ds = pydicom.dcmread(dx)
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    ds.save_as(tmp_path / "dicom" / "nospacing.dcm")
    assert read_series([tmp_path / "dicom" / "nospacing.dcm"]).image.spacing == pytest.approx((1.0, 1.0, 1.0))
    ds.ImagerPixelSpacing = ["0", "0.4"]
    ds.save_as(tmp_path / "dicom" / "badspacing.dcm")
    with pytest.raises(GeometryError, match=r"badspacing\.dcm: PixelSpacing must be positive"):
        read_series([tmp_path / "dicom" / "badspacing.dcm"])


def test_predict_answers_a_dx_radiograph_with_a_valid_seg_on_it(tmp_path: Path) -> None:
    rule = {"modalities": ["DX", "CR"], "min_slices": 1}
    config = tiny_config(tmp_path / "key", ingest={"pseudonym_key_file": str(tmp_path / "key"), "series": rule})
    picture, _ = radiograph(np.random.default_rng(4), (40, 56))
    source = write_dx_image(picture, 0.5, IDENTITY, tmp_path / "in" / "Roe_Richard" / "chest.dcm")
    jobs, _, _ = predict_run.plan(config, tmp_path / "in")
    assert len(jobs) == 1 and jobs[0].modality == "DX"

    def box(image: Image) -> Label:  # class 1 on columns 5-19, rows 10-29 of the radiograph
        assert image.spatial_shape == (56, 40, 1)
        label = np.zeros_like(image.array, dtype=np.uint8)
        label[0, 5:20, 10:30, 0] = 1
        label[0, 30:33, 2:4, 0] = 2
        return Label(label, image.affine.copy())

    out = tmp_path / "out"
    facts = predict_run.predict_series(jobs[0], box, ["lung", "marker"], config, out)
    nifti = read_volume(out / facts["outputs"]["nifti"], Label)
    assert nifti.spatial_shape == (56, 40, 1) and int(nifti.array.sum()) == 15 * 20 + 2 * 3 * 2
    seg_path = out / facts["outputs"]["dicom_seg"]
    assert_dciodvfy_ok(seg_path)
    seg = hd.seg.segread(seg_path)
    assert "FrameOfReferenceUID" not in seg and list(seg.PatientOrientation) == ["L", "F"]
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == pydicom.dcmread(source).SOPInstanceUID
    lung = seg.get_pixels_by_source_instance(  # (rows, columns) of the radiograph, the segment's own frame
        source_sop_instance_uids=[referenced], segment_numbers=[1]
    )[0, :, :, 0]
    expected = np.zeros((40, 56), bool)
    expected[10:30, 5:20] = True
    assert np.array_equal(lung.astype(bool), expected)
    for path in out.rglob("*"):  # no identity in the output's names
        assert not any(v in str(path) for v in ("Roe", "Richard", "424242", "ACC-9911"))

    # the radiograph and its SEG as training data: ingest reads the SEG by the instance it references
    train_in = tmp_path / "train_in" / "case"
    train_in.mkdir(parents=True)
    shutil.copy(source, train_in / "image.dcm")
    shutil.copy(seg_path, train_in / "label.dcm")
    result = ingest(config, tmp_path / "train_in", tmp_path / "ingested", tmp_path / "manifest.tsv")
    assert len(result.rows) == 1 and not result.failures
    image = read_volume(result.rows[0]["image"], Image)
    label = read_volume(result.rows[0]["label"], Label)
    assert image.spatial_shape == label.spatial_shape == (56, 40, 1)
    assert np.array_equal(label.array, nifti.array)  # the same picture layout as predict's NIfTI
    with pytest.raises(GeometryError, match=r"label\.dcm: does not segment the radiograph"):
        other = write_dx_image(picture, 0.5, IDENTITY, tmp_path / "other.dcm")
        read_seg(train_in / "label.dcm", read_series([other]), 0.01, "refuse")
