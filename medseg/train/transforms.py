"""MONAI dictionary transforms for training. Every spatial transform acts on ``image`` and ``label`` together
(``mode=("bilinear", "nearest")``), so augmentation never separates a mask from its image
(``tests/train/test_transforms.py`` checks this over many random draws).

nnU-Net's recipe, in its order: foreground-oversampled patches, rotation and scaling, optional elastic
deformation, Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution, gamma, mirroring.
For 2D (patches ``(X, Y, 1)``) rotation is in-plane, scaling and mirroring act on X and Y only; 3D with
``in_plane_only`` rotates and scales in-plane too (thick slices) but mirrors all three axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SpatialPadd,
)

from medseg.config import AugmentConfig

KEYS = ("image", "label")


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
    if augment.rotation_prob > 0:
        out.append(
            RandAffined(
                KEYS,
                prob=augment.rotation_prob,
                rotate_range=rotate,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if augment.scale_prob > 0:
        # nnU-Net draws one zoom for all axes; MONAI's scale_range draws per axis, which also covers aspect changes
        out.append(
            RandAffined(
                KEYS,
                prob=augment.scale_prob,
                scale_range=scale_range,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if augment.elastic_prob > 0 and spatial_dims == 3:
        out.append(
            Rand3DElasticd(
                KEYS,
                sigma_range=(5.0, 7.0),
                magnitude_range=(50.0, 150.0),
                prob=augment.elastic_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
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
            *intensity_transforms(augment, spatial_dims),
        ]
    )
