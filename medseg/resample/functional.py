"""Pure resampling and normalisation functions. They never modify their inputs.

Resampling is MONAI's (``Spacing`` to a target spacing, ``SpatialResample`` onto any given grid); the volume's
type picks the interpolation (labels nearest, images trilinear). Images on axis-aligned grids take an exact
separable path with bounded memory (:func:`separable_linear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, zoom_affine
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


def _axis_weights(scale: float, offset: float, indices: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower neighbour and weight of the upper one, for source coordinates ``scale * i + offset`` clamped to
    the grid (``padding_mode="border"``, as ``grid_sample`` clamps)."""
    u = np.clip(scale * indices + offset, 0, size - 1)
    lower = np.minimum(np.floor(u), max(size - 2, 0)).astype(np.int64)
    weight = (u - lower).astype(np.float32)
    return torch.as_tensor(lower), torch.as_tensor(weight)


def separable_linear(
    source: torch.Tensor,
    mapping: np.ndarray,
    shape: Sequence[int],
    z0: int,
    z1: int,
    xy_box: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Trilinear resampling of ``source`` ``(C, x, y, z)`` onto slices ``z0:z1`` of the grid ``shape`` (only the
    columns ``xy_box = ((x0, x1), (y0, y1))`` of it when given), for an axis-aligned ``mapping`` (destination
    voxel -> source voxel): three 1-D passes instead of a 3-D sampling grid over the whole output; the same
    values as ``grid_sample`` (linear, border), which MONAI's ``Spacing``/``SpatialResample`` run. Written here
    because MONAI has no separable path: its resampling builds a sampling grid of 3 floats per output voxel,
    several times the output's own size, and is about 3x slower.

    The last axis is interpolated by a small matrix product (a gather along the innermost axis is slow); the
    other two by a pair of gathers and a ``lerp``, the axis that grows most last. Only the source voxels the
    output needs are read, and only they become float32, so an int16 scan is never converted whole.
    """
    box = xy_box or ((0, shape[0]), (0, shape[1]))
    taps = []  # per axis: lower neighbour, weight of the upper one, upper neighbour (source indices)
    for axis, (lo, hi) in enumerate((*box, (z0, z1))):
        lower, weight = _axis_weights(mapping[axis, axis], mapping[axis, 3], np.arange(lo, hi), source.shape[axis + 1])
        taps.append((lower, weight, torch.clamp(lower + 1, max=source.shape[axis + 1] - 1)))
    first = [int(t[0].min()) for t in taps]
    last = [int(t[2].max()) + 1 for t in taps]
    part = source[:, first[0] : last[0], first[1] : last[1], first[2] : last[2]].to(torch.float32)
    lower, weight, upper = taps[2]
    matrix = torch.zeros((last[2] - first[2], z1 - z0), dtype=torch.float32)
    columns = torch.arange(z1 - z0)
    matrix.index_put_((lower - first[2], columns), 1 - weight, accumulate=True)
    matrix.index_put_((upper - first[2], columns), weight, accumulate=True)
    result = torch.matmul(part, matrix)
    for axis in (1, 0):
        lower, weight, upper = taps[axis]
        view = [1, 1, 1, 1]
        view[axis + 1] = -1
        result = torch.lerp(
            result.index_select(axis + 1, lower - first[axis]),
            result.index_select(axis + 1, upper - first[axis]),
            weight.view(view),
        )
    return result


SLAB_MB = 64.0  # working memory of one slab of the separable image resampling


def spacing_grid(affine: np.ndarray, shape: Sequence[int], spacing_mm: Sequence[float]) -> tuple[np.ndarray, tuple]:
    """The grid (affine, spatial shape) that MONAI's ``Spacing`` resamples a ``shape`` volume with ``affine`` onto:
    same directions and field of view, voxels of ``spacing_mm``."""
    new_affine = zoom_affine(np.asarray(affine, dtype=np.float64), np.asarray(spacing_mm, dtype=np.float64), False)
    out_shape, offset = compute_shape_offset(tuple(int(s) for s in shape), affine, new_affine, scale_extent=False)
    new_affine[:3, 3] = offset[:3]
    return new_affine, tuple(int(s) for s in out_shape)


def resample_to_spacing(volume: V, spacing_mm: Sequence[float]) -> V:
    """Resample onto a grid of ``spacing_mm`` covering the same field of view, same directions (MONAI ``Spacing``).

    An image whose grid keeps its axes (always, the directions do not change) takes :func:`separable_linear`
    slab by slab: the same values as ``Spacing``, without a float copy of the whole input or a full-size sampling
    grid (a 512 x 512 x 600 CT needed ~2 GB more through ``Spacing``), and faster. Labels (nearest) go through
    ``Spacing``.

    >>> lab = Label(np.ones((1, 4, 4, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> resample_to_spacing(lab, (1.0, 1.0, 1.0)).spatial_shape
    (8, 8, 8)
    """
    if isinstance(volume, Image):
        affine, shape = spacing_grid(volume.affine, volume.spatial_shape, spacing_mm)
        mapping = np.linalg.inv(volume.affine) @ affine  # new voxel index -> old voxel index
        if np.allclose(mapping[:3, :3], np.diag(np.diag(mapping[:3, :3])), atol=1e-6):
            source = torch.as_tensor(volume.array)
            out = np.empty((volume.array.shape[0], *shape), dtype=np.float32)
            # per output slice: its source slices as float32, and the z- and y-passes' float32 results
            channels, sx, sy = volume.array.shape[:3]
            per_slice = 4 * channels * sx * sy * (2 + abs(mapping[2, 2]))
            slab = int(max(1, min(shape[2], SLAB_MB * 2**20 // max(per_slice, 1))))
            for z0 in range(0, shape[2], slab):
                z1 = min(shape[2], z0 + slab)
                out[..., z0:z1] = separable_linear(source, mapping, shape, z0, z1).numpy()
            return type(volume)(out, affine)
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
    affine, shape = spacing_grid(label.affine, label.spatial_shape, spacing_mm)
    return label_to_grid_onehot(label, affine, shape)


def normalize(image: Image, config: ResampleConfig) -> Image:
    """Intensity normalisation, as the plan (or the config) sets it.

    ``ct`` (nnU-Net's CT scheme): clip to ``intensity_clip`` (the training foreground's 0.5-99.5 percentiles),
    then z-score with ``intensity_mean`` and ``intensity_std`` (the training foreground's), the same for every scan
    so HU keep their meaning. ``zscore``: per-scan zero mean, unit variance (MR, where intensities have no unit).
    ``window``: clip to ``ct_clip_hu`` and map the window linearly onto [-1, 1].

    Raises:
        ValueError: ``normalization`` or, for ``ct``, its statistics are not resolved (no plan applied).
    """
    array = image.array.astype(np.float32)
    if config.normalization == "ct":
        if config.intensity_clip is None or config.intensity_mean is None or config.intensity_std is None:
            raise ValueError("resample.normalization ct needs the plan's intensity_clip, intensity_mean, intensity_std")
        lo, hi = config.intensity_clip
        array = (np.clip(array, lo, hi) - config.intensity_mean) / config.intensity_std
    elif config.normalization == "window":
        lo, hi = config.ct_clip_hu
        array = (np.clip(array, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    elif config.normalization == "zscore":
        std = float(array.std())
        array = (array - float(array.mean())) / (std if std > 0 else 1.0)
    else:
        raise ValueError("resample.normalization is not resolved: apply the plan (results/plan/plan.json) first")
    return Image(array.astype(np.float32), image.affine.copy())


def preprocess(image: Image, config: ResampleConfig) -> Image:
    """What training and inference both apply to a canonical image: resample, then normalise.

    Raises:
        ValueError: the config's target spacing is not resolved (no plan applied).
    """
    if config.target_spacing_mm is None:
        raise ValueError("resample.target_spacing_mm is not resolved: apply the plan (results/plan/plan.json) first")
    return normalize(resample_to_spacing(image, config.target_spacing_mm), config)
