"""Read a DICOM image series into a volume, with the slice geometry checked.

Why our own reader rather than SimpleITK's ImageSeriesReader: SimpleITK stacks whatever files it is given. It
does not refuse a series with a missing slice or uneven gaps (it warns and averages the step), it cannot tell us
*which* slice is missing, and it does not read multi-frame objects slice by slice. pydicom (with pylibjpeg for
JPEG 2000 / JPEG lossless) does the decoding; here we only order frames and check the geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg.errors import GeometryError, ImageReadError
from medseg.volume import Image

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Frame:
    """One 2D frame of a series with its geometry (LPS mm) and its rescale."""

    dataset: Dataset
    index: int | None  # frame number in a multi-frame object, None for single-frame files
    position: np.ndarray
    orientation: np.ndarray  # six direction cosines
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    shape: tuple[int, int]

    def pixels(self) -> np.ndarray:
        """The frame's stored values as ``(rows, columns)`` float32, rescaled to real-world units."""
        array = self.dataset.pixel_array
        if self.index is not None:
            array = array[self.index]
        return array.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    if value is None:
        raise ImageReadError(f"missing {what}")
    array = np.asarray([float(v) for v in value], dtype=np.float64)
    if array.shape != (n,):
        raise ImageReadError(f"{what} should hold {n} numbers, holds {array.size}")
    return array


