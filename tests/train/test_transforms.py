"""Augmentation keeps image and mask together: a volume whose intensities encode its own labels must still agree
with the transformed mask after every spatial transform, over many random draws.

The image is the label one-hot encoded (one channel per class), so that linear interpolation blends codes only
within a channel and the image decodes by argmax; a single-channel code 0/10/20 would create false 10s on the
edge between 0 and 20."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd

from medseg.config import AugmentConfig
from medseg.train.transforms import train_transforms

SPATIAL_ONLY = AugmentConfig(
    flip_prob=0.5,
    rotation_prob=1.0,
    rotation_deg=30.0,
    scale_prob=1.0,
    scale_range=(0.7, 1.4),
    elastic_prob=1.0,
    noise_prob=0.0,
    blur_prob=0.0,
    brightness_prob=0.0,
    contrast_prob=0.0,
    low_resolution_prob=0.0,
    gamma_prob=0.0,
)


def coded_volume(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Label 1: an off-centre box; label 2: another box; separated by background so that interpolation between
    codes 0 and 20 never passes through 10 inside the image."""
    label = np.zeros(shape, dtype=np.uint8)
    x, y, z = shape
    label[2 : x // 2 - 1, 3 : y - 4, 1 : max(z - 2, 2)] = 1
    label[x // 2 + 2 : x - 3, 2 : y // 2, 0 : max(z // 2, 1)] = 2
    onehot = np.stack([label == c for c in range(3)]).astype(np.float32)
    return {"image": onehot, "label": label[None]}


def agreement(patch: dict) -> tuple[float, float]:
    """How far the decoded image and the mask disagree: the share of confidently coded voxels (one channel above
    0.75, so not a voxel blended across an edge by interpolation) whose code is not their label, and the largest
    distance (voxels) between the centres of a class in the image and in the mask."""
    image = np.asarray(patch["image"], dtype=float)
    label = np.asarray(patch["label"][0]).astype(int)
    decoded = image.argmax(0)
    confident = image.max(0) > 0.75
    wrong = float((decoded != label)[confident].mean())
    shift = 0.0
    for c in (1, 2):
        a, b = np.argwhere(decoded == c), np.argwhere(label == c)
        if len(a) > 50 and len(b) > 50:  # a sliver of a class at the patch edge has a jumpy centre
            shift = max(shift, float(np.linalg.norm(a.mean(0) - b.mean(0))))
    return wrong, shift


def check(transform: Compose, volume: dict, draws: int) -> None:
    for seed in range(draws):
        transform.set_random_state(seed=seed)
        for patch in transform(dict(volume)):
            wrong, shift = agreement(patch)
            # interpolation may move an edge by up to a voxel (more after a 1.4x zoom); a mismatch moves it by many
            assert wrong < 0.02 and shift < 2.0, (seed, wrong, shift)


@pytest.mark.parametrize("label_interpolation", ["nearest", "linear"])
def test_every_spatial_transform_moves_image_and_mask_together_3d(label_interpolation: str) -> None:
    volume = coded_volume((28, 28, 20))
    augment = SPATIAL_ONLY.model_copy(update={"label_interpolation": label_interpolation})
    transform = train_transforms(augment, (20, 20, 16), spatial_dims=3, samples_per_volume=2)
    check(transform, volume, draws=25)


def test_every_spatial_transform_moves_image_and_mask_together_2d() -> None:
    volume = coded_volume((28, 28, 3))
    transform = train_transforms(SPATIAL_ONLY, (20, 20, 1), spatial_dims=2, samples_per_volume=2)
    for seed in range(25):
        transform.set_random_state(seed=seed)
        for patch in transform(dict(volume)):
            assert patch["image"].shape == (3, 20, 20, 1) and patch["label"].shape == (1, 20, 20, 1)
            wrong, shift = agreement(patch)
            # interpolation may move an edge by up to a voxel (more after a 1.4x zoom); a mismatch moves it by many
            assert wrong < 0.02 and shift < 2.0, (seed, wrong, shift)


def test_mirroring_alone_is_exact() -> None:
    flips_only = AugmentConfig(
        **{**SPATIAL_ONLY.model_dump(), "rotation_prob": 0.0, "scale_prob": 0.0, "elastic_prob": 0.0}
    )
    transform = train_transforms(flips_only, (20, 20, 16), samples_per_volume=2)
    for seed in range(5):
        transform.set_random_state(seed=seed)
        for patch in transform(dict(coded_volume((28, 28, 20)))):
            assert agreement(patch) == (0.0, 0.0)


def test_the_check_catches_a_transform_that_moves_the_image_only() -> None:
    volume = coded_volume((28, 28, 20))
    broken = Compose([*train_transforms(SPATIAL_ONLY, (20, 20, 16)).transforms, RandFlipd("image", prob=1.0)])
    with pytest.raises(AssertionError):
        check(broken, volume, draws=3)


def test_intensity_augmentation_changes_the_image_only() -> None:
    volume = coded_volume((28, 28, 20))
    noisy = AugmentConfig(
        flip_prob=0.0, rotation_prob=0.0, scale_prob=0.0, noise_prob=1.0, gamma_prob=1.0, low_resolution_prob=1.0
    )
    transform = train_transforms(noisy, (20, 20, 16), samples_per_volume=1)
    transform.set_random_state(seed=0)
    patch = transform(dict(volume))[0]
    label = np.asarray(patch["label"][0]).astype(int)
    assert not np.allclose(np.asarray(patch["image"]).argmax(0), np.asarray(patch["image"]).max(0))
    assert set(np.unique(label)) <= {0, 1, 2} and np.asarray(patch["image"]).std() > 0.05


@pytest.mark.parametrize("shape", [(20, 24, 16), (20, 24, 1)])
def test_rotate_scale_resamples_as_monai_affine_does(shape: tuple[int, int, int]) -> None:
    """medseg's one-resampling rotation and scaling gives MONAI's ``Affine`` output for the same angles and factors
    (the same matrix convention, centre and axis order), on a 3D patch and on a 2D one (Z of 1, in-plane)."""
    from monai.data import get_track_meta, set_track_meta
    from monai.transforms import Affine

    from medseg.train.transforms import RandRotateScaled

    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(2, *shape)), dtype=torch.float32)
    label = torch.as_tensor(rng.integers(0, 3, size=(1, *shape)), dtype=torch.int16)
    in_plane = shape[2] == 1
    transform = RandRotateScaled(
        ("image", "label"),
        1.0,
        (0.0, 0.0, 0.5) if in_plane else (0.5, 0.5, 0.5),
        1.0,
        (0.3, 0.3, 0.0) if in_plane else (0.3, 0.3, 0.3),
    )
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        for seed in range(4):
            transform.set_random_state(seed=seed)
            out = transform({"image": image, "label": label})
            # the same draws, replayed: rotation angles then scale factors, as randomize draws them
            replay = np.random.RandomState(seed)
            replay.rand()
            angles = [replay.uniform(lo, hi) for lo, hi in transform.rotate_range]
            replay.rand()
            factors = [1.0 + replay.uniform(lo, hi) for lo, hi in transform.scale_range]
            affine = Affine(rotate_params=angles, scale_params=factors, padding_mode="zeros", image_only=True)
            expected_image, expected_label = affine(image, mode="bilinear"), affine(label.float(), mode="nearest")
            assert out["label"].dtype == torch.int16 and out["image"].shape == image.shape
            np.testing.assert_allclose(out["image"].numpy(), np.asarray(expected_image), atol=1e-4)
            # nearest neighbour may round a voxel exactly between two others either way
            assert (out["label"].numpy() != np.asarray(expected_label)).mean() < 0.002
    finally:
        set_track_meta(tracking)


