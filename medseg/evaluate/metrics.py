"""Segmentation metrics on boolean masks, distances in mm from the voxel spacing.

Empty-mask convention (stated once, used everywhere): when reference and prediction are both empty, every
metric is NaN (undefined; nnU-Net's convention), left out of means and counted in the summary. When exactly one
is empty, overlap metrics and boundary F1 are 0 and distance metrics are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EMPTY_CONVENTION = (
    "both reference and prediction empty: every metric NaN, excluded from means, counted as 'both_empty'; "
    "exactly one empty: Dice, IoU and boundary F1 are 0 and distances NaN"
)


def overlap(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks.

    >>> a = np.array([1, 1, 1, 0, 0, 0], bool); b = np.array([0, 1, 1, 1, 0, 0], bool)
    >>> overlap(a, b)
    (0.6666666666666666, 0.5)
    """
    inter = int(np.count_nonzero(pred & ref))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return float("nan"), float("nan")
    return 2 * inter / total, inter / (total - inter)


def _crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel: distance transforms then cost
    in proportion to the structures, not the scan, and stay exact (every boundary point lies inside)."""
    coords = np.argwhere(pred | ref)
    lo, hi = coords.min(0), coords.max(0) + 1
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return np.pad(pred[slices], 1), np.pad(ref[slices], 1)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with at least one face-neighbour outside it."""
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction boundary voxel to the reference boundary, and the reverse.

    Both masks must be non-empty.
    """
    p, r = _crop(pred, ref)
    bp, br = _boundary(p), _boundary(r)
    to_ref = ndimage.distance_transform_edt(~br, sampling=spacing_mm)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing_mm)
    return to_ref[bp], to_pred[br]


def boundary_f1(d_pred_to_ref: np.ndarray, d_ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    """Boundary F1 (Csurka et al. 2013): precision = share of predicted boundary points within ``tolerance_mm``
    of the reference boundary, recall the reverse, F1 their harmonic mean."""
    precision = float(np.mean(d_pred_to_ref <= tolerance_mm))
    recall = float(np.mean(d_ref_to_pred <= tolerance_mm))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def class_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """All metrics of one class in one patient; see the module docstring for empty masks."""
    dice, iou = overlap(pred, ref)
    voxel_mm3 = float(np.prod(spacing_mm))
    result = {
        "dice": dice,
        "iou": iou,
        "boundary_f1": float("nan"),
        "ref_volume_mm3": np.count_nonzero(ref) * voxel_mm3,
        "pred_volume_mm3": np.count_nonzero(pred) * voxel_mm3,
    }
    if pred.any() and ref.any():
        d_pr, d_rp = surface_distances(pred, ref, spacing_mm)
        result["boundary_f1"] = boundary_f1(d_pr, d_rp, tolerance_mm)
    elif pred.any() or ref.any():
        result["boundary_f1"] = 0.0
    return result
