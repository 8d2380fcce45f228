"""Label objects onto their image's grid: DICOM-SEG and RTSTRUCT, checked against the series they reference.

A label is never resampled: a SEG must lie on the image's voxel grid (up to an axis order, flips and a whole-voxel
offset, within ``tolerance_mm``), else it is refused with both geometries in the message. RTSTRUCT contours are
polygons in patient mm, so they are rasterised onto the image's own slices (a contour must lie on a slice plane).

Segments and ROIs become label values: a SEG's segment number is its value; the i-th ROI of an RTSTRUCT (in
ROIContourSequence order) is value i. Where segments overlap, ``overlap="refuse"`` refuses the label and
``overlap="last_wins"`` gives the voxel the higher value; the sidecar records the policy and the voxel count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
from skimage.draw import polygon

from medseg.errors import GeometryError, ImageReadError
from medseg.ingest.dicom import SeriesVolume
from medseg.volume import Label

log = logging.getLogger(__name__)

OverlapPolicy = Literal["refuse", "last_wins"]


def describe_lps_grid(affine: np.ndarray, shape: Sequence[int]) -> str:
    """One line naming a grid: shape, spacing, origin and axis directions (LPS mm), for error messages."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = (affine[:3, :3] / np.where(spacing > 0, spacing, 1)).T
    return (
        f"shape {[int(s) for s in shape]}, spacing {np.round(spacing, 4).tolist()} mm, "
        f"origin {np.round(affine[:3, 3], 3).tolist()}, axes {np.round(directions, 4).tolist()}"
    )


