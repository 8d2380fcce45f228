"""The data plan, nnU-Net's fingerprint -> plan step done our way: measure the training data, derive settings.

``fingerprint`` measures spacings, shapes, intensities and class frequencies of the training cases;
``make_plan`` turns it into a target spacing, a normalisation, a patch size, a batch size, a network topology and
a training budget; ``resolve_train`` / ``resolve_resample`` fill every ``null`` key of the config from the plan (a
value in the config wins, and :func:`overrides` lists it); ``contract`` is what a trained model remembers of its
training data, which ``medseg predict`` checks new scans against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from medseg.config import AugmentConfig, Config, PlanConfig, Recipe, ResampleConfig, TrainConfig
from medseg.volume import Image, Label

log = logging.getLogger(__name__)

MAX_LEVELS = 5  # nnU-Net stops at 5-6 poolings; deeper buys nothing on patches this size
ANISOTROPY_RATIO = 3.0  # nnU-Net's threshold for treating the coarse axis separately
FOREGROUND_SAMPLES_PER_CASE = 10_000


def case_fingerprint(image: Image, label: Label, num_classes: int, seed: int) -> dict[str, Any]:
    """One case's share of :func:`fingerprint`: spacing, shape, class voxel counts, whole-image 1st and 99th
    intensity percentiles, and a seeded sample of at most 10,000 foreground intensities (as nnU-Net samples)."""
    lab = label.array[0]
    counts = np.bincount(lab.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    foreground = image.array[0][lab > 0]
    take = min(FOREGROUND_SAMPLES_PER_CASE, foreground.size)
    sample = np.random.default_rng(seed).choice(foreground, take, replace=False) if take else foreground[:0]
    p01, p99 = np.percentile(image.array[0], [1, 99]) if image.array.size else (0.0, 0.0)
    return {
        "spacing": list(image.spacing),
        "shape": list(image.spatial_shape),
        "counts": counts,
        "p01": float(p01),
        "p99": float(p99),
        "sample": sample.astype(np.float64),
    }


def fingerprint(cases: Iterable[dict[str, Any]], num_classes: int, modalities: Iterable[str] = ()) -> dict[str, Any]:
    """Measure a training set.

    Args:
        cases: :func:`case_fingerprint` of each training case (computed in parallel by the plan stage).
        num_classes: label values ``0 .. num_classes - 1`` (background included).
        modalities: each case's modality (``CT``, ``MR``, ... or ``""`` when the input did not say).

    Returns:
        Spacings and shapes per case, foreground intensity statistics (percentiles, mean, std over a sample of
        foreground voxels, as nnU-Net does), the range of the cases' whole-image 1st and 99th percentiles, the
        modalities, and per class the share of foreground voxels and of cases holding it.
    """
    spacings, shapes, samples, p01, p99 = [], [], [], [], []
    voxels = np.zeros(num_classes, dtype=np.float64)
    present = np.zeros(num_classes, dtype=np.int64)
    for case in cases:
        spacings.append(case["spacing"])
        shapes.append(case["shape"])
        voxels += case["counts"]
        present += case["counts"] > 0
        p01.append(case["p01"])
        p99.append(case["p99"])
        if case["sample"].size:
            samples.append(case["sample"])
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
        "image_p01_range": [float(min(p01)), float(max(p01))] if n else None,
        "image_p99_range": [float(min(p99)), float(max(p99))] if n else None,
        "modalities": sorted({m or "unknown" for m in modalities}),
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


# Patch-size multiples the transformer networks need: SwinUNETR merges patches 5 times (2^5), UNETR embeds 16^3
# patches; resolve_train rounds the patch up to them.
PATCH_MULTIPLE = {"swin_unetr": 32, "unetr": 16}
GPU_BASE_FEATURES = 32  # nnU-Net's
# On a CPU iterations are scarce (benchmarks/train_speed.py, BENCHMARKS.md): MONAI's residual UNet, whose first
# convolution already halves the grid, runs an iteration 2.7x faster than a DynUNet with half its features, which
# convolves twice at full resolution on every level of the way down and up.
CPU_NETWORK = "unet"
CPU_BASE_FEATURES = {"unet": 16, "segresnet": 16, "dynunet": 8}  # others: 16


# A CPU budget buys a few thousand iterations, not nnU-Net's 250,000: there its augmentation (rotations to 30 deg
# about every axis, zoom 0.7-1.4, blur, simulated low resolution) slows learning more than it regularises. Measured
# on the hippocampus benchmark (BENCHMARKS.md: 0.862 vs 0.848 Dice in 15 minutes); cheaper per sample as well.
# Rotation and scaling are the part that pays (none: 0.875; p 0.3, +-15 deg, 0.9-1.1: 0.882-0.885; p 0.5, +-20 deg,
# 0.85-1.15: 0.886-0.887 with two seeds each; p 0.7, +-25 deg, 0.8-1.2: 0.884), the intensity part does not
# (nnU-Net's intensity values: 0.881), so rotation and scaling sit at the best of those, intensity stays mild.
LIGHT_AUGMENT: dict[str, Any] = {
    "flip_prob": 0.5,
    "rotation_prob": 0.5,
    "rotation_deg": 20.0,
    "scale_prob": 0.5,
    "scale_range": (0.85, 1.15),
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


# Training budgets when the config sets neither train.epochs nor train.max_minutes, in iterations: nnU-Net's
# 1000 epochs x 250 on a GPU; on a CPU about 15-25 minutes of a 2-core machine (0.15-0.25 s per iteration).
GPU_BUDGET_ITERATIONS = 250_000
CPU_BUDGET_ITERATIONS = 6_000
UNBOUNDED_EPOCHS = 1_000_000  # max_minutes alone bounds the run


def normalization_for(fp: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's normalisation by modality: CT (every training case CT) clips to the foreground's 0.5-99.5
    percentiles and z-scores with the foreground's mean and std, the same for every scan; anything else (MR, or
    inputs that did not say) is z-scored per scan."""
    fi = fp["foreground_intensity"]
    if fp.get("modalities") == ["CT"]:
        return {
            "normalization": "ct",
            "intensity_clip": [fi["p00_5"], fi["p99_5"]],
            "intensity_mean": fi["mean"],
            "intensity_std": max(fi["std"], 1e-6),
        }
    return {"normalization": "zscore"}


