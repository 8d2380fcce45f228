"""Read a DICOM image series into a volume, with the slice geometry checked.

Why our own reader rather than SimpleITK's ImageSeriesReader: SimpleITK stacks whatever files it is given. It
does not refuse a series with a missing slice or uneven gaps (it warns and averages the step), it cannot tell us
*which* slice is missing, and it does not read multi-frame objects slice by slice. pydicom (with pylibjpeg for
JPEG 2000 / JPEG lossless) reads the headers and, with our own fast path, uncompressed pixel data; compressed
single-frame files are decoded by GDCM (through SimpleITK, already a dependency) in the threads that read the
headers: GDCM decodes JPEG 2000 faster than pylibjpeg here, and in those threads it overlaps pydicom's header
parsing (pylibjpeg holds the GIL). GDCM's values are checked against pydicom on the first slice of each series.
Here we order frames and check the geometry.

The volume keeps the scanner's integers (int16) when the rescale is the identity slope with a whole-number
intercept and the values fit, as CT almost always is: what SimpleITK and dcm2niix write too, half the bytes of
float32. Otherwise it is float32 in real-world units (int32 where whole values do not fit int16).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medseg.errors import GeometryError, ImageReadError
from medseg.io import DEFAULT_MAX_IMAGE_MB
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


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    """``n`` finite numbers of a DICOM value; a geometry value that is not is refused, never guessed."""
    if value is None:
        raise ImageReadError(f"missing {what}")
    try:
        values = value if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str) else [value]
        array = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ImageReadError(f"{what} is not a list of numbers ({err})") from err
    if array.shape != (n,):
        raise ImageReadError(f"{what} should hold {n} numbers, holds {array.size}")
    if not np.isfinite(array).all():
        raise GeometryError(f"{what} holds a NaN or Inf value ({array.tolist()})")
    return array


def _spacing(value: Any) -> tuple[float, float]:
    spacing = _floats(value, 2, "PixelSpacing")
    if (spacing <= 0).any():
        raise GeometryError(f"PixelSpacing must be positive, is {spacing.tolist()} mm")
    return float(spacing[0]), float(spacing[1])


def _orientation(value: Any) -> np.ndarray:
    """Six direction cosines: two unit vectors at right angles (within 0.01), else refused."""
    cosines = _floats(value, 6, "ImageOrientationPatient")
    row, col = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise GeometryError(
            f"ImageOrientationPatient {cosines.tolist()} is not two unit vectors at right angles: "
            "the slices cannot be placed in space"
        )
    return cosines


def _rescale(value: Any, default: float, what: str) -> float:
    number = float(value) if value not in (None, "") else default
    if not np.isfinite(number):
        raise ImageReadError(f"{what} is {number}: the pixel values cannot be rescaled")
    return number


def check_image_header(ds: Dataset, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> tuple[int, int]:
    """Check what an image object declares before any pixel is allocated; returns ``(rows, columns)``.

    Args:
        ds: the object's header (pixel data may be absent).
        max_image_mb: ceiling in MiB on Rows x Columns x frames x samples x bytes per sample.

    Raises:
        ImageReadError: Rows or Columns missing or not positive, more than one sample per pixel (colour), or a
            declared size over the ceiling.
    """
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        if value in (None, "") or int(value) <= 0:
            raise ImageReadError(f"{'missing' if value in (None, '') else 'not a positive'} {keyword}: not an image")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(f"{samples} samples per pixel (colour); only grey images are supported")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    declared = rows * columns * n_frames * samples * max(bits, 8) // 8
    if declared > max_image_mb * 2**20:
        raise ImageReadError(
            f"declares {rows} x {columns} pixels x {n_frames} frame(s) of {bits} bits ({declared / 2**20:.0f} MiB), "
            f"over ingest.max_image_mb={max_image_mb:g}: not read (raise the limit if the image is real)"
        )
    return rows, columns


def frames_of(ds: Dataset, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> list[Frame]:
    """The frames of one DICOM object: itself for a classic single-frame file, each frame of a multi-frame one.

    Raises:
        ImageReadError: see :func:`check_image_header`; a multi-frame object without per-frame geometry.
        GeometryError: a pixel spacing that is not positive, a position or orientation that is not finite, or an
            orientation that is not two unit vectors at right angles.
    """
    shape = check_image_header(ds, max_image_mb)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1 and "ImagePositionPatient" not in ds and str(ds.get("Modality", "")) in PROJECTION_MODALITIES:
        return [projection_frame(ds, shape)]
    if n_frames == 1 and "ImagePositionPatient" in ds:
        return [
            Frame(
                ds,
                None,
                _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                _orientation(ds.get("ImageOrientationPatient")),
                _spacing(ds.get("PixelSpacing")),
                _rescale(ds.get("RescaleSlope"), 1.0, "RescaleSlope") or 1.0,
                _rescale(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept"),
                shape,
            )
        ]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise ImageReadError("multi-frame object without a per-frame functional group for every frame")
    frames = []
    for i, group in enumerate(per_frame):

        def item(name: str, group: Dataset = group, number: int = i + 1) -> Dataset:
            seq = group.get(name) or shared.get(name)
            if not seq:
                raise ImageReadError(f"multi-frame object lacks {name} for frame {number}")
            return seq[0]

        spacing = _spacing(item("PixelMeasuresSequence").get("PixelSpacing"))
        try:
            rescale = item("PixelValueTransformationSequence")
        except ImageReadError:
            rescale = ds
        slope = _rescale(rescale.get("RescaleSlope"), 1.0, "RescaleSlope") or 1.0
        intercept = _rescale(rescale.get("RescaleIntercept"), 0.0, "RescaleIntercept")
        frames.append(
            Frame(
                ds,
                i,
                _floats(item("PlanePositionSequence").get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                _orientation(item("PlaneOrientationSequence").get("ImageOrientationPatient")),
                spacing,
                slope,
                intercept,
                shape,
            )
        )
    return frames


# Projection radiography: one picture, no patient coordinate system (no ImagePositionPatient / Orientation)
PROJECTION_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RF", "XA"}
# LPS directions that make a projection's RAS affine diagonal and positive: columns along X, rows along Y, as a PNG
# is read (:func:`medseg.io.read_volume`), so a radiograph from DICOM and the same one from PNG are the same array
PROJECTION_ORIENTATION = np.array([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0])


def projection_frame(ds: Dataset, shape: tuple[int, int]) -> Frame:
    """A radiograph (CR, DX, MG, ...) as a one-slice frame: no position or orientation exists, so it is placed at
    the origin in the PNG layout (:data:`PROJECTION_ORIENTATION`). Pixel size: PixelSpacing (calibrated to the
    patient, when the modality gives it), else ImagerPixelSpacing (at the detector: includes the geometric
    magnification, which a model trained on such images shares), else 1 mm as for a PNG.

    Raises:
        GeometryError: a spacing that is present but not two positive numbers.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(keyword) not in (None, ""):
            spacing = _spacing(ds.get(keyword))
            break
    else:
        spacing = (1.0, 1.0)
    return Frame(
        ds,
        None,
        np.zeros(3),
        PROJECTION_ORIENTATION.copy(),
        spacing,
        _rescale(ds.get("RescaleSlope"), 1.0, "RescaleSlope") or 1.0,
        _rescale(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept"),
        shape,
    )


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


@dataclass(frozen=True)
class SeriesVolume:
    """A series read into a volume, with what label objects need to find their place on it.

    Attributes:
        image: the volume ``(1, columns, rows, slices)`` in real-world units with its RAS affine (not reoriented).
        facts: non-identifying acquisition facts for the sidecar.
        lps_affine: the same grid's affine in DICOM's LPS frame.
        sop_instance_uids: the SOPInstanceUID of each slice, in slice order (for RTSTRUCT/SEG references).
    """

    image: Image
    facts: dict[str, Any]
    lps_affine: np.ndarray
    sop_instance_uids: list[str]


def _read_file(path: str | Path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> list[Frame]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise ImageReadError(f"{Path(path).name}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    try:
        return frames_of(ds, max_image_mb)
    except ImageReadError as err:
        raise ImageReadError(f"{Path(path).name}: {err}") from err
    except GeometryError as err:
        raise GeometryError(f"{Path(path).name}: {err}") from err


UNCOMPRESSED_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _raw_pixels(ds: Dataset, shape: tuple[int, int]) -> np.ndarray | None:
    """The stored values of a plain single-frame, uncompressed, little-endian grey image, else None.

    Why our own path: pydicom's ``pixel_array`` costs about 1.4 ms per slice in option checks, most of the time
    of reading an uncompressed series. Only the case that needs no bit masking or sign extension (BitsStored ==
    BitsAllocated) takes this path; everything else goes through pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if (
        meta is None
        or meta.get("TransferSyntaxUID") not in UNCOMPRESSED_LITTLE_ENDIAN
        or int(ds.get("SamplesPerPixel", 1) or 1) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
        or bits not in (8, 16, 32)
        or int(ds.get("BitsStored", 0) or 0) != bits
        or "PixelData" not in ds
    ):
        return None
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0) or 0) else 'u'}{bits // 8}")
    n = shape[0] * shape[1]
    data = ds.PixelData
    if len(data) < n * dtype.itemsize:
        return None  # let pydicom name the problem
    return np.frombuffer(data, dtype=dtype, count=n).reshape(shape)


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def output_dtype(frames: Sequence[Frame]) -> np.dtype:
    """int16 when every frame's rescale is slope 1 with a whole intercept and every possible stored and
    rescaled value fits int16; int32 when the rescale is such but the possible range is wider (the values are
    then checked after decoding, see :func:`read_series`); float32 otherwise."""
    info = np.iinfo(np.int16)
    dtype = np.dtype(np.int16)
    for frame in frames:
        if frame.slope != 1.0 or frame.intercept != round(frame.intercept):
            return np.dtype(np.float32)
        if int(frame.dataset.get("SamplesPerPixel", 1) or 1) != 1:
            return np.dtype(np.float32)
        lo, hi = _stored_range(frame.dataset)
        if lo < info.min or hi > info.max or lo + frame.intercept < info.min or hi + frame.intercept > info.max:
            dtype = np.dtype(np.int32)
    return dtype


def _name(frame: Frame) -> str:
    return Path(frame.dataset.filename or "?").name


NATIVE_SYNTAXES = {*UNCOMPRESSED_LITTLE_ENDIAN, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


def check_pixel_data_length(ds: Dataset) -> None:
    """Refuse native (uncompressed) pixel data shorter than Rows x Columns x frames x samples declares.

    Raises:
        ImageReadError: no PixelData, or fewer bytes than the header declares (a truncated file, or a header that
            claims a larger image than it holds).
    """
    if "PixelData" not in ds:
        raise ImageReadError("no PixelData: not an image")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax not in NATIVE_SYNTAXES:
        return  # encapsulated: the decoder checks each fragment
    n_values = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    n_values *= int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    expected = (n_values + 7) // 8 if bits == 1 else n_values * (bits // 8)
    held = len(ds.PixelData)
    if held < expected:
        raise ImageReadError(
            f"PixelData holds {held} bytes where {ds.Rows} x {ds.Columns} pixels (x frames, samples) of {bits} bits "
            f"need {expected}: a truncated file or a header that claims a larger image"
        )


def _stored_pixels(frame: Frame) -> np.ndarray:
    """The frame's stored values, through our uncompressed fast path or pydicom's decoders."""
    try:
        check_pixel_data_length(frame.dataset)
    except ImageReadError as err:
        raise ImageReadError(f"{_name(frame)}: {err}") from err
    stored = _raw_pixels(frame.dataset, frame.shape) if frame.index is None else None
    if stored is None:
        try:
            stored = frame.dataset.pixel_array
        except Exception as err:  # decoder errors come in many types
            meta = getattr(frame.dataset, "file_meta", None)
            syntax = meta.get("TransferSyntaxUID") if meta is not None else None
            named = f" of transfer syntax '{syntax.name}'" if syntax is not None else ""
            raise ImageReadError(
                f"{_name(frame)}: cannot decode pixel data{named} ({type(err).__name__}: {err})"
            ) from err
        if frame.index is not None:
            stored = stored[frame.index]
    return stored


def _decode_into(frame: Frame, out: np.ndarray) -> None:
    """Decode and rescale one frame straight into ``out`` ``(rows, columns)`` (int16, int32 or float32)."""
    stored = _stored_pixels(frame)
    if out.dtype.kind == "i":  # slope 1 and a whole intercept; output_dtype chose a type that holds the values
        np.copyto(out, stored, casting="unsafe")
        if frame.intercept:
            out += out.dtype.type(frame.intercept)
        return
    np.multiply(stored, np.float32(frame.slope), out=out, casting="unsafe")
    if frame.intercept:
        out += np.float32(frame.intercept)


def _gdcm_rescaled(frame: Frame) -> np.ndarray | None:
    """The frame decoded and rescaled by GDCM (SimpleITK), or None when GDCM cannot read it."""
    import SimpleITK as sitk  # noqa: N813 (its usual name); imported here: only compressed series need it

    if not frame.dataset.filename:
        return None
    # ITK prints its warnings with the file's path, and source folder names can carry patient names
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(frame.dataset.filename))
    try:
        image = reader.Execute()
    except RuntimeError:
        return None
    array = sitk.GetArrayFromImage(image)  # a copy: a view would outlive the image it points into
    return array[0] if array.ndim == 3 else array


def _compressed(frame: Frame) -> bool:
    meta = getattr(frame.dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return frame.index is None and syntax is not None and syntax not in UNCOMPRESSED_LITTLE_ENDIAN


def _read_and_decode(
    path: str | Path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB
) -> tuple[list[Frame], np.ndarray | None]:
    """One file's frames (pydicom) and, for a compressed single-frame file, its pixels decoded by GDCM in the
    same worker thread, so that decoding overlaps the reading of other files."""
    frames = _read_file(path, max_image_mb)
    if len(frames) != 1 or not _compressed(frames[0]):
        return frames, None
    values = _gdcm_rescaled(frames[0])
    if values is not None and values.dtype == np.float64:
        values = values.astype(np.float32)
    return frames, values


def _fill_stack(ordered: Sequence[Frame], stack: np.ndarray, decoded: dict[int, np.ndarray]) -> None:
    """Fill ``stack`` ``(slices, rows, columns)``: frames GDCM decoded (``decoded``, keyed by ``id`` of the
    frame's dataset) are copied in, after checking on the first of them that pydicom decodes it to the same
    values; everything else is decoded here by pydicom (which also names the file when a frame cannot be
    decoded at all)."""
    gdcm = [k for k, frame in enumerate(ordered) if id(frame.dataset) in decoded]
    if gdcm:
        first = gdcm[0]
        _decode_into(ordered[first], stack[first])
        check = decoded[id(ordered[first].dataset)]
        agree = check.shape == stack[first].shape and np.allclose(check, stack[first], rtol=1e-6, atol=1e-4)
        # where GDCM reads these files differently, pydicom's decoders take the whole series
        gdcm = gdcm if agree else []
    done = set()
    for k in gdcm:
        values = decoded[id(ordered[k].dataset)]
        if values.shape == stack[k].shape:
            np.copyto(stack[k], values, casting="unsafe")
            done.add(k)
    for k, frame in enumerate(ordered):
        if k not in done:
            _decode_into(frame, stack[k])


def read_series(
    files: Sequence[str | Path],
    tolerance_mm: float = 0.05,
    workers: int | None = None,
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
) -> SeriesVolume:
    """Read DICOM files of one series as a volume in RAS (not yet reoriented).

    Each file is read once by pydicom (header and pixel bytes together) in a thread pool, and a compressed
    single-frame file is decoded by GDCM in the same thread (see the module docstring); multi-frame objects are
    decoded by pydicom with pylibjpeg (openjpeg for JPEG 2000, libjpeg for JPEG lossless).

    Args:
        files: every file of the series, any order; classic single-frame or one multi-frame object.
        tolerance_mm: see :func:`stack_geometry`.
        workers: threads that read files; default ``min(4, CPU count)``.
        max_image_mb: ceiling in MiB on each file's declared image and on the whole volume, checked from the
            headers before any pixel buffer is allocated (``ingest.max_image_mb``).

    Returns:
        The volume, its LPS affine, the per-slice SOP instance UIDs and the acquisition facts.

    Raises:
        ImageReadError: a file cannot be read or decoded, is not an image (no Rows), declares more than
            ``max_image_mb``, or holds less pixel data than it declares.
        GeometryError: the slices do not form a regular grid, or a geometry value is zero, negative, NaN or Inf.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(functools.partial(_read_and_decode, max_image_mb=max_image_mb), files))
    frames = [f for file_frames, _ in results for f in file_frames]
    decoded = {id(file_frames[0].dataset): values for file_frames, values in results if values is not None}
    ordered, lps_affine = stack_geometry(frames, tolerance_mm)
    dtype = output_dtype(ordered)
    declared = len(ordered) * ordered[0].shape[0] * ordered[0].shape[1] * max(dtype.itemsize, 4)
    if declared > max_image_mb * 2**20:
        raise ImageReadError(
            f"the series declares {len(ordered)} slices of {list(ordered[0].shape)} pixels "
            f"({declared / 2**20:.0f} MiB), over ingest.max_image_mb={max_image_mb:g}: not read"
        )
    # Slices are stacked as (slice, row, column), each a contiguous block; the (1, X, Y, Z) volume is a transposed
    # view of it. Writing each slice into a Z-last array instead costs a strided pass over the whole volume per
    # slice (it was most of the reading time of an uncompressed series).
    stack = np.empty((len(ordered), *ordered[0].shape), dtype=dtype)
    # Compressed slices were decoded by GDCM in the reading threads (pylibjpeg holds the GIL; a process pool lost
    # more to pickling than it won); uncompressed ones are copied here (threads gain nothing on a memory copy).
    _fill_stack(ordered, stack, decoded)
    del decoded
    if stack.dtype == np.int32 and stack.size:
        # e.g. 16-bit signed storage with intercept -1024: the possible range exceeds int16, real CT values do not
        info = np.iinfo(np.int16)
        if info.min <= int(stack.min()) and int(stack.max()) <= info.max:
            stack = stack.astype(np.int16)
    volume = stack.transpose(2, 1, 0)[None]
    uids = [str(f.dataset.get("SOPInstanceUID", "")) for f in ordered]
    facts = acquisition_facts(ordered[0].dataset, lps_affine, volume.shape)
    return SeriesVolume(Image(volume, LPS_TO_RAS @ lps_affine), facts, lps_affine, uids)


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
        "source_orientation_lps": [
            round(float(v), 6)
            for v in np.concatenate([lps_affine[:3, 0], lps_affine[:3, 1]]) / np.repeat(spacing[:2], 3)
        ],
        "source_affine_lps": np.round(lps_affine, 6).tolist(),
    }
