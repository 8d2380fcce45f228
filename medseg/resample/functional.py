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


def label_to_grid_onehot(label: Label, affine: np.ndarray, shape: Sequence[int]) -> Label:
    """A label onto another grid by one-hot linear interpolation, argmaxed (nnU-Net resamples masks this way).

    Smoother than nearest neighbour where the grid gets coarser, and it never invents a label: every output voxel
    holds one of the input's values. Classes are interpolated one at a time, keeping a running maximum, so memory
    stays at two output-sized arrays whatever the number of classes. A tie goes to the lower class value.

    Args:
        label: ``(1, X, Y, Z)`` class indices.
        affine: 4x4 RAS affine of the target grid.
        shape: spatial shape of the target grid.

    Returns:
        The label on the target grid, same dtype.
    """
    best = np.full(tuple(int(s) for s in shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(int(s) for s in shape), dtype=label.array.dtype)
    for value in np.unique(label.array):
        mask = Image((label.array == value).astype(np.float32), label.affine)
        probability = resample_to_grid(mask, affine, shape).array[0]
        take = probability > best
        out[take] = value
        best[take] = probability[take]
    return Label(out[None], np.asarray(affine, dtype=np.float64))


def label_to_spacing_onehot(label: Label, spacing_mm: Sequence[float]) -> Label:
    """A label onto the grid :func:`resample_to_spacing` would give it, by one-hot linear interpolation."""
    grid = resample_to_spacing(Image(np.zeros_like(label.array, dtype=np.float32), label.affine), spacing_mm)
    return label_to_grid_onehot(label, grid.affine, grid.spatial_shape)


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
