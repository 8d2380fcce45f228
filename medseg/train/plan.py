"""The data plan, nnU-Net's fingerprint -> plan step done our way: measure the training data, derive settings.

``fingerprint`` measures spacings, shapes, foreground intensities and class frequencies of the training cases;
``make_plan`` turns it into a target spacing, a normalisation, a patch size, a batch size and a network topology;
``resolve_train`` fills every ``null`` key of the ``train`` config from the plan (a value in the config wins).
The plan is written as ``plan.json`` so the user can read it and override any value in the config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from medseg.config import AugmentConfig, Config, PlanConfig, TrainConfig
from medseg.volume import Image, Label

log = logging.getLogger(__name__)

MAX_LEVELS = 5  # nnU-Net stops at 5-6 poolings; deeper buys nothing on patches this size
ANISOTROPY_RATIO = 3.0  # nnU-Net's threshold for treating the coarse axis separately
FOREGROUND_SAMPLES_PER_CASE = 10_000


def fingerprint(cases: Iterable[tuple[Image, Label]], num_classes: int, seed: int = 0) -> dict[str, Any]:
    """Measure a training set.

    Args:
        cases: ``(image, label)`` pairs on their original grids, channel-first ``(1, X, Y, Z)``.
        num_classes: label values ``0 .. num_classes - 1`` (background included).
        seed: for the foreground intensity sample.

    Returns:
        Spacings and shapes per case, foreground intensity statistics (percentiles, mean, std over a sample of
        foreground voxels, as nnU-Net does), and per class the share of foreground voxels and of cases holding it.
    """
    rng = np.random.default_rng(seed)
    spacings, shapes, samples = [], [], []
    voxels = np.zeros(num_classes, dtype=np.float64)
    present = np.zeros(num_classes, dtype=np.int64)
    for image, label in cases:
        spacings.append(list(image.spacing))
        shapes.append(list(image.spatial_shape))
        lab = label.array[0]
        counts = np.bincount(lab.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        voxels += counts
        present += counts > 0
        foreground = image.array[0][lab > 0]
        if foreground.size:
            take = min(FOREGROUND_SAMPLES_PER_CASE, foreground.size)
            samples.append(rng.choice(foreground, take, replace=False))
    n = len(spacings)
    intensities = np.concatenate(samples) if samples else np.zeros(1)
    fg_total = voxels[1:].sum()
    return {
        "n_cases": n,
        "spacings_mm": spacings,
        "shapes_vox": shapes,
        "median_spacing_mm": np.median(np.array(spacings), axis=0).tolist() if n else None,
        "median_shape_vox": np.median(np.array(shapes), axis=0).tolist() if n else None,
        "foreground_intensity": {
            "mean": float(intensities.mean()),
            "std": float(intensities.std()),
            "p00_5": float(np.percentile(intensities, 0.5)),
            "p50": float(np.percentile(intensities, 50)),
            "p99_5": float(np.percentile(intensities, 99.5)),
        },
        "class_voxel_share": [float(v / fg_total) if fg_total else 0.0 for v in voxels[1:]],
        "class_case_share": [float(p / n) if n else 0.0 for p in present[1:]],
    }


def target_spacing(spacings: np.ndarray) -> list[float]:
    """Median spacing; for anisotropic data (ratio > 3) the coarse axis takes the 10th percentile (nnU-Net)."""
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] / max(float(np.min(target)), 1e-6) > ANISOTROPY_RATIO:
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return [float(t) for t in target]


def topology(
    patch: list[int], spacing: list[float], min_feature_map_vox: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Down-sampling strides and convolution kernels per level, nnU-Net's rule: halve an axis while its feature
    map stays at least ``min_feature_map_vox`` and its voxel is not more than twice the finest; a kernel of 1 on
    an axis that is still much coarser than the others (anisotropic early levels).

    Returns:
        ``(strides, kernels)``: ``len(kernels) == len(strides) + 1``, each an entry per axis of ``patch``.
    """
    size, current = list(patch), list(spacing)
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    for _ in range(MAX_LEVELS):
        finest = min(current)
        kernels.append([3 if s <= 2 * finest else 1 for s in current])
        stride = [2 if size[a] >= 2 * min_feature_map_vox and current[a] <= 2 * finest else 1 for a in range(len(size))]
        if not any(s == 2 for s in stride):
            break
        strides.append(stride)
        size = [sz // st for sz, st in zip(size, stride, strict=True)]
        current = [c * st for c, st in zip(current, stride, strict=True)]
    else:
        kernels.append([3] * len(size))
    return strides, kernels[: len(strides) + 1]


def _divisible(patch: list[int], strides: list[list[int]]) -> list[int]:
    factor = [int(np.prod([s[a] for s in strides])) if strides else 1 for a in range(len(patch))]
    return [int(math.ceil(p / f) * f) for p, f in zip(patch, factor, strict=True)]


GPU_BASE_FEATURES = 32  # nnU-Net's
# On a CPU iterations are scarce (benchmarks/train_speed.py, BENCHMARKS.md): MONAI's residual UNet, whose first
# convolution already halves the grid, runs an iteration 2.7x faster than a DynUNet with half its features, which
# convolves twice at full resolution on every level of the way down and up.
CPU_NETWORK = "unet"
CPU_BASE_FEATURES = {"unet": 16, "segresnet": 16, "dynunet": 8}


# A CPU budget buys a few thousand iterations, not nnU-Net's 250,000: there its augmentation (rotations to 30 deg
# about every axis, zoom 0.7-1.4, blur, simulated low resolution) slows learning more than it regularises. Measured
# on the hippocampus benchmark (BENCHMARKS.md: 0.862 vs 0.848 Dice in 15 minutes); cheaper per sample as well.
LIGHT_AUGMENT: dict[str, Any] = {
    "flip_prob": 0.5,
    "rotation_prob": 0.3,
    "rotation_deg": 15.0,
    "scale_prob": 0.3,
    "scale_range": (0.9, 1.1),
    "elastic_prob": 0.0,
    "noise_prob": 0.1,
    "noise_std": 0.05,
    "blur_prob": 0.0,
    "brightness_prob": 0.15,
    "brightness_range": (0.9, 1.1),
    "contrast_prob": 0.15,
    "contrast_range": (0.9, 1.1),
    "low_resolution_prob": 0.0,
    "gamma_prob": 0.15,
    "gamma_range": (0.8, 1.25),
}


def resolve_augment(augment: AugmentConfig, planned: str) -> AugmentConfig:
    """The augmentation with ``preset: auto`` replaced by the plan's preset; keys the user set are kept."""
    preset = augment.preset if augment.preset != "auto" else planned
    values = LIGHT_AUGMENT if preset == "light" else {}
    update = {k: v for k, v in values.items() if k not in augment.model_fields_set}
    return augment.model_copy(update={**update, "preset": preset})


def choose_network(requested: str, device_type: str) -> str:
    """``train.network``; ``auto`` is DynUNet (nnU-Net's) on a GPU and MONAI's residual UNet on a CPU."""
    if requested != "auto":
        return requested
    return "dynunet" if device_type == "cuda" else CPU_NETWORK


def make_plan(fp: dict[str, Any], config: Config, device_type: str = "cpu") -> dict[str, Any]:
    """Derive settings from a fingerprint.

    Args:
        fp: output of :func:`fingerprint`.
        config: the run's config; ``resample.normalization`` states the modality, ``plan`` the budgets,
            ``train.spatial_dims`` 2D or 3D.
        device_type: ``cpu`` or ``cuda``: picks the network when ``train.network`` is ``auto`` and sizes it when
            ``plan.base_features`` is null.

    Returns:
        ``{"resample": {...}, "train": {...}, "fingerprint": fp}``: target spacing, normalisation (CT: clip to
        the foreground 0.5-99.5 percentiles then z-score with the foreground mean and std; MR: per-case z-score)
        and the train settings (patch, batch, channels, strides, kernels).
    """
    pc: PlanConfig = config.plan
    spacings = np.array(fp["spacings_mm"], dtype=float)
    shapes = np.array(fp["shapes_vox"], dtype=float)
    spacing = target_spacing(spacings)
    resampled = np.median(shapes * spacings / np.array(spacing), axis=0)
    dims = config.train.spatial_dims
    axes = 2 if dims == 2 else 3
    patch = [max(round(float(s)), 1) for s in resampled[:axes]]
    while np.prod(patch) > pc.max_patch_voxels:
        # shrink the axis that is largest in mm, as nnU-Net does, keeping the field of view roughly isotropic
        mm = [p * s for p, s in zip(patch, spacing[:axes], strict=True)]
        a = int(np.argmax(mm))
        patch[a] = max(int(patch[a] * 0.9), pc.min_feature_map_vox)
    strides, kernels = topology(patch, spacing[:axes], pc.min_feature_map_vox)
    patch = _divisible(patch, strides)
    network = choose_network(config.train.network, device_type)
    base = pc.base_features or (GPU_BASE_FEATURES if device_type == "cuda" else CPU_BASE_FEATURES[network])
    channels = [min(base * 2**i, pc.max_features) for i in range(len(kernels))]
    patch_vox = int(np.prod(patch))
    # nnU-Net's rule: a batch covers at most 5% of the dataset's voxels, and at least 2 patches
    dataset_vox = float(np.sum(np.prod(shapes * spacings / np.array(spacing), axis=1)))
    batch = int(max(2, min(pc.max_batch_voxels // patch_vox, 0.05 * dataset_vox // patch_vox)))
    fi = fp["foreground_intensity"]
    if config.resample.normalization == "ct":
        normalization = {
            "scheme": "ct",
            "clip": [fi["p00_5"], fi["p99_5"]],
            "mean": fi["mean"],
            "std": fi["std"],
            "note": "clip to the foreground 0.5-99.5 percentiles, then z-score with the foreground mean and std",
        }
    else:
        normalization = {"scheme": "zscore", "note": "per-case z-score (intensities without a unit, e.g. MR)"}
    return {
        "resample": {"target_spacing_mm": spacing, "normalization": normalization},
        "train": {
            "network": network,
            "augment_preset": "nnunet" if device_type == "cuda" else "light",
            "spatial_dims": dims,
            "patch_size_vox": patch + [1] * (3 - axes),
            "batch_size": batch,
            "channels": channels,
            "strides": strides,
            "kernel_sizes": kernels,
            "median_resampled_shape_vox": [float(s) for s in resampled],
        },
        "fingerprint": {k: v for k, v in fp.items() if k not in ("spacings_mm", "shapes_vox")},
    }


def _uniform(strides: list[list[int]]) -> list[int]:
    return [max(s) for s in strides]


def resolve_train(train: TrainConfig, plan: dict[str, Any]) -> TrainConfig:
    """The train config with every ``null`` key taken from the plan; set keys are kept (the user's override).

    ``network: auto`` takes the plan's network, ``augment.preset: auto`` the plan's augmentation preset.
    ``unet`` and ``segresnet`` take the plan's levels; ``segresnet`` halves every axis per level, so its patch is
    rounded up to fit.
    """
    p = plan["train"]
    network = train.network if train.network != "auto" else p.get("network", "dynunet")
    channels = train.channels if train.channels is not None else tuple(p["channels"])
    levels = len(channels)
    strides = train.strides
    if strides is None:
        planned = [tuple(s) for s in p["strides"]][: levels - 1]
        while len(planned) < levels - 1:  # the user asked for more levels than the plan: halve in-plane
            planned.append(tuple([2] * len(p["strides"][0] if p["strides"] else [2] * (train.spatial_dims))))
        strides = tuple(planned)
    kernels = train.kernel_sizes
    if kernels is None:
        planned_k = [tuple(k) for k in p["kernel_sizes"]][:levels]
        while len(planned_k) < levels:
            planned_k.append(tuple([3] * train.spatial_dims))
        kernels = tuple(planned_k)
    patch = train.patch_size_vox if train.patch_size_vox is not None else tuple(p["patch_size_vox"])
    if network == "segresnet":
        f = 2 ** (levels - 1)
        axes = 2 if train.spatial_dims == 2 else 3
        patch = tuple(int(math.ceil(s / f) * f) if a < axes else s for a, s in enumerate(patch))
    batch = train.batch_size if train.batch_size is not None else int(p["batch_size"])
    return train.model_copy(
        update={
            "network": network,
            "augment": resolve_augment(train.augment, p.get("augment_preset", "nnunet")),
            "channels": tuple(channels),
            "strides": tuple(strides),
            "kernel_sizes": tuple(kernels),
            "patch_size_vox": tuple(int(s) for s in patch),
            "batch_size": batch,
        }
    )


def overrides(train: TrainConfig) -> dict[str, Any]:
    """Which planned keys the user set in the config (they win over the plan)."""
    keys = ("channels", "strides", "kernel_sizes", "patch_size_vox", "batch_size")
    return {k: getattr(train, k) for k in keys if getattr(train, k) is not None}
