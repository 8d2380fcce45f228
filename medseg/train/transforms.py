"""MONAI dictionary transforms for training. Every spatial transform acts on ``image`` and ``label`` together
(``mode=("bilinear", "nearest")``), so augmentation never separates a mask from its image
(``tests/train/test_transforms.py`` checks this over many random draws).

nnU-Net's recipe, in its order: foreground-oversampled patches, rotation and scaling, optional elastic
deformation, Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution, gamma, mirroring.
For 2D (patches ``(X, Y, 1)``) rotation is in-plane, scaling and mirroring act on X and Y only; 3D with
``in_plane_only`` rotates and scales in-plane too (thick slices) but mirrors all three axes.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SpatialPadd,
)
from monai.transforms.utils import create_rotate, create_scale
from monai.utils import MAX_SEED
from torch.nn import functional

from medseg.config import AugmentConfig

KEYS = ("image", "label")


class OneThread(Compose):
    """``transforms`` run with one torch thread, wherever they run. A batch must not depend on where it is drawn (a
    worker process has one thread, the training process as many as its thread tuner gives it), and a reduction (the
    contrast's mean) or a convolution (the elastic field's smoothing, the blur) rounds differently with the thread
    count. Cropping, mirroring and :class:`RandRotateScaled` (elementwise grid, ``grid_sample``) do not, so they keep
    the threads: on 2 cores, drawing whole batches with one thread cost 3% of the training's samples/s."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return super().__call__(input_, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)


def reseed(transform: Randomizable, seed: int) -> None:
    """Seed ``transform`` and every random transform in it exactly as MONAI's ``set_random_state(seed=seed)`` does
    (a ``Compose`` draws each member's seed from its own stream; a transform passes its seed on to the transforms it
    wraps), but by re-seeding the random states it already has (1.3 us each) instead of building new ones (80 us
    each: 20 per batch of the CPU plan, 1.6 ms of the ~17 ms its drawing takes). The draws are the same
    (``tests/train/test_transforms.py``). Call MONAI's ``set_random_state`` once first, so that no transform still
    uses the random state MONAI's class shares between instances."""
    seed = int(seed) % MAX_SEED
    if "R" not in vars(transform):  # MONAI's class-level state, shared: give this one its own, as MONAI would
        transform.set_random_state(seed=seed)
        return
    transform.R.seed(seed)
    if isinstance(transform, Compose):
        for member in transform.transforms:
            if isinstance(member, Randomizable):
                reseed(member, int(transform.R.randint(MAX_SEED, dtype="uint32")))
        return
    for inner in vars(transform).values():  # e.g. RandGaussianNoised's RandGaussianNoise: the same seed
        if isinstance(inner, Randomizable):
            reseed(inner, seed)


