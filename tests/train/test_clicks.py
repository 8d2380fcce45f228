"""Click-guided refinement: the click simulation, the guidance channels, training with clicks, `medseg refine`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import cli
from medseg.clicks import Click, ClickSimulator, guidance, read_clicks, simulate_clicks
from medseg.config import ClicksConfig
from medseg.errors import ConfigError
from medseg.infer import run as infer
from medseg.io import read_volume, write_volume
from medseg.manifest import read_manifest
from medseg.models import load_checkpoint
from medseg.train.run import run as train_run
from medseg.volume import Image, Label


def test_clicks_go_to_the_interior_of_the_largest_error_first_with_the_true_class() -> None:
    truth = np.zeros((20, 20, 9), np.uint8)
    truth[2:12, 2:12, 2:7] = 1  # a 10 x 10 x 5 object the mask misses entirely
    truth[15:18, 15:18, 3:6] = 2  # a small one, also missed
    mask = np.zeros_like(truth)
    mask[0:2, 15:20, 0:3] = 1  # a false positive: a background click should remove it
    clicks = simulate_clicks(truth, mask, 5, 3)
    assert [c.label for c in clicks] == [1, 0, 2]  # largest first: 500 missed, 30 false positive, 27 missed
    x, y, z = clicks[0].voxel
    assert 4 <= x <= 9 and 4 <= y <= 9 and z == 4  # three voxels deep inside the missed object, not its rim
    assert truth[clicks[1].voxel] == 0 and mask[clicks[1].voxel] == 1 and truth[clicks[2].voxel] == 2
    assert simulate_clicks(truth, truth, 3, 3) == []  # a right mask needs no click


def test_a_2d_image_gets_its_click_in_the_middle_of_the_region_too() -> None:
    truth = np.zeros((20, 16, 1), np.uint8)  # X x Y x 1: a radiograph
    truth[4:15, 3:12, 0] = 1
    (click,) = simulate_clicks(truth, np.zeros_like(truth), 1, 2)
    assert 8 <= click.voxel[0] <= 10 and 6 <= click.voxel[1] <= 8 and click.voxel[2] == 0


def test_drawn_clicks_stay_inside_their_error_region() -> None:
    truth = np.zeros((16, 16, 8), np.uint8)
    truth[3:13, 3:13, 2:6] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        (click,) = simulate_clicks(truth, np.zeros_like(truth), 1, 2, rng)
        assert click.label == 1 and truth[click.voxel] == 1


def test_guidance_has_a_peak_per_click_in_its_class_channel_and_the_prior_one_hot() -> None:
    prior = np.zeros((12, 12, 6), np.uint8)
    prior[2:4, 2:4, 2:4] = 2
    out = guidance((12, 12, 6), [Click(1, (5, 6, 3)), Click(0, (9, 9, 1))], 3, ClicksConfig(sigma_vox=1.5), prior)
    assert out.shape == (5, 12, 12, 6) and out.dtype == np.float32
    assert np.unravel_index(out[1].argmax(), out[1].shape) == (5, 6, 3) and out[1].max() == pytest.approx(1.0)
    assert np.unravel_index(out[0].argmax(), out[0].shape) == (9, 9, 1)
    assert out[2].max() == 0  # no click on class 2
    assert out[3].sum() == 0 and np.array_equal(out[4], prior == 2)  # prior channels: class 1, class 2


def test_the_click_simulation_replays_from_seed_epoch_and_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv3d(6, 3, 3, padding=1)
    image = torch.randn(4, 1, 12, 12, 6)
    label = torch.zeros(4, 1, 12, 12, 6, dtype=torch.long)
    label[:, :, 3:9, 3:9, 1:5] = 1
    sim = ClickSimulator(ClicksConfig(auto_prob=0.5), 3, seed=1)
    first, again = sim(model, image, label, 3, 7), sim(model, image, label, 3, 7)
    assert first.shape == (4, 6, 12, 12, 6) and torch.equal(first, again)
    assert not torch.equal(first, sim(model, image, label, 3, 8))
    assert torch.equal(first[:, :1], image)
    never = ClickSimulator(ClicksConfig(auto_prob=1.0), 3, seed=1)(model, image, label, 3, 7)
    assert never[:, 1:].abs().sum() == 0  # automatic patches: no clicks, no prior


def test_a_clicks_file_is_checked_and_its_errors_name_the_file_and_click(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    path = tmp_path / "clicks.json"
    path.write_text(
        json.dumps({"clicks": [{"class": "organ_b", "voxel": [1, 2, 3]}, {"class": 0, "ras_mm": [4, 6, 9]}]})
    )
    assert read_clicks(path, ["organ_a", "organ_b"], affine, (10, 10, 5)) == [Click(2, (1, 2, 3)), Click(0, (2, 3, 3))]
    for bad, message in [
        ([{"class": "liver", "voxel": [1, 1, 1]}], "click 1: class 'liver'"),
        ([{"class": "organ_a", "voxel": [1, 1, 9]}], "click 1: voxel [1, 1, 9] is outside"),
        ([{"class": "organ_a"}], "needs voxel"),
        ([{"class": "organ_a", "voxel": [1, "x", 1]}], "three finite numbers"),
        ([{"class": "organ_a", "ras_mm": [1, 2]}], "three finite numbers"),
        ([3], "expected an object"),
        ({"points": []}, "expected"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=r"clicks\.json") as err:
            read_clicks(path, ["organ_a", "organ_b"], affine, (10, 10, 5))
        assert message in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"clicks\.json: not a readable clicks JSON"):
        read_clicks(path, ["organ_a"], affine, (10, 10, 5))


def test_a_click_lands_where_it_was_put_on_the_network_grid(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is finer than the network's grid; the blob's peak must be at the click's position in mm."""
    root = tiny_dataset["root"]
    config = make_config(root, clicks={"enabled": True}, epochs=1, iterations_per_epoch=1)
    out = root / "train_clicks"
    train_run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)
    model, trained = infer.load_model(out / "model.pt", "cpu")
    assert next(model.parameters()).shape[1] == 1 + 5  # image + 3 guidance + 2 prior channels
    image = Image(
        np.random.default_rng(0).normal(size=(1, 40, 36, 12)).astype(np.float32), np.diag([0.75, 0.75, 2.5, 1])
    )
    seen: list[Image] = []
    real = infer.predict_probabilities
    monkeypatch.setattr(infer, "predict_probabilities", lambda m, x, *a: seen.append(x) or real(m, x, *a))
    prior = Label(np.zeros((1, 40, 36, 12), np.uint8), image.affine)
    prior.array[0, 10:20, 10:20, 4:8] = 2
    label = infer.predict(model, trained, image, config, torch.device("cpu"), [Click(1, (31, 9, 5))], prior)
    assert label.spatial_shape == (40, 36, 12) and np.allclose(label.affine, image.affine)
    x = seen[0]
    assert x.array.shape[0] == 6 and x.spacing == pytest.approx((1.5, 1.5, 2.5))
    peak = np.unravel_index(x.array[2].argmax(), x.spatial_shape)  # class 1's channel
    world = lambda affine, v: (affine @ np.append(np.asarray(v, float), 1.0))[:3]  # noqa: E731
    assert np.abs(world(x.affine, peak) - world(image.affine, (31, 9, 5))).max() <= 1.5  # within a network voxel
    prior_mm = np.argwhere(x.array[5] > 0)  # class 2's prior channel, on the network grid
    assert prior_mm.size and 4 <= prior_mm[:, 0].min() <= 6 and 9 <= prior_mm[:, 0].max() <= 10


