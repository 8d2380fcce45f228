"""Metrics cross-checked against hand computation, MONAI and a brute-force reference on the same inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric
from scipy import ndimage

from medseg.metrics import class_metrics, label_results, overlap

SPACINGS = [(0.7, 1.3, 3.0), (2.5, 0.8, 0.8), (1.0, 1.0, 1.0)]


def _blob(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A lumpy random structure: smoothed noise thresholded, so boundaries are irregular."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    return field > np.quantile(field, 0.7)


def _brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary by the definition, voxel by voxel: in the mask with a face-neighbour outside (or off the array)."""
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(3), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                out[idx] = True
                break
    return out


def _brute_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """For every boundary point of ``a``, the minimum over ALL boundary points of ``b`` (pairwise, in mm)."""
    pa = np.argwhere(_brute_boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_boundary(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def _onehot(mask: np.ndarray) -> torch.Tensor:
    """(1, 2, X, Y, Z) background + foreground, as MONAI's metrics expect."""
    m = torch.as_tensor(mask)
    return torch.stack([~m, m]).float()[None]


def test_dice_iou_on_a_line_by_hand() -> None:
    line = np.zeros((1, 1, 6), bool)
    line[0, 0, :4] = True  # 4 voxels
    pred = np.zeros_like(line)
    pred[0, 0, 2:5] = True  # 3 voxels, 2 shared
    metrics = class_metrics(pred, line, (1.0, 1.0, 1.0))
    assert metrics["dice"] == pytest.approx(2 * 2 / (4 + 3), abs=1e-6)
    assert metrics["iou"] == pytest.approx(2 / 5, abs=1e-6)
    assert metrics["ref_volume_mm3"] == 4.0 and metrics["pred_volume_mm3"] == 3.0
    # Along a one-voxel line every voxel is boundary: pred {2,3,4} vs ref {0,1,2,3} at 2 mm per voxel.
    m2 = class_metrics(pred, line, (1.0, 1.0, 2.0), boundary_tolerance_mm=1.0, surface_tolerance_mm=1.0)
    # pred->ref distances 0, 0, 2; ref->pred 4, 2, 0, 0 (mm)
    precision, recall = 2 / 3, 2 / 4
    assert m2["boundary_f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-9)
    assert m2["surface_dice"] == pytest.approx(4 / 7, abs=1e-9)
    assert m2["msd_mm"] == pytest.approx((0 + 0 + 2 + 4 + 2 + 0 + 0) / 7, abs=1e-9)
    assert m2["ref_volume_mm3"] == 8.0


def test_overlap_of_disjoint_and_identical_masks() -> None:
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    assert overlap(a, a) == (1.0, 1.0)
    assert overlap(a, ~a) == (0.0, 0.0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_distances_agree_with_monai(spacing: tuple[float, float, float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _blob(rng, (30, 26, 18))
    pred = ndimage.binary_dilation(ref, iterations=1) if seed else _blob(rng, (30, 26, 18)) | ref
    pred = pred & (rng.random(pred.shape) > 0.02)  # speckle holes make the boundary ragged
    ours = class_metrics(pred, ref, spacing, boundary_tolerance_mm=1.5, surface_tolerance_mm=1.5)
    y_pred, y = _onehot(pred), _onehot(ref)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95)(y_pred, y, spacing=spacing)
    nsd = SurfaceDiceMetric(class_thresholds=[1.5], include_background=False)(y_pred, y, spacing=spacing)
    msd = SurfaceDistanceMetric(include_background=False, symmetric=True)(y_pred, y, spacing=spacing)
    diagonal = float(np.linalg.norm(spacing))
    # Same boundary definition and the same exact Euclidean distances: they agree to float32 precision,
    # far inside the one-voxel-diagonal bound the acceptance asks for.
    assert abs(ours["hd95_mm"] - float(hd95)) <= 1e-4 * diagonal
    assert abs(ours["msd_mm"] - float(msd)) <= 1e-4 * diagonal
    assert ours["surface_dice"] == pytest.approx(float(nsd), abs=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS[:2])
def test_boundary_f1_and_distances_against_brute_force(spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(3)
    ref = _blob(rng, (14, 12, 10))
    pred = np.roll(ref, 1, axis=0) & (rng.random(ref.shape) > 0.05)
    tol = 1.7  # off the voxel lattice: ties at the tolerance are tested separately
    ours = class_metrics(pred, ref, spacing, boundary_tolerance_mm=tol, surface_tolerance_mm=tol)
    d_pr, d_rp = _brute_distances(pred, ref, spacing), _brute_distances(ref, pred, spacing)
    precision, recall = np.mean(d_pr <= tol), np.mean(d_rp <= tol)
    assert ours["boundary_f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-9)
    expected_hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    assert ours["hd95_mm"] == pytest.approx(expected_hd95, abs=1e-9)
    assert ours["msd_mm"] == pytest.approx(np.concatenate([d_pr, d_rp]).mean(), abs=1e-9)


@pytest.mark.parametrize(("spacing", "tol"), [((1.0, 1.0, 1.0), 2.0), ((0.8, 0.8, 0.8), 1.6), ((0.7, 0.7, 0.7), 2.1)])
def test_points_exactly_at_the_tolerance_count_as_within(spacing: tuple[float, float, float], tol: float) -> None:
    ref = np.zeros((12, 6, 6), bool)
    ref[2:6, 1:5, 1:5] = True
    shift = round(tol / spacing[0])
    pred = np.roll(ref, shift, axis=0)  # every boundary point moves by exactly ``tol`` mm
    metrics = class_metrics(pred, ref, spacing, boundary_tolerance_mm=tol, surface_tolerance_mm=tol)
    assert metrics["boundary_f1"] == 1.0 and metrics["surface_dice"] == 1.0
    assert class_metrics(pred, ref, spacing, boundary_tolerance_mm=tol * 0.99)["boundary_f1"] < 1.0


def test_crop_does_not_change_the_result() -> None:
    rng = np.random.default_rng(5)
    ref = _blob(rng, (16, 14, 12))
    pred = ndimage.binary_erosion(ref)
    small = class_metrics(pred, ref, (0.8, 0.9, 2.0))
    big_ref, big_pred = (np.pad(m, ((7, 3), (2, 11), (5, 0))) for m in (ref, pred))
    big = class_metrics(big_pred, big_ref, (0.8, 0.9, 2.0))
    for key, value in small.items():
        assert big[key] == pytest.approx(value, abs=1e-12, nan_ok=True)


def test_empty_mask_convention() -> None:
    empty = np.zeros((5, 5, 5), bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    both = class_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert all(np.isnan(both[k]) for k in ("dice", "iou", "boundary_f1", "surface_dice", "hd95_mm", "msd_mm"))
    assert both["ref_volume_mm3"] == 0.0
    for pred, ref in ((some, empty), (empty, some)):
        one = class_metrics(pred, ref, (1.0, 1.0, 1.0))
        assert one["dice"] == one["iou"] == one["boundary_f1"] == one["surface_dice"] == 0.0
        assert np.isnan(one["hd95_mm"]) and np.isnan(one["msd_mm"])


def test_label_results_per_class_and_patient_by_hand() -> None:
    ref = np.zeros((4, 1, 1), np.uint8)
    ref[:, 0, 0] = [1, 1, 2, 0]
    pred = np.zeros_like(ref)
    pred[:, 0, 0] = [1, 2, 2, 0]
    per_class, per_patient, _ = label_results(pred, ref, (1.0, 1.0, 1.0), 3)
    assert per_class[0]["dice"] == pytest.approx(2 / 3)  # class 1: ref 2 voxels, pred 1, shared 1
    assert per_class[1]["iou"] == pytest.approx(1 / 2)  # class 2: ref 1, pred 2, shared 1
    assert np.isnan(per_class[2]["dice"])  # class 3 empty in both
    assert per_patient["pixel_accuracy"] == pytest.approx(3 / 4)
    assert per_patient["mean_iou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    # The label-map path and the boolean-mask path agree.
    for c in (1, 2):
        direct = class_metrics(pred == c, ref == c, (1.0, 1.0, 1.0))
        assert direct["dice"] == pytest.approx(per_class[c - 1]["dice"])


@pytest.mark.parametrize("margin_mm", [0.5, 2.0, 100.0])
def test_distances_exact_through_every_path(monkeypatch: pytest.MonkeyPatch, margin_mm: float) -> None:
    """A distant false-positive speck and an internal hole; a small search bound sends points down both
    fallbacks (distance transform inside the targets' box, unbounded tree outside), a large one none."""
    import medseg.metrics as metrics

    monkeypatch.setattr(metrics, "MARGIN_MM", margin_mm)
    spacing = (0.9, 1.4, 2.2)
    ref = np.zeros((22, 14, 10), bool)
    ref[3:10, 3:10, 2:7] = True
    pred = np.roll(ref, 1, axis=1)
    pred[6, 6, 4] = False  # a hole deep inside
    pred[19:21, 11:13, 8:10] = True  # a speck far away
    d_pr, d_rp = metrics.surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(d_pr), np.sort(_brute_distances(pred, ref, spacing)), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_rp), np.sort(_brute_distances(ref, pred, spacing)), atol=1e-9)


def test_lesion_wise_detection_matches_instances_by_iou() -> None:
    from medseg.metrics import instance_detection, instance_rows, instance_volumes, instances

    ref = np.zeros((20, 20, 5), bool)
    ref[1:5, 1:5, 1:4] = True  # lesion 1: found (same box)
    ref[10:14, 10:14, 1:4] = True  # lesion 2: found by a shifted prediction (IoU 0.6)
    ref[16:18, 1:3, 1:3] = True  # lesion 3: missed
    pred = np.zeros_like(ref)
    pred[1:5, 1:5, 1:4] = True
    pred[11:15, 10:14, 1:4] = True
    pred[1:3, 16:18, 1:3] = True  # a false positive far from everything
    assert instances(ref)[1] == 3
    m = instance_detection(pred, ref, iou_threshold=0.1)
    assert (m["n_ref_instances"], m["n_pred_instances"]) == (3, 3)
    assert m["instance_recall"] == pytest.approx(2 / 3) and m["instance_precision"] == pytest.approx(2 / 3)
    assert m["instance_f1"] == pytest.approx(2 / 3)
    strict = instance_detection(pred, ref, iou_threshold=0.7)  # the shifted one no longer matches
    assert strict["instance_recall"] == pytest.approx(1 / 3)
    # corner-touching voxels are one lesion (26-connectivity)
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert instances(diagonal)[1] == 1
    # empty sides
    none = instance_detection(np.zeros_like(ref), np.zeros_like(ref))
    assert none["n_ref_instances"] == 0 and np.isnan(none["instance_f1"])
    missed = instance_detection(np.zeros_like(ref), ref)
    assert missed["instance_recall"] == 0 and np.isnan(missed["instance_precision"]) and missed["instance_f1"] == 0
    assert instance_volumes(ref, (1.0, 1.0, 2.0)) == [96.0, 96.0, 16.0]
    rows = instance_rows(pred, ref, (1.0, 1.0, 2.0), iou_threshold=0.1)
    table = [(r["side"], r["instance"], r["volume_mm3"], round(r["best_iou"], 2), r["matched"]) for r in rows]
    assert table == [
        ("reference", 1, 96.0, 1.0, True),
        ("reference", 2, 96.0, 0.6, True),
        ("reference", 3, 16.0, 0.0, False),  # the missed lesion
        ("prediction", 1, 96.0, 1.0, True),
        ("prediction", 2, 96.0, 0.6, True),
        ("prediction", 3, 16.0, 0.0, False),  # the false positive
    ]


def test_label_results_report_instances_per_class() -> None:
    ref = np.zeros((12, 12, 4), np.uint8)
    ref[1:4, 1:4, 1:3] = 1
    ref[7:10, 7:10, 1:3] = 1
    pred = ref.copy()
    pred[7:10, 7:10, 1:3] = 0
    per_class, _, tables = label_results(pred, ref, (1.0, 1.0, 2.0), 2)
    assert per_class[0]["n_ref_instances"] == 2 and per_class[0]["instance_recall"] == 0.5
    assert per_class[0]["instance_precision"] == 1.0
    assert per_class[1]["n_ref_instances"] == 0 and np.isnan(per_class[1]["instance_f1"])  # class 2 empty in both
    # the instance table behind those figures, computed on the class's crop: volumes in mm3, one lesion missed
    rows = [(r["side"], r["instance"], r["volume_mm3"], r["matched"]) for r in tables[0]]
    assert rows == [("reference", 1, 36.0, True), ("reference", 2, 36.0, False), ("prediction", 1, 36.0, True)]
    assert tables[1] == []


def test_a_2d_image_has_2d_boundaries() -> None:
    # a 2D image stored as X x Y x 1: a filled disc's boundary is its rim, not every pixel of it
    yy, xx = np.mgrid[:40, :40]
    disc = ((xx - 20) ** 2 + (yy - 20) ** 2 < 100)[..., None]
    shifted = np.roll(disc, 1, axis=0)
    m = class_metrics(shifted, disc, (1.0, 1.0, 1.0))
    assert m["hd95_mm"] == pytest.approx(1.0) and m["boundary_f1"] == 1.0
    far = np.roll(disc, 4, axis=0)
    assert class_metrics(far, disc, (1.0, 1.0, 1.0), boundary_tolerance_mm=2.0)["boundary_f1"] < 0.8
    # in a 3D image a one-slice structure is all boundary, as before
    volume = np.zeros((40, 40, 5), bool)
    volume[..., 2] = disc[..., 0]
    assert class_metrics(volume, volume, (1.0, 1.0, 1.0))["boundary_f1"] == 1.0
