"""Inference: labels land on the original grid, the memory-bounded way back equals the straightforward one,
constant-window reuse and mirroring are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import Config
from medseg.infer.run import predict, run
from medseg.io import read_volume, write_volume
from medseg.models import load_model, save_checkpoint
from medseg.networks import build_network
from medseg.sliding_window import (
    WindowPredictor,
    auto_batch_size,
    mirroring,
    to_original_grid,
    to_original_grid_bounded,
    window_count,
)
from medseg.volume import Image, Label


def _config(**infer: object) -> Config:
    return Config.model_validate(
        {
            "train": {
                "network": "unet",
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 0,
                "patch_size_vox": [16, 16, 8],
            },
            "resample": {"target_spacing_mm": [1.6, 1.6, 2.5], "normalization": "window"},
            "infer": {"device": "cpu", **infer},
        }
    )


def _model(config: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(config.train, config.num_classes).eval()


def _scan(shape: tuple[int, int, int] = (40, 36, 14)) -> Image:
    """A CT-like scan: air around a body with a bright blob; oblique-free RAS grid, odd origin, anisotropic."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.where(x**2 + y**2 < 0.5, 40.0, -1000.0) + rng.normal(0, 10, shape)
    hu[(x - 0.2) ** 2 + y**2 + z**2 < 0.1] = 200.0
    affine = np.array([[0.9, 0, 0, -17.3], [0, 0.85, 0, 4.1], [0, 0, 2.0, 33.0], [0, 0, 0, 1]])
    return Image(hu[None].astype(np.float32), affine)


ALIGNED = np.array([[0.8, 0, 0, 1.1], [0, 0.7, 0, -3.4], [0, 0, 1.2, 0.3], [0, 0, 0, 1]])
# Axes swapped and one flipped relative to the network grid: the general (MONAI-resampled) slab path.
OBLIQUE = np.array([[0, 0.7, 0, 1.1], [-0.8, 0, 0, 14.0], [0, 0, 1.2, 0.3], [0, 0, 0, 1]])


@pytest.mark.parametrize("fine_affine", [ALIGNED, OBLIQUE], ids=["separable", "general"])
def test_bounded_way_back_gives_the_same_labels_as_the_straightforward_one(fine_affine: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    logits = torch.as_tensor(rng.normal(size=(3, 12, 10, 7)) * 3)
    probs = torch.softmax(torch.nn.functional.avg_pool3d(logits[None], 3, 1, 1)[0], 0).numpy().astype(np.float32)
    coarse = Image(probs, np.array([[1.7, 0, 0, 2.0], [0, 1.5, 0, -3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]]))
    fine_shape = (25, 22, 19)
    straight = to_original_grid(coarse, fine_affine, fine_shape)
    # 0.05 MB forces slabs of a few slices, so slab seams and source boxes are exercised.
    bounded = to_original_grid_bounded(coarse, fine_affine, fine_shape, memory_mb=0.05)
    assert bounded.spatial_shape == fine_shape and np.allclose(bounded.affine, fine_affine)
    assert np.array_equal(bounded.array, straight.array)


@pytest.mark.parametrize("fine_affine", [ALIGNED, OBLIQUE], ids=["separable", "general"])
def test_way_back_is_exact_when_only_a_small_region_is_foreground(fine_affine: np.ndarray) -> None:
    # background wins everywhere but in a blob: the separable path resamples only the blob's box
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 12, 10, 7)) * 0.5
    logits[0] += 3.0
    logits[1:, 5:8, 3:6, 2:5] += rng.uniform(3.0, 6.0, size=(2, 3, 3, 3))
    probs = torch.softmax(torch.as_tensor(logits), 0).numpy().astype(np.float32)
    coarse = Image(probs, np.array([[1.7, 0, 0, 2.0], [0, 1.5, 0, -3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]]))
    fine_shape = (25, 22, 19)
    straight = to_original_grid(coarse, fine_affine, fine_shape)
    bounded = to_original_grid_bounded(coarse, fine_affine, fine_shape, memory_mb=0.05)
    assert 0 < np.count_nonzero(straight.array) < straight.array.size // 10
    assert np.array_equal(bounded.array, straight.array)
    empty = Image(np.stack([np.full((12, 10, 7), 0.9), np.full((12, 10, 7), 0.1)]).astype(np.float32), coarse.affine)
    assert not to_original_grid_bounded(empty, fine_affine, fine_shape).array.any()