def place_on_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    tolerance_mm: float,
    what: str,
) -> np.ndarray:
    """Put a 3D array into a larger (or equal) grid that it shares voxel for voxel, without resampling.

    The source grid may order and flip its axes differently and cover only part of the destination (a SEG that
    stores only the slices its segments touch), but each source voxel centre must fall on a destination voxel
    centre within ``tolerance_mm``.

    Args:
        array: ``(A, B, C)`` values on the source grid.
        src_affine: 4x4 map from source indices to mm (any frame, the same as ``dst_affine``'s).
        dst_affine: 4x4 map from destination indices to mm.
        dst_shape: destination spatial shape.
        tolerance_mm: largest allowed distance between a source voxel centre and its destination voxel centre.
        what: names the object in error messages.

    Returns:
        The array on the destination grid, zero where the source does not reach.

    Raises:
        GeometryError: the grids differ in spacing or direction, are offset by a fraction of a voxel, or the source
            reaches outside the destination; the message gives both geometries.

    >>> dst = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> src = dst.copy(); src[:3, 3] = [2.0, 0.0, 0.0]
    >>> place_on_grid(np.ones((1, 2, 2)), src, dst, (3, 2, 2), 0.01, "x")[:, 0, 0].tolist()
    [0.0, 1.0, 0.0]
    """

    def refuse(why: str) -> GeometryError:
        return GeometryError(
            f"{what} is not on its image's grid ({why}; tolerance {tolerance_mm} mm): "
            f"image {describe_lps_grid(dst_affine, dst_shape)}; label {describe_lps_grid(src_affine, array.shape)}. "
            "Labels are never resampled: export the label on the image's grid"
        )

    to_dst = np.linalg.inv(dst_affine) @ src_affine
    dst_spacing = np.linalg.norm(dst_affine[:3, :3], axis=0)
    axes: list[int] = []
    signs: list[int] = []
    for j in range(3):
        column = to_dst[:3, j]
        i = int(np.argmax(np.abs(column)))
        sign = 1 if column[i] > 0 else -1
        if array.shape[j] > 1:
            # Over the whole extent, the source axis must step exactly one destination voxel per voxel.
            error_mm = np.linalg.norm(dst_affine[:3, :3] @ (column - sign * np.eye(3)[i])) * (array.shape[j] - 1)
            if error_mm > tolerance_mm:
                raise refuse(f"axis {j} differs in spacing or direction by {error_mm:.4f} mm over the label")
        else:
            # A single slice has a direction but no step of its own (its spacing is a guess of the writer).
            cosine = abs(column[i]) / np.linalg.norm(column)
            if 1 - cosine > 1e-4:
                raise refuse(f"axis {j} is not parallel to an image axis")
        if i in axes:
            raise refuse("two label axes map onto the same image axis")
        axes.append(i)
        signs.append(sign)
    offset = to_dst[:3, 3]
    fraction_mm = np.abs(offset - np.rint(offset)) * dst_spacing
    if fraction_mm.max() > tolerance_mm:
        raise refuse(f"offset by {np.round(fraction_mm, 4).tolist()} mm, a fraction of a voxel")
    start = np.rint(offset).astype(int)
    oriented = np.transpose(array, np.argsort(axes))
    for i in range(3):
        sign = signs[axes.index(i)]
        if sign < 0:
            oriented = np.flip(oriented, axis=i)
            start[i] -= oriented.shape[i] - 1
    stop = start + np.asarray(oriented.shape)
    if (start < 0).any() or (stop > np.asarray(dst_shape)).any():
        raise refuse(f"reaches voxels {start.tolist()} to {(stop - 1).tolist()}, outside the image")
    out = np.zeros(tuple(int(s) for s in dst_shape), dtype=array.dtype)
    out[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = oriented
    return out


def combine_masks(masks: Sequence[tuple[int, np.ndarray]], overlap: OverlapPolicy, what: str) -> tuple[np.ndarray, int]:
    """Merge binary masks into one label map.

    Args:
        masks: ``(value, mask)`` pairs, masks boolean and of one shape.
        overlap: ``refuse`` or ``last_wins`` (the higher value wins).
        what: names the object in error messages.

    Returns:
        ``(label_map, overlap_voxels)``; ``label_map`` is uint8 (int16 above 255 values).

    Raises:
        ImageReadError: masks overlap and ``overlap`` is ``refuse``.

    >>> a, b = np.array([1, 1, 0], bool), np.array([0, 1, 1], bool)
    >>> merged, n_overlap = combine_masks([(1, a), (2, b)], "last_wins", "x")
    >>> merged.tolist(), n_overlap
    ([1, 2, 2], 1)
    """
    shape = masks[0][1].shape
    top = max(v for v, _ in masks)
    out = np.zeros(shape, dtype=np.uint8 if top < 256 else np.int16)
    count = np.zeros(shape, dtype=np.uint16)
    for value, mask in sorted(masks, key=lambda m: m[0]):
        out[mask] = value
        count += mask
    overlap_voxels = int((count > 1).sum())
    if overlap_voxels and overlap == "refuse":
        raise ImageReadError(
            f"{what}: {overlap_voxels} voxel(s) belong to more than one segment; a label map holds one class per "
            "voxel. Set ingest.label_overlap: last_wins to give such voxels the higher segment number"
        )
    return out, overlap_voxels


def read_seg(path: Path, series: SeriesVolume, tolerance_mm: float, overlap: OverlapPolicy) -> tuple[Label, dict]:
    """A DICOM-SEG as a label map on ``series``' grid (highdicom decodes it and builds the SEG's own grid).

    Args:
        path: the SEG file.
        series: the image series it references, as read.
        tolerance_mm: see :func:`place_on_grid`.
        overlap: see :func:`combine_masks`.

    Returns:
        ``(label, facts)``: the label ``(1, X, Y, Z)`` with the image's RAS affine, and sidecar facts.

    Raises:
        ImageReadError: unreadable SEG, or overlapping segments refused.
        GeometryError: the SEG is not on the image's grid.
    """
    what = f"DICOM-SEG {path.name}"
    try:
        seg = hd.seg.segread(path)
        numbers = list(seg.get_segment_numbers())
        if "FrameOfReferenceUID" not in seg:  # a radiograph's SEG: frames sit on source instances, not in space
            masks = _masks_by_instance(seg, numbers, series, what)
        else:
            # Overlaps are ours to judge (and count), so highdicom keeps segments apart.
            volume = seg.get_volume(combine_segments=False, skip_overlap_checks=True)
    except (GeometryError, ImageReadError):
        raise
    except Exception as err:  # highdicom raises many types for malformed objects
        raise ImageReadError(f"{what}: cannot read the segmentation ({type(err).__name__}: {err})") from err
    names = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    shape = series.image.spatial_shape
    if "FrameOfReferenceUID" in seg:
        # highdicom's volume is (slice, row, column, segment) with an LPS affine; ours is (column, row, slice).
        masks = []
        for c, number in enumerate(numbers):
            mask = np.asarray(volume.array[..., c]) >= 0.5  # fractional SEGs hold probabilities or occupancy
            masks.append((number, place_on_grid(mask, volume.affine, series.lps_affine, shape, tolerance_mm, what)))
    array, overlap_voxels = combine_masks(masks, overlap, what)
    facts = {
        "label_source": "dicom-seg",
        "label_values": {str(n): names[n] for n in numbers},
        "label_overlap_policy": overlap,
        "label_overlap_voxels": overlap_voxels,
    }
    return Label(array[None], series.image.affine.copy()), facts


def _masks_by_instance(
    seg: hd.seg.Segmentation, numbers: Sequence[int], series: SeriesVolume, what: str
) -> list[tuple[int, np.ndarray]]:
    """The segments of a SEG without a frame of reference (a radiograph's) by the source instance each frame
    references: a one-frame projection series, its own instance referenced, the same rows and columns.

    Raises:
        GeometryError: the series is not one picture, the SEG does not reference it, or the sizes differ.
    """
    if len(series.sop_instance_uids) != 1:
        raise GeometryError(f"{what}: has no frame of reference, and its image is not a single picture (radiograph)")
    source = series.sop_instance_uids[0]
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source], segment_numbers=numbers, combine_segments=False
        )
    except (KeyError, ValueError) as err:
        # highdicom's message quotes the UIDs, which are identity values here: not repeated
        raise GeometryError(f"{what}: does not segment the radiograph it is filed with ({type(err).__name__})") from err
    columns, rows = series.image.spatial_shape[:2]
    if pixels.shape[1:3] != (rows, columns):
        raise GeometryError(f"{what}: {list(pixels.shape[1:3])} pixels, the radiograph has {[rows, columns]}")
    # highdicom's frame is (row, column); ours is (column, row, 1)
    return [(n, (pixels[0, :, :, c] >= 0.5).T[..., None]) for c, n in enumerate(numbers)]


