"""Typed volumes: an image or a label map on a grid.

Arrays are channel-first ``(C, X, Y, Z)``; ``affine`` maps voxel indices to RAS millimetres. The type picks
behaviour: a :class:`Label` is always resampled with nearest neighbour, an :class:`Image` with linear
interpolation (as TorchIO's ScalarImage and LabelMap do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from medseg.errors import GeometryError, ImageReadError


@dataclass(frozen=True)
class Volume:
    """A channel-first array ``(C, X, Y, Z)`` with its 4x4 RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    interpolation: ClassVar[str] = "bilinear"

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) array, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, got shape {self.affine.shape}")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume of the same type and grid holding another array."""
        return type(self)(array, self.affine.copy())


@dataclass(frozen=True)
class Image(Volume):
    interpolation: ClassVar[str] = "bilinear"


@dataclass(frozen=True)
class Label(Volume):
    interpolation: ClassVar[str] = "nearest"


def same_grid(a: Volume, b: Volume, tolerance_mm: float = 1e-3) -> bool:
    """Whether two volumes share a spatial shape and an affine within ``tolerance_mm``."""
    return a.spatial_shape == b.spatial_shape and bool(np.allclose(a.affine, b.affine, atol=tolerance_mm))


def describe_grid(v: Volume) -> str:
    """A one-line description of a volume's geometry for error messages."""
    origin = np.round(v.affine[:3, 3], 3).tolist()
    spacing = [round(s, 4) for s in v.spacing]
    return f"shape {list(v.spatial_shape)}, spacing {spacing} mm, origin {origin}"


def check_affine(affine: np.ndarray, what: str) -> None:
    """Refuse an affine that cannot place voxels in space: not finite, or singular (a zero or collapsed axis).

    Args:
        affine: 4x4 voxel-to-mm map.
        what: names the image in the message (a file name, never a full path).

    Raises:
        GeometryError: the affine holds NaN/Inf, or its 3x3 part has a zero-length column or is singular.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise GeometryError(f"{what}: the affine is not a finite 4x4 matrix ({np.round(affine, 4).tolist()})")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing <= 0).any():
        raise GeometryError(f"{what}: a voxel size of zero in the affine (spacing {np.round(spacing, 6).tolist()} mm)")
    directions = affine[:3, :3] / spacing
    if abs(float(np.linalg.det(directions))) < 1e-3:
        raise GeometryError(
            f"{what}: the affine is singular (its axes {np.round(directions.T, 4).tolist()} do not span 3D space)"
        )


def check_image(image: Volume, what: str = "image") -> None:
    """Refuse an image that no model can read: more than one channel, NaN or Inf voxels, or an unusable affine.

    Args:
        image: the image as read, ``(C, X, Y, Z)``.
        what: names the image in the message.

    Raises:
        ImageReadError: several channels, or non-finite voxels (the message gives their count).
        GeometryError: see :func:`check_affine`.
    """
    if image.array.shape[0] != 1:
        raise ImageReadError(
            f"{what}: {image.array.shape[0]} channels (a 4D image {list(image.array.shape[1:])} x "
            f"{image.array.shape[0]}); only single-channel images are supported: split it into one file per channel"
        )
    check_affine(image.affine, what)
    if image.array.dtype.kind == "f":
        finite = np.isfinite(image.array)
        if not finite.all():
            n = int(finite.size - np.count_nonzero(finite))
            raise ImageReadError(
                f"{what}: {n} non-finite voxel(s) (NaN or Inf) of {finite.size}; fix or mask them in the source"
            )
