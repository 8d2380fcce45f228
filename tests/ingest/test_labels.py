"""Labels onto their image: DICOM-SEG, RTSTRUCT, NRRD; linking to the referenced series; off-grid labels refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medseg.config import validate_config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.errors import GeometryError, ImageReadError
from medseg.ingest.labels import combine_masks, place_on_grid, rasterise_contours
from medseg.ingest.run import run
from medseg.io import read_json, read_tsv, read_volume, to_canonical, write_volume
from medseg.volume import Image, Label


def _link(files: list[tuple[Path, str]], root: Path) -> Path:
    """An input folder of symbolic links to the shared data (never copied into the repository)."""
    for source, name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), root / name)
    return root


def _ingest(tmp_path: Path, **ingest):
    config = validate_config(
        {"classes": [f"class_{i}" for i in range(5)], "ingest": {"pseudonym_key_file": str(tmp_path / "key"), **ingest}}
    )
    return run(config, tmp_path / "in", tmp_path / "out", tmp_path / "manifest.tsv")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


# place_on_grid: hand-checkable grids


def test_place_on_grid_handles_flips_permutations_and_offsets():
    dst = np.diag([2.0, 3.0, 4.0, 1.0])
    src_array = np.arange(2 * 3 * 1).reshape(2, 3, 1) + 1
    # Source axes: (dst z reversed, dst x, dst y), starting at voxel (1, 0, 3).
    src = np.zeros((4, 4))
    src[:3, 0] = [0, 0, -4.0]
    src[:3, 1] = [2.0, 0, 0]
    src[:3, 2] = [0, 3.0, 0]
    src[:3, 3] = [2.0 * 1, 0, 4.0 * 3]
    src[3, 3] = 1
    out = place_on_grid(src_array, src, dst, (5, 2, 4), 0.01, "test")
    for a in range(2):
        for b in range(3):
            assert out[1 + b, 0, 3 - a] == src_array[a, b, 0]
    assert int((out > 0).sum()) == 6


def test_place_on_grid_refuses_half_voxel_shift_and_other_spacing_naming_both_grids():
    dst = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted = dst.copy()
    shifted[0, 3] = 0.5
    with pytest.raises(GeometryError, match=r"a fraction of a voxel.*image shape \[4, 4, 4\].*label shape \[2, 2, 2\]"):
        place_on_grid(np.ones((2, 2, 2)), shifted, dst, (4, 4, 4), 0.01, "SEG x.dcm")
    with pytest.raises(GeometryError, match="spacing or direction"):
        place_on_grid(np.ones((2, 2, 2)), np.diag([1.1, 1.0, 1.0, 1.0]), dst, (4, 4, 4), 0.01, "SEG x.dcm")
    with pytest.raises(GeometryError, match="outside the image"):
        place_on_grid(np.ones((5, 1, 1)), dst, dst, (4, 4, 4), 0.01, "SEG x.dcm")


def test_combine_masks_refuses_or_lets_the_higher_value_win():
    a, b = np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    with pytest.raises(ImageReadError, match="1 voxel"):
        combine_masks([(1, a), (2, b)], "refuse", "SEG x.dcm")
    merged, n = combine_masks([(2, b), (1, a)], "last_wins", "SEG x.dcm")
    assert merged.tolist() == [1, 2, 2, 0] and n == 1


def test_rasterise_contour_square_with_hole():
    lps = np.eye(4)
    outer = np.array([[1.5, 1.5, 2], [6.5, 1.5, 2], [6.5, 6.5, 2], [1.5, 6.5, 2]], float)
    inner = np.array([[3.5, 3.5, 2], [4.5, 3.5, 2], [4.5, 4.5, 2], [3.5, 4.5, 2]], float)
    mask = rasterise_contours([outer, inner], lps, (8, 8, 4), 0.05, "RTSTRUCT x")
    assert int(mask[:, :, 2].sum()) == 25 - 1 and not mask[4, 4, 2] and mask[2, 2, 2]
    assert not mask[:, :, [0, 1, 3]].any()
    with pytest.raises(GeometryError, match="off the nearest slice plane"):
        rasterise_contours([outer + np.array([0, 0, 0.5])], lps, (8, 8, 4), 0.05, "RTSTRUCT x")


# Real label objects through ingest


@pytest.fixture
def dcmqi(shared_data) -> Path:
    return shared_data / "dicom" / "ct_dicom_seg_dcmqi"


def _ct3(dcmqi: Path) -> list[tuple[Path, str]]:
    return [(p, f"patient/ct/{p.name}") for p in sorted((dcmqi / "ct-3slice").iterdir())]


def test_dicom_seg_liver_equals_dcmqi_nrrd(tmp_path, dcmqi):
    """Acceptance: liver.dcm ingests to a mask equal to liver_seg.nrrd (Dice 1.0 on the same grid)."""
    _link([*_ct3(dcmqi), (dcmqi / "liver.dcm", "elsewhere/seg_object")], tmp_path / "in")
    result = _ingest(tmp_path)
    assert len(result.rows) == 1 and not result.failures
    label = read_volume(result.rows[0]["label"], Label)
    reference = to_canonical(read_volume(dcmqi / "liver_seg.nrrd", Label))  # NRRD via SimpleITK
    assert label.spatial_shape == reference.spatial_shape
    np.testing.assert_allclose(label.affine, reference.affine, atol=1e-3)
    assert reference.array.sum() > 10_000
    assert _dice(label.array > 0, reference.array > 0) == 1.0
    sidecar = read_json(tmp_path / "out" / "sidecars" / f"{result.rows[0]['patient_id']}.json")
    assert sidecar["label_source"] == "dicom-seg" and sidecar["label_values"] == {"1": "Liver"}
    chosen = [r for r in result.series_report if r["status"] == "chosen"]
    assert "referenced by a label object" in chosen[0]["reason"]


def test_overlapping_segments_refused_by_default_and_last_wins_when_asked(tmp_path, dcmqi):
    _link([*_ct3(dcmqi), (dcmqi / "partial_overlaps.dcm", "patient/seg.dcm")], tmp_path / "in")
    refused = _ingest(tmp_path)
    assert refused.rows[0]["label"] == ""  # the image is kept, the label refused
    assert any("belong to more than one segment" in f["reason"] for f in refused.failures)
    kept = _ingest(tmp_path, label_overlap="last_wins")
    label = read_volume(kept.rows[0]["label"], Label).array[0]
    sidecar = read_json(tmp_path / "out" / "sidecars" / f"{kept.rows[0]['patient_id']}.json")
    assert sidecar["label_overlap_policy"] == "last_wins" and sidecar["label_overlap_voxels"] > 0
    # dcmqi's partial_overlaps-N.nrrd hold the segments; where segment 3 is set, last-wins keeps 3 or higher.
    seg3 = to_canonical(read_volume(dcmqi / "partial_overlaps-3.nrrd", Label)).array[0] > 0
    assert seg3.any() and (label[seg3] >= 3).all()
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 5}


def test_rtstruct_phantom_rasterised_and_broken_references_refused(tmp_path, shared_data):
    """Acceptance: the RTSTRUCT phantom ingests to a non-empty mask inside the image; the RTSTRUCTs with broken
    references are refused with a clear message."""
    mock = shared_data / "dicom" / "rtstruct_rtutils" / "mock_data"
    _link([(p, f"patient/{p.name}") for p in sorted(mock.iterdir())], tmp_path / "in")
    result = _ingest(tmp_path, series={"min_slices": 2})  # the phantom CT has 2 slices
    assert len(result.rows) == 1
    label = read_volume(result.rows[0]["label"], Label)
    image = read_volume(result.rows[0]["image"], Image)
    assert label.spatial_shape == image.spatial_shape
    voxels = int((label.array > 0).sum())
    assert 0 < voxels < label.array.size / 2
    reasons = {f["source"].split("/")[-1]: f["reason"] for f in result.failures}
    assert "image that is not in the series it references" in reasons["invalid_reference_rt.dcm"]
    assert "names no referenced series" in reasons["non_existent_reference_rt.dcm"]


def test_label_file_off_the_image_grid_is_refused_with_both_geometries(tmp_path, dcmqi):
    """A label one voxel shifted is never resampled onto the image: the case is refused."""
    reference = read_volume(dcmqi / "liver_seg.nrrd", Label)
    shifted = reference.affine.copy()
    shifted[:3, 3] += [0.4, 0.0, 0.0]
    (tmp_path / "in" / "patient").mkdir(parents=True)
    write_volume(Label(reference.array, shifted), tmp_path / "in" / "patient" / "liver_seg.nii.gz")
    _link(_ct3(dcmqi), tmp_path / "in")
    result = _ingest(tmp_path)
    assert not result.rows
    (failure,) = [f for f in result.failures if f["patient_id"]]
    assert "not on its image's grid" in failure["reason"]
    assert failure["reason"].count("shape [512, 512, 3]") == 2 and "origin" in failure["reason"]
    rows = read_tsv(tmp_path / "out" / "failures.tsv")
    assert rows[0]["reason"] == failure["reason"]


def test_nrrd_label_beside_dicom_series_is_attached(tmp_path, dcmqi):
    _link([*_ct3(dcmqi), (dcmqi / "liver_seg.nrrd", "patient/liver_seg.nrrd")], tmp_path / "in")
    (tmp_path / "in" / "DICOMDIR").write_bytes(b"\0" * 132)  # an index, not data: ignored, not a failure
    result = _ingest(tmp_path)
    assert len(result.rows) == 1 and result.rows[0]["label"] and not result.failures
    sidecar = read_json(tmp_path / "out" / "sidecars" / f"{result.rows[0]['patient_id']}.json")
    assert sidecar["label_source"] == "nrrd"


def test_seg_for_a_series_not_in_the_input_is_reported(tmp_path, dcmqi):
    hu = np.zeros((4, 4, 3))
    geometry = SeriesGeometry(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (1.0, 1.0), 1.0)
    write_ct_series(hu, geometry, Identity("X^Y", "other"), tmp_path / "in" / "other")
    _link([(dcmqi / "liver.dcm", "other/liver.dcm")], tmp_path / "in")
    result = _ingest(tmp_path)
    assert any("references a series that is not in the input folder" in f["reason"] for f in result.failures)
