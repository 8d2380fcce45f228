"""MONAI dictionary transforms for training. Every spatial transform acts on ``image`` and ``label`` together
(``mode=("bilinear", "nearest")``), so augmentation never separates a mask from its image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

KEYS = ("image", "label")


def train_transforms(patch_size: Sequence[int], samples_per_volume: int = 2) -> Compose:
    """Foreground-oversampled patches (2 of 3 centred on a labelled voxel), flips, rotation and scaling, then
    intensity noise, scale, shift and gamma. Inputs: ``image`` float ``(1, X, Y, Z)``, ``label`` ``(1, X, Y, Z)``."""
    return Compose(
        [
            SpatialPadd(KEYS, spatial_size=patch_size, mode="edge"),
            RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=patch_size, pos=2, neg=1, num_samples=samples_per_volume
            ),
            RandAffined(
                KEYS,
                prob=0.3,
                rotate_range=(0.0, 0.0, np.deg2rad(15)),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandFlipd(KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(KEYS, prob=0.5, spatial_axis=2),
            RandGaussianNoised("image", prob=0.15, std=0.05),
            RandScaleIntensityd("image", factors=0.1, prob=0.2),
            RandShiftIntensityd("image", offsets=0.1, prob=0.2),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.15),
        ]
    )
