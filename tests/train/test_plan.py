"""The data plan: fingerprint numbers you can check by hand, nnU-Net's spacing rule, and user overrides."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import AugmentConfig, Config, validate_config
from medseg.train.plan import fingerprint, make_plan, resolve_train, target_spacing, topology
from medseg.volume import Image, Label


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
    config = validate_config({"plan": {"max_patch_voxels": 20_000}, "resample": {"normalization": "zscore"}})
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
    dyn_on_cpu = validate_config({"train": {"network": "dynunet"}, "resample": {"normalization": "zscore"}})
    assert make_plan(fingerprint(cases, 3), dyn_on_cpu, "cpu")["train"]["channels"][0] == 8
    assert plan["resample"]["normalization"]["scheme"] == "zscore"


def test_ct_normalisation_uses_foreground_percentiles() -> None:
    plan = make_plan(fingerprint([_case((12, 12, 4), (1.0, 1.0, 1.0), 40.0)], 3), Config(), "cpu")
    norm = plan["resample"]["normalization"]
    assert norm["scheme"] == "ct" and norm["clip"] == pytest.approx([40.0, 40.0]) and norm["mean"] == 40.0


def test_config_values_override_the_plan() -> None:
    config = validate_config({"train": {"patch_size_vox": [32, 32, 16], "batch_size": 5}})
    plan = make_plan(fingerprint([_case((40, 40, 20), (1.0, 1.0, 1.0), 1.0)], 3), config, "cpu")
    resolved = resolve_train(config.train, plan)
    assert resolved.network == "unet"  # auto, resolved for the CPU
    assert resolved.patch_size_vox == (32, 32, 16) and resolved.batch_size == 5
    assert resolved.channels == tuple(plan["train"]["channels"])
    assert len(resolved.strides) == len(resolved.channels) - 1 == len(resolved.kernel_sizes) - 1


def test_augmentation_preset_follows_the_device_and_keeps_user_keys() -> None:
    config = validate_config({"train": {"augment": {"noise_prob": 0.4}}, "resample": {"normalization": "zscore"}})
    cases = [_case((40, 40, 20), (1.0, 1.0, 1.0), 1.0)]
    on_cpu = resolve_train(config.train, make_plan(fingerprint(cases, 3), config, "cpu")).augment
    assert on_cpu.preset == "light" and on_cpu.rotation_deg == 15.0 and on_cpu.low_resolution_prob == 0.0
    assert on_cpu.noise_prob == 0.4  # set by the user: kept
    on_gpu = resolve_train(config.train, make_plan(fingerprint(cases, 3), config, "cuda")).augment
    assert on_gpu.preset == "nnunet" and on_gpu == AugmentConfig(preset="nnunet", noise_prob=0.4)
    forced = validate_config({"train": {"augment": {"preset": "nnunet"}}, "resample": {"normalization": "zscore"}})
    assert resolve_train(forced.train, make_plan(fingerprint(cases, 3), forced, "cpu")).augment.rotation_deg == 30.0