def make_plan(fp: dict[str, Any], config: Config, device_type: str = "cpu") -> dict[str, Any]:
    """Derive settings from a fingerprint: what the data alone suggest (the config's overrides come later).

    Args:
        fp: output of :func:`fingerprint`.
        config: the run's config; ``plan`` holds the budgets, ``train.spatial_dims`` 2D or 3D, ``train.network``
            the network family when the user chose one.
        device_type: ``cpu`` or ``cuda``: picks the network when ``train.network`` is ``auto``, sizes it when
            ``plan.base_features`` is null, and sets the augmentation preset and the budget.

    Returns:
        ``{"resample": {...}, "train": {...}}``: target spacing and normalisation; network, augmentation preset,
        patch, batch, channels, strides, kernels and the budget in epochs.
    """
    pc: PlanConfig = config.plan
    spacings = np.array(fp["spacings_mm"], dtype=float)
    shapes = np.array(fp["shapes_vox"], dtype=float)
    spacing = target_spacing(spacings)
    if config.resample.target_spacing_mm is not None:  # the patch is planned on the grid that will be used
        spacing = [float(s) for s in config.resample.target_spacing_mm]
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
    base = pc.base_features or (GPU_BASE_FEATURES if device_type == "cuda" else CPU_BASE_FEATURES.get(network, 16))
    channels = [min(base * 2**i, pc.max_features) for i in range(len(kernels))]
    patch_vox = int(np.prod(patch))
    # nnU-Net's rule: a batch covers at most 5% of the dataset's voxels, and at least 2 patches
    dataset_vox = float(np.sum(np.prod(shapes * spacings / np.array(spacing), axis=1)))
    batch = int(max(2, min(pc.max_batch_voxels // patch_vox, 0.05 * dataset_vox // patch_vox)))
    budget = GPU_BUDGET_ITERATIONS if device_type == "cuda" else CPU_BUDGET_ITERATIONS
    return {
        "resample": {"target_spacing_mm": spacing, **normalization_for(fp)},
        "train": {
            "network": network,
            "augment_preset": "nnunet" if device_type == "cuda" else "light",
            "patch_size_vox": patch + [1] * (3 - axes),
            "batch_size": batch,
            "channels": channels,
            "strides": strides,
            "kernel_sizes": kernels,
            "epochs": math.ceil(budget / config.train.iterations_per_epoch),
            "median_resampled_shape_vox": [float(s) for s in resampled],
        },
    }


def contract(fp: dict[str, Any], classes: list[str], normalization: str) -> dict[str, Any]:
    """What a model remembers of its training data (``medseg predict`` checks new scans against it): modalities,
    classes, the range of voxel spacings and of the cases' whole-image 1st and 99th intensity percentiles."""
    spacings = np.array(fp["spacings_mm"], dtype=float)
    return {
        "modalities": fp.get("modalities", ["unknown"]),
        "classes": list(classes),
        "spacing_mm": {
            "min": spacings.min(axis=0).tolist(),
            "max": spacings.max(axis=0).tolist(),
            "median": np.median(spacings, axis=0).tolist(),
        },
        "intensity": {
            "scheme": normalization,
            "image_p01": fp.get("image_p01_range"),
            "image_p99": fp.get("image_p99_range"),
        },
    }


PLANNED_TRAIN_KEYS = ("network", "channels", "strides", "kernel_sizes", "patch_size_vox", "batch_size", "epochs")
PLANNED_RESAMPLE_KEYS = ("target_spacing_mm", "normalization", "intensity_clip", "intensity_mean", "intensity_std")


def resolve_train(train: TrainConfig, planned: dict[str, Any]) -> Recipe:
    """The train config with every ``null`` key taken from the plan's ``train`` section; set keys are kept.

    ``network: auto`` takes the plan's network, ``augment.preset: auto`` the plan's augmentation preset, ``epochs:
    null`` the plan's budget, or no epoch limit when ``max_minutes`` is set (the time then bounds the run).
    ``unet`` and ``segresnet`` take the plan's levels; ``segresnet`` halves every axis per level, so its patch is
    rounded up to fit, as it is for ``swin_unetr`` (multiples of 32) and ``unetr`` (16).
    """
    p = planned
    network = train.network if train.network != "auto" else p.get("network", "dynunet")
    channels = train.channels if train.channels is not None else tuple(p["channels"])
    levels = len(channels)
    strides = train.strides
    if strides is None:
        planned_strides = [tuple(s) for s in p["strides"]][: levels - 1]
        while len(planned_strides) < levels - 1:  # the user asked for more levels than the plan: halve in-plane
            planned_strides.append(tuple([2] * len(p["strides"][0] if p["strides"] else [2] * (train.spatial_dims))))
        strides = tuple(planned_strides)
    kernels = train.kernel_sizes
    if kernels is None:
        planned_k = [tuple(k) for k in p["kernel_sizes"]][:levels]
        while len(planned_k) < levels:
            planned_k.append(tuple([3] * train.spatial_dims))
        kernels = tuple(planned_k)
    patch = train.patch_size_vox if train.patch_size_vox is not None else tuple(p["patch_size_vox"])
    multiple = {"segresnet": 2 ** (levels - 1), **PATCH_MULTIPLE}.get(network)
    if multiple is not None:
        axes = 2 if train.spatial_dims == 2 else 3
        patch = tuple(int(math.ceil(s / multiple) * multiple) if a < axes else s for a, s in enumerate(patch))
        if network == "swin_unetr" and all(s == multiple for s in patch[:axes]):
            patch = (2 * multiple, *patch[1:])  # its instance norms need a bottleneck of 2+ voxels
    batch = train.batch_size if train.batch_size is not None else int(p["batch_size"])
    epochs = train.epochs
    if epochs is None:
        epochs = UNBOUNDED_EPOCHS if train.max_minutes else int(p["epochs"])
    values = train.model_dump()
    values.update(
        network=network,
        channels=tuple(channels),
        strides=tuple(strides),
        kernel_sizes=tuple(kernels),
        patch_size_vox=tuple(int(s) for s in patch),
        batch_size=batch,
        epochs=epochs,
    )
    # the augmentation keeps its record of which keys the user set (model_dump would lose it)
    return Recipe.model_validate(values).model_copy(
        update={"augment": resolve_augment(train.augment, p.get("augment_preset", "nnunet"))}
    )


def resolve_resample(resample: ResampleConfig, planned: dict[str, Any]) -> ResampleConfig:
    """The resample config with every ``null`` key from the plan's ``resample`` section; set keys are kept.

    A user's ``normalization`` other than the plan's takes its own parameters: ``ct`` chosen for data the plan
    z-scores gets the plan's foreground statistics all the same (they are measured for every modality).
    """
    update: dict[str, Any] = {}
    for key in PLANNED_RESAMPLE_KEYS:
        if getattr(resample, key) is None and planned.get(key) is not None:
            update[key] = tuple(planned[key]) if isinstance(planned[key], list) else planned[key]
    return resample.model_copy(update=update)


def overrides(config: Config) -> dict[str, Any]:
    """The planned keys the user set in the config (they win over the plan), as ``{"train.batch_size": 4}``."""
    found: dict[str, Any] = {}
    for section, keys in (("train", PLANNED_TRAIN_KEYS), ("resample", PLANNED_RESAMPLE_KEYS)):
        values = getattr(config, section)
        for key in keys:
            value = getattr(values, key)
            if value is not None and value != "auto":
                found[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    if config.train.max_minutes is not None:
        found["train.max_minutes"] = config.train.max_minutes
    if config.train.augment.preset != "auto":
        found["train.augment.preset"] = config.train.augment.preset
    return found
