"""Typed volumes: an image or a label map on a grid.

Arrays are channel-first ``(C, X, Y, Z)``; ``affine`` maps voxel indices to RAS millimetres. The type picks
behaviour: a :class:`Label` is always resampled with nearest neighbour, an :class:`Image` with linear
interpolation (as TorchIO's ScalarImage and LabelMap do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


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