def rasterise_contours(
    contours: Sequence[np.ndarray], lps_affine: np.ndarray, shape: Sequence[int], tolerance_mm: float, what: str
) -> np.ndarray:
    """Fill closed planar contours (each ``(n, 3)`` LPS mm) on the slices of a grid.

    A voxel is inside when its centre is inside the polygon (scikit-image's ``polygon``). Contours on one slice
    combine by even-odd (exclusive or), so a contour inside another cuts a hole, the RTSTRUCT convention.

    Args:
        contours: the polygons of one ROI.
        lps_affine: the image grid, (column, row, slice) indices to LPS mm.
        shape: ``(X, Y, Z)`` of the grid.
        tolerance_mm: largest distance of a contour from its slice plane.
        what: names the object in error messages.

    Returns:
        A boolean mask ``(X, Y, Z)``.

    Raises:
        GeometryError: a contour lies between slices, across slices, or outside the image's slices.
    """
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    to_index = np.linalg.inv(lps_affine)
    step = float(np.linalg.norm(lps_affine[:3, 2]))
    for points in contours:
        index = (to_index @ np.c_[points, np.ones(len(points))].T)[:3]
        k = float(np.median(index[2]))
        k_int = round(k)
        off_plane_mm = float(np.abs(index[2] - k_int).max()) * step
        if off_plane_mm > tolerance_mm:
            raise GeometryError(
                f"{what}: a contour lies {off_plane_mm:.3f} mm off the nearest slice plane (tolerance "
                f"{tolerance_mm} mm); contours must be drawn on the image's slices"
            )
        if not 0 <= k_int < shape[2]:
            raise GeometryError(f"{what}: a contour lies on slice {k_int}, outside the image's {shape[2]} slices")
        rr, cc = polygon(index[0], index[1], shape=(shape[0], shape[1]))
        plane = np.zeros((shape[0], shape[1]), dtype=bool)
        plane[rr, cc] = True
        mask[:, :, k_int] ^= plane
    return mask