def test_predict_returns_labels_on_the_original_grid_and_bounded_equals_straightforward() -> None:
    config = _config(resample_memory_mb=0.1)
    model, scan = _model(config), _scan()
    label = predict(model, config, scan, config, torch.device("cpu"))
    assert isinstance(label, Label) and label.array.dtype == np.uint8
    assert label.spatial_shape == scan.spatial_shape and np.allclose(label.affine, scan.affine)
    # The same prediction through the straightforward full-size resample.
    from medseg.resample.functional import preprocess
    from medseg.sliding_window import predict_probabilities

    probs = predict_probabilities(
        model, preprocess(scan, config.resample), (16, 16, 8), config.infer, torch.device("cpu")
    )
    assert np.array_equal(label.array, to_original_grid(probs, scan.affine, scan.spatial_shape).array)
    assert len(np.unique(label.array)) > 1  # not a degenerate all-one-class map


def test_constant_windows_are_reused_exactly() -> None:
    config = _config()
    model = _model(config)
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.normal(size=(5, 1, 16, 16, 8)), dtype=torch.float32)
    x[1] = -1.0
    x[3] = -1.0  # same constant: computed once, reused
    x[4] = 0.25
    predictor = WindowPredictor(model)
    with torch.no_grad():
        out, direct = predictor(x), model(x)
    assert predictor.reused == 1
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-5)


def test_mirroring_averages_the_flipped_predictions() -> None:
    config = _config()
    model = _model(config)
    x = torch.as_tensor(np.random.default_rng(3).normal(size=(2, 1, 16, 16, 8)), dtype=torch.float32)
    with torch.no_grad():
        out = WindowPredictor(model, (0, 2))(x)
        manual = (model(x) + model(x.flip(2)).flip(2) + model(x.flip(4)).flip(4) + model(x.flip(2, 4)).flip(2, 4)) / 4
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, model(x).detach(), atol=1e-4)  # it did change something


def test_mirror_flag_reaches_prediction() -> None:
    scan = _scan((24, 20, 8))
    plain = predict(_model(_config()), _config(), scan, _config(mirror=False), torch.device("cpu"))
    mirrored = predict(_model(_config()), _config(), scan, _config(mirror=True), torch.device("cpu"))
    assert mirrored.spatial_shape == plain.spatial_shape
    assert not np.array_equal(mirrored.array, plain.array)  # a random model is not flip-invariant


def test_auto_mirroring_follows_the_cost() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = _config().infer
    assert window_count((40, 56, 40), (40, 56, 40), 0.5) == 1
    assert window_count((100, 56, 30), (40, 56, 40), 0.5) == 4  # (100 - 40) / 20 + 1 along X
    assert mirroring(auto, (35, 50, 35), (40, 56, 40), cpu)  # a hippocampus: one window
    assert not mirroring(auto, (256, 256, 120), (48, 48, 24), cpu)  # a CT: hundreds
    assert mirroring(auto, (256, 256, 120), (48, 48, 24), cuda)
    assert not mirroring(_config(mirror=False).infer, (35, 50, 35), (40, 56, 40), cuda)
    scan = _scan((24, 20, 8))
    mirrored = predict(_model(_config()), _config(), scan, _config(mirror=True), torch.device("cpu"))
    assert np.array_equal(predict(_model(_config()), _config(), scan, _config(), cpu).array, mirrored.array)


def test_auto_batch_size_on_cpu() -> None:
    config = _config()
    assert auto_batch_size(_model(config), (16, 16, 8), torch.device("cpu")) == 8


def test_infer_run_writes_label_with_the_image_geometry(tmp_path: Path) -> None:
    config = _config()
    model = _model(config)
    save_checkpoint(tmp_path / "model.pt", config, [{"state_dict": model.state_dict(), "fold": None}])
    scan = _scan((30, 26, 10))
    write_volume(scan, tmp_path / "image.nii.gz")
    run(config, tmp_path / "model.pt", tmp_path / "image.nii.gz", tmp_path / "label.nii.gz")
    label = read_volume(tmp_path / "label.nii.gz", Label)
    assert label.spatial_shape == scan.spatial_shape
    assert np.allclose(label.affine, scan.affine, atol=1e-4)
    loaded, trained = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert trained.train.patch_size_vox == (16, 16, 8) and not loaded.training


def test_infer_config_rejects_bad_mirror_axes() -> None:
    with pytest.raises(ValueError, match="mirror_axes"):
        Config.model_validate({"infer": {"mirror_axes": [0, 0]}})