def test_rotate_scale_with_no_draw_returns_the_input() -> None:
    from medseg.train.transforms import RandRotateScaled

    volume = {"image": torch.ones(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 8, dtype=torch.int16)}
    transform = RandRotateScaled(("image", "label"), 0.0, (0.5, 0.5, 0.5), 0.0, (0.2, 0.2, 0.2))
    out = transform(volume)
    assert out["image"] is volume["image"] and out["label"] is volume["label"]


def _ellipsoid_labels(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Labels of an ellipsoid at ``points`` (3, ...) voxel coordinates: 1 in one half, 2 in the other, 0 outside."""
    x, y, z = (points - centre.reshape(3, *[1] * (points.ndim - 1))) + 0.5
    inside = (x / 12) ** 2 + (y / 20) ** 2 + (z / 9) ** 2 <= 1
    return np.where(inside, np.where(y > 0, 2, 1), 0).astype(np.int16)


def test_linear_label_resampling_is_closer_to_the_moved_shape_than_nearest() -> None:
    """``label_interpolation: linear`` (each class's one-hot interpolated, the largest share wins, nnU-Net's
    default) against nearest neighbour: on a rotated and scaled two-class ellipsoid, the labels disagree less often
    with the ellipsoid evaluated exactly where each output voxel samples it (20 draws: 0.60% of voxels against
    0.83%), and a draw of no motion gives the labels back unchanged."""
    from medseg.train.transforms import RandRotateScaled

    shape = (40, 56, 40)
    centre = np.asarray(shape) / 2
    points = np.indices(shape).astype(float)
    label = torch.as_tensor(_ellipsoid_labels(points, centre)[None])
    image = label.float()
    wrong = {}
    for mode in ("nearest", "onehot"):
        transform = RandRotateScaled(
            ("image", "label"), 1.0, ((-0.35, 0.35),) * 3, 1.0, ((-0.15, 0.15),) * 3, modes=("bilinear", mode)
        )
        errors = []
        for seed in range(20):
            transform.set_random_state(seed=seed)
            out = transform({"image": image, "label": label})
            assert out["label"].dtype == torch.int16 and set(out["label"].unique().tolist()) <= {0, 1, 2}
            # output offset o from the centre samples the input at matrix @ o
            offsets = points.reshape(3, -1) - centre[:, None] + 0.5
            sampled = transform.matrix @ offsets + centre[:, None] - 0.5
            truth = _ellipsoid_labels(sampled.reshape(3, *shape), centre)
            errors.append(float((out["label"][0].numpy() != truth).mean()))
        wrong[mode] = float(np.mean(errors))
    assert wrong["onehot"] < 0.85 * wrong["nearest"], wrong
    still = RandRotateScaled(
        ("image", "label"), 1.0, (0.0, 0.0, 0.0), 1.0, (0.0, 0.0, 0.0), modes=("bilinear", "onehot")
    )
    assert torch.equal(still({"image": image, "label": label})["label"], label)


def test_linear_label_resampling_fills_outside_the_input_with_background() -> None:
    from medseg.train.transforms import RandRotateScaled

    label = torch.full((1, 12, 12, 12), 2, dtype=torch.int16)
    shrink = RandRotateScaled(
        ("image", "label"), 0.0, (0.0, 0.0, 0.0), 1.0, ((1.0, 1.0),) * 3, modes=("bilinear", "onehot")
    )
    out = shrink({"image": label.float(), "label": label})["label"][0]  # samples twice as far out: a 6^3 core
    assert (out[3:9, 3:9, 3:9] == 2).all() and (out[:2] == 0).all() and (out[..., -2:] == 0).all()
    empty = torch.zeros((1, 8, 8, 8), dtype=torch.int16)
    assert torch.equal(shrink({"image": empty.float(), "label": empty})["label"], empty)
    ignored = label.clone()  # an ignore value (CE's ignore_index) stays itself, whatever its number
    ignored[0, :6], ignored[0, 6:] = 255, -1
    values = set(shrink({"image": ignored.float(), "label": ignored})["label"].unique().tolist())
    assert values == {0, 255, -1}


@pytest.mark.parametrize("label_interpolation", ["nearest", "linear"])
def test_a_patch_does_not_depend_on_the_thread_count(label_interpolation: str) -> None:
    """A worker process draws with one torch thread, the training process with several: the same seed must give the
    same patch. The contrast's mean is a reduction that rounds differently with the thread count on a patch this
    large (above torch's 32,768-element grain), which ``OneThread`` keeps to one thread."""
    augment = AugmentConfig(
        preset="light",
        rotation_prob=1.0,
        scale_prob=1.0,
        contrast_prob=1.0,
        noise_prob=1.0,
        gamma_prob=1.0,
        label_interpolation=label_interpolation,
    )
    rng = np.random.default_rng(3)
    volume = {
        "image": rng.normal(size=(1, 56, 56, 40)).astype(np.float32),
        "label": (rng.random((1, 56, 56, 40)) > 0.7).astype(np.int16),
    }
    threads = torch.get_num_threads()
    try:
        for seed in range(3):  # without OneThread, 17 of 20 seeds differed (torch 2.13, MONAI 1.6)
            patches = []
            for n in (1, 4):
                torch.set_num_threads(n)
                transform = train_transforms(augment, (48, 48, 36), samples_per_volume=1)
                transform.set_random_state(seed=seed)
                patches.append(transform(dict(volume))[0])
            assert torch.equal(torch.as_tensor(patches[0]["image"]), torch.as_tensor(patches[1]["image"])), seed
            assert torch.equal(torch.as_tensor(patches[0]["label"]), torch.as_tensor(patches[1]["label"])), seed
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_reseeding_draws_what_monai_seeding_draws(p: float) -> None:
    """``reseed`` (what the batch loader calls per batch) must give the patches MONAI's ``set_random_state`` gives,
    for every transform medseg uses, those that wrap an inner random transform included, batch after batch."""
    from medseg.train.transforms import reseed

    augment = AugmentConfig(
        preset="nnunet",
        **{k: p for k in ("rotation_prob", "scale_prob", "elastic_prob", "noise_prob", "blur_prob")},
        **{k: p for k in ("brightness_prob", "contrast_prob", "low_resolution_prob", "gamma_prob", "flip_prob")},
    )
    rng = np.random.default_rng(5)
    volume = {
        "image": rng.normal(size=(1, 30, 34, 28)).astype(np.float32),
        "label": (rng.random((1, 30, 34, 28)) > 0.6).astype(np.int16),
    }
    reused = train_transforms(augment, (24, 24, 20), samples_per_volume=2)
    reused.set_random_state(seed=0)
    for seed in (7, 2**31 - 1, 12345, 7):
        fresh = train_transforms(augment, (24, 24, 20), samples_per_volume=2)
        fresh.set_random_state(seed=seed)
        expected = fresh(dict(volume))
        reseed(reused, seed)
        drawn = reused(dict(volume))
        for a, b in zip(expected, drawn, strict=True):
            for key in ("image", "label"):
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (seed, key)