@functools.lru_cache(maxsize=8)
def _base_grid(shape: tuple[int, ...]) -> torch.Tensor:
    """``grid_sample``'s identity grid for ``shape`` (align_corners=False): (X, Y, Z, 3), the last axis (z, y, x)."""
    axes = [(2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)


class RandRotateScaled(RandomizableTransform, MapTransform):
    """Rotate (with ``rotation_prob``) and scale (with ``scale_prob``, independently) ``keys`` together, in one
    resampling: trilinear for the image, nearest for the label, zeros outside, the output on the input's grid.

    The angles and factors are drawn as MONAI's ``RandAffined`` draws them (``rotate_range``: per axis a radian
    range or 0; ``scale_range``: per axis a range added to 1) and the matrix is MONAI's (``create_rotate @
    create_scale``, in voxel space about the patch centre). Why not ``RandAffined`` itself: on these small patches
    it spends about 4 of its 5 ms per call outside the resampling (grid building and bookkeeping; measured with
    metadata tracking off, 40 x 56 x 40 patches), and with rotation and scaling as two transforms a patch drawn for
    both is resampled twice. Here the work is one sampling grid (the cached identity grid times the matrix) and one
    ``grid_sample`` per key: about 2.5 ms per transformed 40 x 56 x 40 patch and its mask, on one thread.

    Args:
        keys: the keys to transform (all the same spatial shape).
        rotation_prob: chance of a rotation. rotate_range: per axis ``(lo, hi)`` radians, or 0 for none.
        scale_prob: chance of a scaling. scale_range: per axis ``(lo, hi)`` added to 1, or 0 for none.
        modes: ``grid_sample`` mode per key (``bilinear`` is trilinear in 3D; ``nearest`` for labels), or
            ``onehot`` for a label map resampled as nnU-Net does by default: each foreground class's one-hot mask
            interpolated linearly, background what is left, and the largest share wins (ties to the lower label).
    """

    def __init__(
        self,
        keys: Sequence[str],
        rotation_prob: float,
        rotate_range: Sequence[Any],
        scale_prob: float,
        scale_range: Sequence[Any],
        modes: Sequence[str] = ("bilinear", "nearest"),
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.rotation_prob, self.scale_prob = rotation_prob, scale_prob
        self.rotate_range = [r if isinstance(r, Sequence) else (-float(r), float(r)) for r in rotate_range]
        self.scale_range = [r if isinstance(r, Sequence) else (-float(r), float(r)) for r in scale_range]
        self.modes = dict(zip(keys, modes, strict=True))
        self.matrix: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        matrix = np.eye(4)
        drawn = False
        if self.R.rand() < self.rotation_prob:
            angles = [self.R.uniform(lo, hi) for lo, hi in self.rotate_range]
            matrix = matrix @ create_rotate(3, angles)
            drawn = True
        if self.R.rand() < self.scale_prob:
            factors = [1.0 + self.R.uniform(lo, hi) for lo, hi in self.scale_range]
            matrix = matrix @ create_scale(3, factors)
            drawn = True
        self.matrix = matrix[:3, :3] if drawn else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        out = dict(data)
        if self.matrix is None:
            return out
        shape = tuple(np.shape(out[self.keys[0]])[1:])
        # the matrix maps output to input voxel offsets from the centre; grid_sample wants normalised coordinates
        # (align_corners=False: offset = n * size / 2) with the axes in reverse order (x indexes the last dim)
        half = np.asarray(shape, dtype=float) / 2.0
        theta = (self.matrix * half[None, :] / half[:, None])[::-1, ::-1]
        theta = torch.as_tensor(theta.copy(), dtype=torch.float32)
        # grid = base @ theta.T written out elementwise: a matmul (affine_grid's) rounds differently with the
        # thread count, and a worker process (1 thread) must draw exactly what the training process draws
        base = _base_grid(shape)
        grid = base[..., 0, None] * theta[:, 0] + base[..., 1, None] * theta[:, 1] + base[..., 2, None] * theta[:, 2]
        grid = grid[None]
        for key in self.key_iterator(out):
            array = torch.as_tensor(out[key])
            if self.modes[key] == "onehot":
                out[key] = _resample_labels(array, grid)
                continue
            moved = functional.grid_sample(
                array[None].float(), grid, mode=self.modes[key], padding_mode="zeros", align_corners=False
            )[0]
            out[key] = moved.to(array.dtype)
        return out


def _resample_labels(label: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``label`` (1, ...) resampled on ``grid`` by linear interpolation of each non-zero label's one-hot mask;
    background (0) is what the others leave (1 outside the input), and the largest share wins. MONAI's
    resamplers offer nearest neighbour for labels only, whose staircase boundaries a rotated mask then teaches."""
    labels = label[0].round().long()
    values = torch.unique(labels)
    values = values[values != 0]  # the labels present, an ignore value (255, -1) among them, without background
    if values.numel() == 0:
        return torch.zeros_like(label)
    onehot = (labels[None] == values.view(-1, *[1] * labels.ndim)).float()
    shares = functional.grid_sample(onehot[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    # the largest share, ties to the lower label, one class at a time: torch's argmax across the first axis of
    # (classes, X, Y, Z) took 12 ms per 40 x 56 x 40 patch, this loop 0.9 ms
    best = 1.0 - shares.sum(0)
    out = torch.zeros(shares.shape[1:], dtype=label.dtype)
    for value, share in zip(values.tolist(), shares, strict=True):
        out[share > best] = value
        best = torch.maximum(best, share)
    return out[None]


def spatial_transforms(augment: AugmentConfig, spatial_dims: int) -> list[MapTransform]:
    """Rotation, scaling, optional elastic deformation and mirroring of ``image`` and ``label`` together."""
    angle = float(np.deg2rad(augment.rotation_deg))
    lo, hi = augment.scale_range
    scale = (lo - 1.0, hi - 1.0)
    if spatial_dims == 2 or augment.in_plane_only:
        rotate: tuple = (0.0, 0.0, (-angle, angle))
        scale_range: tuple = (scale, scale, (0.0, 0.0))
        flip_axes = (0, 1) if spatial_dims == 2 else (0, 1, 2)
    else:
        rotate = ((-angle, angle),) * 3
        scale_range = (scale, scale, scale)
        flip_axes = (0, 1, 2)
    out: list[MapTransform] = []
    if augment.rotation_prob > 0 or augment.scale_prob > 0:
        # nnU-Net draws one zoom for all axes; MONAI's scale_range draws per axis, which also covers aspect changes
        label_mode = "onehot" if augment.label_interpolation == "linear" else "nearest"
        out.append(
            RandRotateScaled(
                KEYS, augment.rotation_prob, rotate, augment.scale_prob, scale_range, modes=("bilinear", label_mode)
            )
        )
    if augment.elastic_prob > 0 and spatial_dims == 3:
        elastic = Rand3DElasticd(
            KEYS,
            sigma_range=(5.0, 7.0),
            magnitude_range=(50.0, 150.0),
            prob=augment.elastic_prob,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        )
        out.append(OneThread([elastic]))
    out.extend(RandFlipd(KEYS, prob=augment.flip_prob, spatial_axis=axis) for axis in flip_axes)
    return out


def intensity_transforms(augment: AugmentConfig, spatial_dims: int = 3) -> list[MapTransform]:
    """Noise, blur, brightness, contrast, simulated low resolution and gamma on ``image`` only.

    In 2D the blur leaves Z alone and simulated low resolution is skipped (MONAI's zoom would empty a 1-voxel Z).
    """
    sigma_z = (0.0, 0.0) if spatial_dims == 2 else (0.5, 1.0)
    low_res = (
        []
        if spatial_dims == 2
        else [RandSimulateLowResolutiond("image", prob=augment.low_resolution_prob, zoom_range=(0.5, 1.0))]
    )
    return [
        RandGaussianNoised("image", prob=augment.noise_prob, std=augment.noise_std),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=sigma_z, prob=augment.blur_prob),
        # brightness: multiply by a factor in brightness_range
        RandScaleIntensityd(
            "image",
            factors=(augment.brightness_range[0] - 1, augment.brightness_range[1] - 1),
            prob=augment.brightness_prob,
        ),
        # contrast: scale around the mean and keep the original range (nnU-Net's ContrastAugmentation)
        RandScaleIntensityFixedMeand(
            "image",
            factors=(augment.contrast_range[0] - 1, augment.contrast_range[1] - 1),
            preserve_range=True,
            prob=augment.contrast_prob,
        ),
        *low_res,
        RandAdjustContrastd("image", gamma=augment.gamma_range, prob=augment.gamma_prob),
    ]


def train_transforms(
    augment: AugmentConfig,
    patch_size: Sequence[int],
    spatial_dims: int = 3,
    samples_per_volume: int = 1,
    foreground_fraction: float = 0.67,
    locations: bool = False,
) -> Compose:
    """Pad, cut foreground-oversampled patches, then the spatial and intensity augmentation.

    Inputs: ``image`` float ``(1, X, Y, Z)``, ``label`` ``(1, X, Y, Z)``; outputs ``samples_per_volume`` patches
    of ``patch_size``. ``foreground_fraction`` of them are centred on a labelled voxel, the rest on background.
    ``locations``: the inputs are padded already and carry ``fg`` and ``bg``, flat indices of the voxels to centre
    crops on (:class:`medseg.train.data.PatchBatches`), so neither padding nor a search of the label is repeated.
    """
    pos = foreground_fraction
    neg = 1.0 - foreground_fraction
    # replicate the edge, as sliding-window inference pads (medseg.sliding_window): a patch larger than the
    # volume must look the same in training and at inference
    pad = [] if locations else [SpatialPadd(KEYS, spatial_size=patch_size, mode="edge")]
    return Compose(
        [
            *pad,
            RandCropByPosNegLabeld(
                KEYS,
                label_key="label",
                spatial_size=patch_size,
                pos=pos,
                neg=neg,
                num_samples=samples_per_volume,
                allow_smaller=True,
                fg_indices_key="fg" if locations else None,
                bg_indices_key="bg" if locations else None,
            ),
            *spatial_transforms(augment, spatial_dims),
            OneThread(intensity_transforms(augment, spatial_dims)),
        ]
    )