def frames_of(ds: Dataset) -> list[Frame]:
    """The frames of one DICOM object: itself for a classic single-frame file, each frame of a multi-frame one."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.Rows), int(ds.Columns))
    if n_frames == 1 and "ImagePositionPatient" in ds:
        spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing")
        return [
            Frame(
                ds,
                None,
                _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                (float(spacing[0]), float(spacing[1])),
                float(ds.get("RescaleSlope", 1) or 1),
                float(ds.get("RescaleIntercept", 0) or 0),
                shape,
            )
        ]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise ImageReadError("multi-frame object without a per-frame functional group for every frame")
    frames = []
    for i, group in enumerate(per_frame):

        def item(name: str, group: Dataset = group) -> Dataset:
            seq = group.get(name) or shared.get(name)
            if not seq:
                raise ImageReadError(f"multi-frame object lacks {name} for frame {i + 1}")
            return seq[0]

        spacing = _floats(item("PixelMeasuresSequence").get("PixelSpacing"), 2, "PixelSpacing")
        try:
            rescale = item("PixelValueTransformationSequence")
            slope, intercept = float(rescale.get("RescaleSlope", 1)), float(rescale.get("RescaleIntercept", 0))
        except ImageReadError:
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        frames.append(
            Frame(
                ds,
                i,
                _floats(item("PlanePositionSequence").get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                _floats(item("PlaneOrientationSequence").get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                (float(spacing[0]), float(spacing[1])),
                slope,
                intercept,
                shape,
            )
        )
    return frames


def stack_geometry(frames: Sequence[Frame], tolerance_mm: float) -> tuple[list[Frame], np.ndarray]:
    """Order frames along the slice normal and check they form one regular grid.

    Args:
        frames: the frames of a series, in any order.
        tolerance_mm: largest allowed deviation of a slice step from the series' median step, and of a slice
            position from the line through the first slice along the normal.

    Returns:
        ``(ordered_frames, lps_affine)`` where the affine maps (column, row, slice) indices to LPS mm.

    Raises:
        GeometryError: mixed sizes, spacings or orientations, duplicate positions, uneven gaps (missing
            slices) or a sheared stack; the message says what and where.
    """
    if not frames:
        raise GeometryError("series has no image frames")
    first = frames[0]
    for f in frames[1:]:
        if f.shape != first.shape:
            raise GeometryError(f"mixed image sizes in one series: {list(first.shape)} and {list(f.shape)}")
        if not np.allclose(f.orientation, first.orientation, atol=1e-4):
            raise GeometryError(
                f"mixed orientations in one series: {np.round(first.orientation, 4).tolist()} and "
                f"{np.round(f.orientation, 4).tolist()}"
            )
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise GeometryError(f"mixed pixel spacings: {first.pixel_spacing} and {f.pixel_spacing}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    distances = np.array([f.position @ normal for f in frames])
    order = np.argsort(distances, kind="stable")
    ordered = [frames[i] for i in order]
    d = distances[order]
    if len(ordered) == 1:
        step = 1.0
    else:
        steps = np.diff(d)
        if steps.min() < tolerance_mm:
            k = int(np.argmin(steps))
            raise GeometryError(f"two slices share the position {d[k]:.3f} mm along the slice normal")
        step = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - step) > tolerance_mm)
        if bad.size:
            k = int(bad[0])
            missing = steps[k] / step - 1
            raise GeometryError(
                f"uneven slice spacing: a gap of {steps[k]:.3f} mm between slices at {d[k]:.3f} and "
                f"{d[k + 1]:.3f} mm where the series steps {step:.3f} mm "
                f"(about {missing:.1f} missing slice(s); {bad.size} uneven step(s) in all)"
            )
        offsets = np.array([f.position for f in ordered]) - ordered[0].position
        shear = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
        if shear.max() > tolerance_mm * 10:
            raise GeometryError(
                f"slices are not stacked along their normal (shifted up to {shear.max():.2f} mm sideways, "
                "a gantry tilt): resample it in the scanner software or a viewer first"
            )
    affine = np.eye(4)
    affine[:3, 0] = row_dir * first.pixel_spacing[1]
    affine[:3, 1] = col_dir * first.pixel_spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = ordered[0].position
    return ordered, affine


def read_series(files: Sequence[str | Path], tolerance_mm: float = 0.05) -> tuple[Image, dict[str, Any]]:
    """Read DICOM files of one series as an image in RAS (not yet reoriented).

    Args:
        files: every file of the series, any order; classic single-frame or one multi-frame object.
        tolerance_mm: see :func:`stack_geometry`.

    Returns:
        ``(image, facts)``: the volume ``(1, columns, rows, slices)`` in real-world units (HU for CT) with
        its RAS affine, and non-identifying acquisition facts for the sidecar.

    Raises:
        ImageReadError: a file cannot be read or decoded.
        GeometryError: the slices do not form a regular grid.
    """
    frames: list[Frame] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:
            raise ImageReadError(f"{Path(path).name}: not a readable DICOM file ({err})") from err
        try:
            frames.extend(frames_of(ds))
        except ImageReadError as err:
            raise ImageReadError(f"{Path(path).name}: {err}") from err
    ordered, lps_affine = stack_geometry(frames, tolerance_mm)
    volume = np.empty((1, ordered[0].shape[1], ordered[0].shape[0], len(ordered)), dtype=np.float32)
    for k, frame in enumerate(ordered):
        try:
            volume[0, :, :, k] = frame.pixels().T
        except Exception as err:  # decoder errors come in many types
            name = Path(frame.dataset.filename or "?").name
            raise ImageReadError(f"{name}: cannot decode pixel data ({type(err).__name__}: {err})") from err
    return Image(volume, LPS_TO_RAS @ lps_affine), acquisition_facts(ordered[0].dataset, lps_affine, volume.shape)


def acquisition_facts(ds: Dataset, lps_affine: np.ndarray, shape: Sequence[int]) -> dict[str, Any]:
    """Non-identifying facts about an acquisition, for the sidecar and for series selection."""
    spacing = np.linalg.norm(lps_affine[:3, :3], axis=0)
    return {
        "modality": str(ds.get("Modality", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "series_number": int(ds.get("SeriesNumber", 0) or 0),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "manufacturer_model": str(ds.get("ManufacturerModelName", "")),
        "kvp": float(ds.KVP) if ds.get("KVP") not in (None, "") else None,
        "field_strength_t": float(ds.MagneticFieldStrength)
        if ds.get("MagneticFieldStrength") not in (None, "")
        else None,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "source_shape": [int(s) for s in shape[1:]],
        "source_spacing_mm": [round(float(s), 5) for s in spacing],
        "source_orientation_lps": [round(float(v), 6) for v in np.concatenate([lps_affine[:3, 0], lps_affine[:3, 1]])
                                   / np.repeat(spacing[:2], 3)],
        "source_affine_lps": np.round(lps_affine, 6).tolist(),
    }
