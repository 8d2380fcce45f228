"""Orientation back to the source grid, DICOM frame layout, QC slice choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medseg.errors import GeometryError
from medseg.io import to_canonical
from medseg.predict.functional import class_volumes_ml, frames_to_label, from_canonical, label_to_frames
from medseg.qc import pick_slices
from medseg.volume import Label


def _oriented_label(permutation: tuple[int, int, int], flips: tuple[int, int, int], seed: int) -> Label:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 3, size=(1, 5, 6, 7)).astype(np.uint8)
    spacing = np.array([0.7, 1.1, 2.5])
    affine = np.eye(4)
    for axis, (target, flip) in enumerate(zip(permutation, flips, strict=True)):
        affine[target, axis] = spacing[axis] * (-1 if flip else 1)
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return Label(array, affine)


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(3))))
def test_from_canonical_undoes_to_canonical(permutation: tuple[int, int, int]) -> None:
    for seed, flips in enumerate([(0, 0, 0), (1, 0, 1), (1, 1, 1)]):
        source = _oriented_label(permutation, flips, seed)
        canonical = to_canonical(source)
        back = from_canonical(canonical, source.affine, source.spatial_shape)
        assert np.array_equal(back.array, source.array)
        assert np.allclose(back.affine, source.affine)


def test_from_canonical_refuses_another_grid() -> None:
    source = _oriented_label((1, 0, 2), (1, 0, 0), 0)
    canonical = to_canonical(source)
    shifted = source.affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(GeometryError, match="not a reorientation"):
        from_canonical(canonical, shifted, source.spatial_shape)


def test_frames_are_source_slices_rows_by_columns() -> None:
    label = _oriented_label((0, 1, 2), (0, 0, 0), 3)
    frames = label_to_frames(label)
    assert frames.shape == (7, 6, 5)  # (slices, rows = Y, columns = X)
    assert np.array_equal(frames[4], label.array[0, :, :, 4].T)
    assert np.array_equal(frames_to_label(frames, label.affine).array, label.array)


def test_class_volumes_by_hand() -> None:
    array = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    array[0, :2, 0, 0] = 1  # 2 voxels of class 1
    affine = np.diag([2.0, 5.0, 10.0, 1.0])  # 100 mm3 per voxel
    assert class_volumes_ml(Label(array, affine), 2) == [0.2, 0.0]


def test_qc_slices_follow_the_foreground() -> None:
    label = np.zeros((4, 4, 30), dtype=np.uint8)
    label[1, 1, 10:21] = 2
    assert pick_slices(label, 3) == [10, 15, 20]
    empty = pick_slices(np.zeros((4, 4, 30), dtype=np.uint8), 4)
    assert len(empty) == 4 and min(empty) > 0 and max(empty) < 29


def test_instance_volumes_from_the_dicom_seg_numbering_equal_the_per_class_count() -> None:
    """``medseg predict`` with ``seg_instances`` finds each class's components once (the DICOM-SEG's numbering) and
    reads the volumes of ``instances.tsv`` off it: the same volumes, in the same largest-first order, as counting
    each class's components on its own."""
    from medseg.predict.dicom_seg import instance_segments
    from medseg.predict.run import instances_ml

    rng = np.random.default_rng(7)
    array = (rng.random((1, 24, 20, 12)) > 0.8).astype(np.uint8) * rng.integers(1, 4, size=(1, 24, 20, 12))
    array[0, 2:9, 2:9, 2:9] = 2  # one large component among the specks
    label = Label(array.astype(np.uint8), np.diag([0.8, 0.9, 2.5, 1.0]))
    classes = ["a", "b", "c"]
    once = instances_ml(label, classes, instance_segments(label.array[0], len(classes)))
    assert once == instances_ml(label, classes)
    assert all(len(v) > 5 for v in once.values()) and once["b"][0] == max(once["b"])
