"""Pure resampling and normalisation functions. They never modify their inputs.

Resampling is MONAI's (``Spacing`` to a target spacing, ``SpatialResample`` onto any given grid); the volume's
type picks the interpolation (labels nearest, images trilinear).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample

from medseg.config import ResampleConfig
from medseg.volume import Image, Label, Volume

V = TypeVar("V", bound=Volume)


def _meta(volume: Volume) -> MetaTensor:
    return MetaTensor(torch.as_tensor(volume.array, dtype=torch.float32), affine=torch.as_tensor(volume.affine))


def _back(volume: V, result: torch.Tensor) -> V:
    array = result.detach().cpu().numpy()
    if isinstance(volume, Label):
        array = np.rint(array).astype(volume.array.dtype)
    affine = np.asarray(result.affine, dtype=np.float64) if isinstance(result, MetaTensor) else volume.affine
    return type(volume)(array, affine)


def resample_to_spacing(volume: V, spacing_mm: Sequence[float]) -> V:
    """Resample onto a grid of ``spacing_mm`` covering the same field of view, same directions.

    >>> lab = Label(np.ones((1, 4, 4, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> resample_to_spacing(lab, (1.0, 1.0, 1.0)).spatial_shape
    (8, 8, 8)
    """
    transform = Spacing(pixdim=tuple(float(s) for s in spacing_mm), mode=volume.interpolation, padding_mode="border")
    return _back(volume, transform(_meta(volume)))


def resample_to_grid(volume: V, affine: np.ndarray, shape: Sequence[int]) -> V:
    """Resample onto the grid given by ``affine`` and spatial ``shape`` (e.g. a scan's original grid)."""
    transform = SpatialResample(mode=volume.interpolation, padding_mode="border")
    result = transform(_meta(volume), dst_affine=torch.as_tensor(affine), spatial_size=tuple(int(s) for s in shape))
    out = _back(volume, result)
    return type(volume)(out.array, np.asarray(affine, dtype=np.float64))


def normalize(image: Image, config: ResampleConfig) -> Image:
    """Intensity normalisation.

    ``ct``: clip to ``ct_clip_hu`` and map the window linearly onto [-1, 1] (the same for every scan, so HU keep
    their meaning). ``zscore``: per-scan zero mean, unit variance (MR, where intensities have no unit).
    """
    array = image.array.astype(np.float32)
    if config.normalization == "ct":
        lo, hi = config.ct_clip_hu
        array = (np.clip(array, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    else:
        std = float(array.std())
        array = (array - float(array.mean())) / (std if std > 0 else 1.0)
    return Image(array.astype(np.float32), image.affine.copy())


def preprocess(image: Image, config: ResampleConfig) -> Image:
    """What training and inference both apply to a canonical image: resample, then normalise."""
    return normalize(resample_to_spacing(image, config.target_spacing_mm), config)
