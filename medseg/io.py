"""File I/O. Every write is atomic (a temp file in the same folder, then a rename), so a killed job never
leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np

from medseg.errors import GeometryError, ImageReadError, safe_text
from medseg.volume import Image, Label, Volume, check_affine

V = TypeVar("V", bound=Volume)

DEFAULT_MAX_IMAGE_MB = 4096.0  # ``ingest.max_image_mb``: larger declared images are refused before allocating


PARTIAL_MARK = ".partial-"  # temporaries are ``.<name>.partial-<random><suffixes>`` beside their final file


def partial_path(final: str | Path) -> Path:
    """A new, empty temporary file beside ``final`` with ``final``'s suffixes (``.nii.gz`` stays ``.nii.gz``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{PARTIAL_MARK}", suffix=suffix, dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8, atomically; undecodable file name bytes in it become U+FFFD (:func:`safe_text`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(safe_text(text), encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_tsv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write rows as a tab-separated UTF-8 table with a header; missing values become empty cells, undecodable
    file name bytes U+FFFD (:func:`safe_text`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), delimiter="\t", extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _tsv_cell(row.get(k)) for k in columns})
    return Path(path)


def _tsv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.6g}"
    if isinstance(value, str | Path):
        return safe_text(str(value))
    return value


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_volume(path: str | Path, kind: type[V], max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> V:
    """Read a NIfTI (or anything nibabel reads), NRRD, MetaImage, or a 2D PNG / JPEG (``X x Y x 1``, see
    :func:`_read_planar`) as an :class:`Image` or :class:`Label`.

    The shape and data type the header declares are checked against ``max_image_mb`` before any voxel is read, and
    the affine must be finite and invertible (:func:`medseg.volume.check_affine`).

    Args:
        path: the file.
        kind: ``Image`` (float32) or ``Label`` (uint8 or int16 class indices).
        max_image_mb: largest image (declared shape x bytes per voxel) read, in MiB.

    Returns:
        The volume, channel-first ``(C, X, Y, Z)``, in the file's own orientation.

    Raises:
        ImageReadError: the file is missing, unreadable, declares an image over ``max_image_mb``, or a label holds
            non-integer values.
        GeometryError: the affine is singular or not finite.
    """
    path = Path(path)
    try:
        if path.name.lower().endswith(PLANAR_SUFFIXES):
            data, affine = _read_planar(path, max_image_mb, label=issubclass(kind, Label))
        elif path.name.lower().endswith(ITK_SUFFIXES):
            data, affine = _read_itk(path, max_image_mb)
        else:
            img = nib.load(str(path))
            dtype = np.dtype(img.header.get_data_dtype())
            _check_declared_size(path, img.header.get_data_shape(), dtype.itemsize, dtype.name, max_image_mb)
            affine = np.asarray(img.affine, dtype=np.float64)
            check_affine(affine, path.name)
            data = np.asarray(img.dataobj)
    except (ImageReadError, GeometryError):
        raise
    except Exception as err:  # nibabel and SimpleITK raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot read as an image ({type(err).__name__}: {err})") from err
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    else:
        raise ImageReadError(f"{path}: expected a 3D volume, got {data.ndim} dimensions {data.shape}")
    if issubclass(kind, Label):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ImageReadError(f"{path}: a label must hold whole class numbers, found fractional values")
        if rounded.min() < 0:
            raise ImageReadError(f"{path}: a label must not hold negative values")
        data = rounded.astype(np.uint8 if rounded.max() < 256 else np.int16)
    else:
        data = data.astype(np.float32)
    return kind(data, affine)


ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _check_declared_size(path: Path, shape: Sequence[int], itemsize: int, type_name: str, max_image_mb: float) -> None:
    """Refuse a header whose shape x bytes per value exceeds ``max_image_mb`` MiB, before anything is allocated."""
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise ImageReadError(f"{path.name}: the header declares a negative size {dims}")
    declared = 1
    for n in dims:
        declared *= n  # Python integers: a hostile header cannot overflow the product
    declared *= itemsize
    if declared > max_image_mb * 2**20:
        raise ImageReadError(
            f"{path.name}: the header declares {dims} voxels of {type_name} ({declared / 2**20:.0f} MiB), over "
            f"ingest.max_image_mb={max_image_mb:g}: not read (raise the limit if the image is real)"
        )


PLANAR_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_planar(path: Path, max_image_mb: float, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """A PNG or JPEG (a 2D image: a radiograph export, an nnU-Net 2D dataset) as ``(X, Y, 1)`` with 1 mm pixels
    (these formats carry no spacing; nnU-Net assumes 1 too). Colour images become grey (ITU-R 601 luma); a label
    must be single-channel, and a binary mask stored as 0/255 becomes 0/1."""
    import SimpleITK as sitk  # noqa: N813

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 2:
        raise ImageReadError(f"{path}: expected a 2D picture, got {reader.GetDimension()} dimensions")
    channels = reader.GetNumberOfComponents()
    _check_declared_size(path, [*reader.GetSize(), channels], 8, "up to 8 bytes", max_image_mb)
    data = sitk.GetArrayFromImage(reader.Execute())  # (Y, X[, C])
    if data.ndim == 3:
        if label and not all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, min(data.shape[2], 3))):
            raise ImageReadError(f"{path}: a label picture must be single-channel (grey), not colour")
        data = data[..., 0] if label else data[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114])
    if label and set(np.unique(data).tolist()) <= {0, 255}:
        data = (data > 0).astype(np.uint8)
    return np.ascontiguousarray(data.T)[..., None], np.eye(4)


def _read_itk(path: Path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> tuple[np.ndarray, np.ndarray]:
    """NRRD and MetaImage through SimpleITK (nibabel reads neither): ``(array (X, Y, Z[, C]), RAS affine)``."""
    import SimpleITK as sitk  # noqa: N813 (its usual name); imported here so NIfTI-only users never load it

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's warnings print the path, which may name a patient
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D volume, got {reader.GetDimension()} dimensions")
    shape = [*reader.GetSize(), reader.GetNumberOfComponents()]
    # 8 bytes per value, the widest pixel type: an upper bound that needs no table of ITK's pixel types
    _check_declared_size(path, shape, 8, "up to 8 bytes", max_image_mb)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(reader.GetDirection()).reshape(3, 3) * np.asarray(reader.GetSpacing())
    lps[:3, 3] = reader.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK works in LPS, NIfTI in RAS
    check_affine(affine, path.name)
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C]) in ITK's order
    data = np.moveaxis(data, (0, 1, 2), (2, 1, 0))
    return data, affine


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write a single- or multi-channel volume as NIfTI, atomically."""
    array = volume.array[0] if volume.array.shape[0] == 1 else np.moveaxis(volume.array, 0, -1)
    if isinstance(volume, Label):
        array = array.astype(np.uint8 if array.max(initial=0) < 256 else np.int16)
    elif array.dtype not in (np.int16, np.int32):  # a scanner's exact integers (CT in HU from DICOM), kept so
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def to_canonical(volume: V) -> V:
    """Reorient (axis permutation and flips only, no resampling) so the array axes point to R, A, S."""
    ornt = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    array = np.stack([nib.orientations.apply_orientation(c, transform) for c in volume.array])
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.spatial_shape)
    return type(volume)(np.ascontiguousarray(array), affine)


__all__ = [
    "DEFAULT_MAX_IMAGE_MB",
    "Image",
    "Label",
    "atomic_path",
    "read_json",
    "read_tsv",
    "read_volume",
    "to_canonical",
    "write_json",
    "write_text",
    "write_tsv",
    "write_volume",
]
