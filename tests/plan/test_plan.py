"""The data plan: fingerprint numbers you can check by hand, nnU-Net's spacing rule, and user overrides."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import AugmentConfig, validate_config
from medseg.plan.functional import (
    UNBOUNDED_EPOCHS,
    case_fingerprint,
    make_plan,
    overrides,
    resolve_resample,
    resolve_train,
    target_spacing,
    topology,
)
from medseg.plan.functional import fingerprint as fingerprint_of
from medseg.volume import Image, Label


def fingerprint(cases: list[tuple[Image, Label]], num_classes: int, modalities: list[str] | None = None) -> dict:
    measured = [case_fingerprint(image, label, num_classes, seed=0) for image, label in cases]
    return fingerprint_of(measured, num_classes, modalities or ["MR"] * len(cases))


def _case(shape: tuple[int, int, int], spacing: tuple[float, float, float], fg_value: float) -> tuple[Image, Label]:
    label = np.zeros(shape, dtype=np.uint8)
    label[2:6, 2:6, 1:3] = 1  # 32 voxels
    label[8:10, 8:10, 1:3] = 2  # 8 voxels
    image = np.where(label > 0, fg_value, -500.0).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return Image(image[None], affine), Label(label[None], affine)


def test_fingerprint_measures_spacings_shapes_intensities_and_classes() -> None:
    cases = [_case((12, 12, 4), (1.0, 1.0, 3.0), 100.0), _case((16, 12, 4), (0.8, 0.8, 3.0), 300.0)]
    fp = fingerprint(cases, num_classes=3)
    assert fp["n_cases"] == 2
    assert fp["median_spacing_mm"] == pytest.approx([0.9, 0.9, 3.0])
    assert fp["median_shape_vox"] == pytest.approx([14, 12, 4])
    # foreground only: 40 voxels at 100 and 40 at 300 -> mean 200, std 100
    assert fp["foreground_intensity"]["mean"] == pytest.approx(200.0)
    assert fp["foreground_intensity"]["std"] == pytest.approx(100.0)
    assert fp["class_voxel_share"] == pytest.approx([0.8, 0.2])
    assert fp["class_case_share"] == [1.0, 1.0]
    assert fp["modalities"] == ["MR"]
    assert fp["image_p01_range"] == pytest.approx([-500.0, -500.0])


def test_target_spacing_is_the_median_with_nnunets_anisotropy_rule() -> None:
    iso = np.array([[1.0, 1.0, 1.2], [1.0, 1.0, 1.0], [0.8, 0.8, 1.0]])
    assert target_spacing(iso) == pytest.approx([1.0, 1.0, 1.0])
    coarse = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 3.0]] * 2)  # median z 5.0 > 3x in-plane
    assert target_spacing(coarse)[2] == pytest.approx(np.percentile(coarse[:, 2], 10))


def test_topology_keeps_the_coarse_axis_until_it_catches_up() -> None:
    strides, kernels = topology([64, 64, 16], [0.7, 0.7, 3.0], min_feature_map_vox=4)
    assert strides[0] == [2, 2, 1] and kernels[0] == [3, 3, 1]  # z is 4x coarser: no pooling, no z kernel
    assert len(kernels) == len(strides) + 1
    assert all(np.prod([s[a] for s in strides]) <= 64 // 4 for a in range(2))


def test_plan_patch_fits_the_budget_and_the_strides(tmp_path) -> None:
    config = validate_config({"plan": {"max_patch_voxels": 20_000}})
    cases = [_case((60, 60, 40), (1.0, 1.0, 1.0), 50.0) for _ in range(3)]
    plan = make_plan(fingerprint(cases, 3), config, "cpu")
    patch, strides = plan["train"]["patch_size_vox"], plan["train"]["strides"]
    for axis in range(3):
        assert patch[axis] % int(np.prod([s[axis] for s in strides])) == 0
    assert np.prod(patch) <= 2 * 20_000  # rounding up to the strides may exceed the budget a little
    assert plan["train"]["batch_size"] >= 2
    assert plan["train"]["network"] == "unet" and plan["train"]["channels"][0] == 16  # CPU default
    on_gpu = make_plan(fingerprint(cases, 3), config, "cuda")["train"]
    assert on_gpu["network"] == "dynunet" and on_gpu["channels"][0] == 32
    dyn_on_cpu = validate_config({"train": {"network": "dynunet"}})
    assert make_plan(fingerprint(cases, 3), dyn_on_cpu, "cpu")["train"]["channels"][0] == 8
    assert plan["resample"]["normalization"] == "zscore"  # MR


def test_ct_normalisation_uses_foreground_percentiles_and_others_zscore() -> None:
    cases = [_case((12, 12, 4), (1.0, 1.0, 1.0), 40.0), _case((12, 12, 4), (1.0, 1.0, 1.0), 60.0)]
    ct = make_plan(fingerprint(cases, 3, ["CT", "CT"]), validate_config({}), "cpu")["resample"]
    assert ct["normalization"] == "ct"
    assert ct["intensity_clip"] == pytest.approx([np.percentile([40.0] * 40 + [60.0] * 40, 0.5), 60.0])
    assert ct["intensity_mean"] == pytest.approx(50.0) and ct["intensity_std"] == pytest.approx(10.0)
    mixed = make_plan(fingerprint(cases, 3, ["CT", ""]), validate_config({}), "cpu")["resample"]
    assert mixed == {"target_spacing_mm": [1.0, 1.0, 1.0], "normalization": "zscore"}


def test_resample_keys_come_from_the_plan_unless_set() -> None:
    planned = {"target_spacing_mm": [0.8, 0.8, 2.5], "normalization": "ct", "intensity_clip": [-100.0, 200.0],
               "intensity_mean": 50.0, "intensity_std": 30.0}  # fmt: skip
    config = validate_config({"resample": {"target_spacing_mm": [1.5, 1.5, 2.5]}})
    resolved = resolve_resample(config.resample, planned)
    assert resolved.target_spacing_mm == (1.5, 1.5, 2.5)  # the user's
    assert resolved.normalization == "ct" and resolved.intensity_clip == (-100.0, 200.0)  # the plan's
    assert overrides(config) == {"resample.target_spacing_mm": [1.5, 1.5, 2.5]}


def test_max_minutes_alone_bounds_training() -> None:
    cases = [_case((40, 40, 20), (1.0, 1.0, 1.0), 1.0)]
    timed = validate_config({"train": {"max_minutes": 15}})
    assert resolve_train(timed.train, make_plan(fingerprint(cases, 3), timed, "cpu")["train"]).epochs == (
        UNBOUNDED_EPOCHS
    )
    plain = validate_config({})
    planned = make_plan(fingerprint(cases, 3), plain, "cpu")["train"]
    assert resolve_train(plain.train, planned).epochs == planned["epochs"] == 6000 // 20
    assert make_plan(fingerprint(cases, 3), plain, "cuda")["train"]["epochs"] == 250_000 // 20


def test_config_values_override_the_plan() -> None:
    config = validate_config({"train": {"patch_size_vox": [32, 32, 16], "batch_size": 5}})
    plan = make_plan(fingerprint([_case((40, 40, 20), (1.0, 1.0, 1.0), 1.0)], 3), config, "cpu")
    resolved = resolve_train(config.train, plan["train"])
    assert resolved.network == "unet"  # auto, resolved for the CPU
    assert resolved.patch_size_vox == (32, 32, 16) and resolved.batch_size == 5
    assert resolved.channels == tuple(plan["train"]["channels"])
    assert len(resolved.strides) == len(resolved.channels) - 1 == len(resolved.kernel_sizes) - 1


def test_augmentation_preset_follows_the_device_and_keeps_user_keys() -> None:
    config = validate_config({"train": {"augment": {"noise_prob": 0.4}}})
    cases = [_case((40, 40, 20), (1.0, 1.0, 1.0), 1.0)]
    on_cpu = resolve_train(config.train, make_plan(fingerprint(cases, 3), config, "cpu")["train"]).augment
    assert on_cpu.preset == "light" and on_cpu.rotation_deg == 20.0 and on_cpu.low_resolution_prob == 0.0
    assert on_cpu.noise_prob == 0.4  # set by the user: kept
    on_gpu = resolve_train(config.train, make_plan(fingerprint(cases, 3), config, "cuda")["train"]).augment
    assert on_gpu.preset == "nnunet" and on_gpu == AugmentConfig(preset="nnunet", noise_prob=0.4)
    forced = validate_config({"train": {"augment": {"preset": "nnunet"}}})
    forced_plan = make_plan(fingerprint(cases, 3), forced, "cpu")["train"]
    assert resolve_train(forced.train, forced_plan).augment.rotation_deg == 30.0
