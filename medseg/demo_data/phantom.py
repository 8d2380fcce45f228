"""Pure functions that draw a CT-like phantom in physical space (LPS millimetres).

The phantom is a body cylinder of soft tissue in air holding two organ-like blobs: organ A (label 1, enhanced
parenchyma) and organ B (label 2, brighter, smaller). Shapes are lumpy ellipsoids, intensities carry noise and a
smooth inhomogeneity, so a model has to learn shape and context, not a threshold alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
TISSUE_HU = 40.0
ORGAN_A_HU = 130.0
ORGAN_B_HU = 210.0


@dataclass(frozen=True)
class Blob:
    """A lumpy ellipsoid: centre (mm, LPS, relative to the body centre), radii (mm), yaw (rad), lump phase."""

    centre: np.ndarray
    radii: np.ndarray
    yaw: float
    lump_phase: np.ndarray

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of ``points`` (..., 3) inside the blob."""
        d = points - self.centre
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        x = c * d[..., 0] + s * d[..., 1]
        y = -s * d[..., 0] + c * d[..., 1]
        z = d[..., 2]
        r = np.sqrt((x / self.radii[0]) ** 2 + (y / self.radii[1]) ** 2 + (z / self.radii[2]) ** 2)
        theta = np.arctan2(y, x)
        phi = np.arctan2(z, np.hypot(x, y))
        lump = 1.0 + 0.12 * np.sin(3 * theta + self.lump_phase[0]) * np.cos(2 * phi + self.lump_phase[1])
        return r <= lump


@dataclass(frozen=True)
class Phantom:
    body_radii_mm: tuple[float, float]
    organ_a: Blob
    organ_b: Blob
    field_coeffs: np.ndarray  # smooth inhomogeneity, HU per normalised coordinate


def random_phantom(rng: np.random.Generator) -> Phantom:
    """Draw a patient: organ A on one side of the body, organ B on the other, sizes and poses random."""
    side = rng.choice([-1.0, 1.0])
    organ_a = Blob(
        centre=np.array([side * rng.uniform(6, 12), rng.uniform(-6, 6), rng.uniform(-6, 6)]),
        radii=np.array([rng.uniform(12, 17), rng.uniform(9, 13), rng.uniform(16, 24)]),
        yaw=rng.uniform(-0.6, 0.6),
        lump_phase=rng.uniform(0, 2 * np.pi, 2),
    )
    organ_b = Blob(
        centre=np.array([-side * rng.uniform(14, 20), rng.uniform(-8, 8), rng.uniform(-8, 8)]),
        radii=np.array([rng.uniform(6, 9), rng.uniform(5, 8), rng.uniform(9, 14)]),
        yaw=rng.uniform(-0.8, 0.8),
        lump_phase=rng.uniform(0, 2 * np.pi, 2),
    )
    return Phantom(
        body_radii_mm=(rng.uniform(34, 37), rng.uniform(28, 32)),
        organ_a=organ_a,
        organ_b=organ_b,
        field_coeffs=rng.uniform(-25, 25, 4),
    )


def render(
    phantom: Phantom, points_mm: np.ndarray, voxel_mm: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the phantom on a grid of points.

    Args:
        phantom: the patient.
        points_mm: ``(X, Y, Z, 3)`` LPS positions relative to the body centre.
        voxel_mm: the grid's spacing along its array axes, for the blur that mimics the scanner's PSF.
        rng: noise generator.

    Returns:
        ``(hu, label)``: float32 Hounsfield units and uint8 labels, both ``(X, Y, Z)``.
    """
    x, y, z = points_mm[..., 0], points_mm[..., 1], points_mm[..., 2]
    body = (x / phantom.body_radii_mm[0]) ** 2 + (y / phantom.body_radii_mm[1]) ** 2 <= 1.0
    label = np.zeros(points_mm.shape[:3], dtype=np.uint8)
    label[phantom.organ_a.inside(points_mm) & body] = 1
    label[phantom.organ_b.inside(points_mm) & body] = 2
    hu = np.where(body, TISSUE_HU, AIR_HU).astype(np.float32)
    hu[label == 1] = ORGAN_A_HU
    hu[label == 2] = ORGAN_B_HU
    # Scanner PSF: about 1 mm FWHM, expressed per array axis.
    hu = ndimage.gaussian_filter(hu, sigma=[0.45 / s for s in voxel_mm])
    a = phantom.field_coeffs
    field = a[0] * x / 40 + a[1] * y / 40 + a[2] * z / 40 + a[3] * (x**2 + y**2) / 1600
    hu = hu + np.where(body, field, 0.0) + rng.normal(0.0, 18.0, hu.shape)
    return hu.astype(np.float32), label
