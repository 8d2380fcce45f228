"""Pure functions of `medseg predict`: orientation back to the source grid, frames of a DICOM series, volumes.

Arrays follow medseg's convention, channel-first ``(C, X, Y, Z)`` with a 4x4 RAS affine. A DICOM series read by
:func:`medseg.ingest.dicom.read_series` has X = columns, Y = rows, Z = slices in the order of increasing position
along the slice normal; a DICOM frame is ``(rows, columns)``, so frame ``k`` is ``array[0, :, :, k].T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from medseg.errors import GeometryError
from medseg.volume import Label, describe_grid

# Slicer's generic anatomy colours: distinct on grey MR and CT, and what radiologists are used to seeing.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
)


def default_color(index: int) -> tuple[int, int, int]:
    """Palette colour of class ``index`` (1-based; background has none)."""
    return PALETTE[(index - 1) % len(PALETTE)]


def from_canonical(label: Label, affine: np.ndarray, shape: Sequence[int], tolerance_mm: float = 1e-3) -> Label:
    """Undo :func:`medseg.io.to_canonical`: permute and flip ``label`` back onto the grid ``(affine, shape)``.

    No resampling happens: the source grid must be the same voxels in another axis order, as it is for a
    prediction on a canonicalised image.

    Args:
        label: ``(C, X, Y, Z)`` on the canonical (RAS) grid.
        affine: the source grid's 4x4 RAS affine.
        shape: the source grid's spatial shape.
        tolerance_mm: allowed affine difference after reorientation.

    Returns:
        The label on the source grid, with exactly ``affine``.

    Raises:
        GeometryError: the two grids are not the same voxels.
    """
    target = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    current = nib.orientations.io_orientation(label.affine)
    transform = nib.orientations.ornt_transform(current, target)
    array = np.stack([nib.orientations.apply_orientation(c, transform) for c in label.array])
    moved = label.affine @ nib.orientations.inv_ornt_aff(transform, label.spatial_shape)
    result = Label(np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64).copy())
    if tuple(array.shape[1:]) != tuple(int(s) for s in shape) or not np.allclose(moved, affine, atol=tolerance_mm):
        raise GeometryError(
            "the prediction's grid is not a reorientation of the source grid: "
            f"prediction {describe_grid(Label(array, moved))}; source {describe_grid(result)}"
        )
    return result


def label_to_frames(label: Label) -> np.ndarray:
    """DICOM frames ``(slices, rows, columns)`` of a label on a series' source grid (see the module docstring)."""
    return np.ascontiguousarray(np.transpose(label.array[0], (2, 1, 0)))


def frames_to_label(frames: np.ndarray, affine: np.ndarray) -> Label:
    """Inverse of :func:`label_to_frames`."""
    return Label(np.ascontiguousarray(np.transpose(frames, (2, 1, 0))[None]), np.asarray(affine, dtype=np.float64))


def class_volumes_ml(label: Label, n_classes: int) -> list[float]:
    """Volume in millilitres of each foreground class ``1..n_classes``."""
    voxel_ml = float(np.prod(label.spacing)) / 1000.0
    counts = np.bincount(label.array.ravel(), minlength=n_classes + 1)
    return [float(counts[i]) * voxel_ml for i in range(1, n_classes + 1)]