def test_medseg_refine_corrects_a_mask_and_refuses_what_it_cannot_use(
    tiny_dataset: dict, make_config: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, clicks={"enabled": True})
    (root / "config.yaml").write_text(config.to_yaml())
    out = root / "train_clicks"
    train_run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)
    assert load_checkpoint(out / "model.pt").config.train.clicks.enabled
    test = next(e for e in read_manifest(tiny_dataset["manifest"]) if e.split == "test")
    truth = read_volume(test.label, Label)
    clicks = root / "clicks.json"
    point = [int(v) for v in np.argwhere(truth.array[0] == 1).mean(axis=0).round()]
    clicks.write_text(json.dumps({"clicks": [{"class": "organ_a", "voxel": point}]}))
    empty = write_volume(Label(np.zeros_like(truth.array), truth.affine), root / "empty.nii.gz")
    base = ["refine", "--config", str(root / "config.yaml"), "--model", str(out / "model.pt")]
    base += ["--image", str(test.image), "--clicks", str(clicks)]
    result = root / "refined" / "p05.nii.gz"
    assert cli.main([*base, "--mask", str(empty), "--output", str(result)]) == 0
    refined = read_volume(result, Label)
    assert refined.spatial_shape == truth.spatial_shape and np.allclose(refined.affine, truth.affine)
    assert set(np.unique(refined.array)) <= {0, 1, 2}
    assert cli.main([*base, "--output", str(root / "refined" / "no_mask.nii.gz")]) == 0  # from the clicks alone
    nothing = root / "nothing.json"
    nothing.write_text('{"clicks": []}')
    unchanged = root / "refined" / "unchanged.nii.gz"
    no_clicks = [*base[:-2], "--clicks", str(nothing), "--mask", str(test.label), "--output", str(unchanged)]
    assert cli.main(no_clicks) == 0 and np.array_equal(read_volume(unchanged, Label).array, truth.array)

    wrong = write_volume(Label(np.zeros((1, 10, 10, 5), np.uint8), truth.affine), root / "wrong_grid.nii.gz")
    caplog.clear()
    assert cli.main([*base, "--mask", str(wrong), "--output", str(root / "refined" / "bad.nii.gz")]) == 1
    assert "wrong_grid.nii.gz: the mask is not on the grid" in caplog.text
    clicks.write_text(json.dumps([{"class": "organ_c", "voxel": point}]))
    caplog.clear()
    assert cli.main([*base, "--output", str(root / "refined" / "bad.nii.gz")]) == 1
    assert "clicks.json, click 1: class 'organ_c'" in caplog.text
    assert not (root / "refined" / "bad.nii.gz").exists()
    assert sorted(p.name for p in (root / "refined").iterdir()) == ["no_mask.nii.gz", "p05.nii.gz", "unchanged.nii.gz"]

    plain = make_config(root)
    train_run(plain, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train_plain")
    clicks.write_text(json.dumps([{"class": "organ_a", "voxel": point}]))
    caplog.clear()
    plain_args = [*base[:4], str(root / "train_plain" / "model.pt"), *base[5:]]
    assert cli.main([*plain_args, "--output", str(root / "refined" / "bad.nii.gz")]) == 1
    assert "was not trained with clicks" in caplog.text


def test_a_2d_click_model_refines_a_radiograph_sized_image(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, spatial_dims=2, patch_size_vox=[16, 16, 1], clicks={"enabled": True})
    out = root / "train_clicks_2d"
    train_run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)
    model, trained = infer.load_model(out / "model.pt", "cpu")
    image = Image(np.random.default_rng(1).normal(size=(1, 24, 20, 1)).astype(np.float32), np.diag([1.5, 1.5, 2.5, 1]))
    prior = Label(np.zeros((1, 24, 20, 1), np.uint8), image.affine)
    label = infer.predict(model, trained, image, config, torch.device("cpu"), [Click(1, (12, 10, 0))], prior)
    assert label.spatial_shape == (24, 20, 1) and set(np.unique(label.array)) <= {0, 1, 2}