def read_rtstruct(
    path: Path, series: SeriesVolume, tolerance_mm: float, overlap: OverlapPolicy
) -> tuple[Label, dict[str, Any]]:
    """An RTSTRUCT's ROIs rasterised on ``series``' grid, the i-th ROI as value i.

    Args:
        path: the RTSTRUCT file.
        series: the image series it references, as read.
        tolerance_mm: see :func:`rasterise_contours`.
        overlap: see :func:`combine_masks`.

    Returns:
        ``(label, facts)``: the label ``(1, X, Y, Z)`` with the image's RAS affine, and sidecar facts.

    Raises:
        ImageReadError: unreadable object, references to images not in the series (a broken reference), no
            contours, an empty result, or overlapping ROIs refused.
        GeometryError: a contour off the image's slices.
    """
    what = f"RTSTRUCT {path.name}"
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise ImageReadError(f"{what}: not a readable DICOM file ({err})") from err
    known = set(series.sop_instance_uids)
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    masks, values = [], {}
    for value, roi in enumerate(ds.get("ROIContourSequence", []), start=1):
        contours = []
        for contour in roi.get("ContourSequence", []):
            refs = {str(i.ReferencedSOPInstanceUID) for i in contour.get("ContourImageSequence", [])}
            if refs - known:
                raise ImageReadError(
                    f"{what}: ROI {value} has a contour drawn on an image that is not in the series it references "
                    "(a broken reference); refusing rather than guessing its slice"
                )
            if str(contour.get("ContourGeometricType", "")) not in ("CLOSED_PLANAR", ""):
                continue  # points and open polylines mark no area
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            contours.append(points)
        shape = series.image.spatial_shape
        masks.append((value, rasterise_contours(contours, series.lps_affine, shape, tolerance_mm, what)))
        values[str(value)] = names.get(int(roi.get("ReferencedROINumber", -1)), "")
    if not masks:
        raise ImageReadError(f"{what}: holds no ROI contours")
    array, overlap_voxels = combine_masks(masks, overlap, what)
    if not array.any():
        raise ImageReadError(f"{what}: its contours enclose no voxel centre of the image")
    facts = {
        "label_source": "rtstruct",
        "label_values": values,
        "label_overlap_policy": overlap,
        "label_overlap_voxels": overlap_voxels,
    }
    return Label(array[None], series.image.affine.copy()), facts


def read_label_object(
    path: Path, modality: str, series: SeriesVolume, tolerance_mm: float, overlap: OverlapPolicy
) -> tuple[Label, dict[str, Any]]:
    """A SEG or RTSTRUCT object as a label on ``series``' grid (see :func:`read_seg`, :func:`read_rtstruct`)."""
    reader = read_seg if modality == "SEG" else read_rtstruct
    return reader(path, series, tolerance_mm, overlap)


__all__ = [
    "combine_masks",
    "describe_lps_grid",
    "place_on_grid",
    "rasterise_contours",
    "read_label_object",
    "read_rtstruct",
    "read_seg",
]
