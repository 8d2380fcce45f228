"""The CRF refinement (postprocess.crf): what it keeps, what it changes, when ``auto`` turns it on, what infer runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import Config, CrfConfig, validate_config
from medseg.infer.run import effective_crf
from medseg.postprocess.crf import refine
from medseg.postprocess.decision import decide_crf, pool_crf_decisions


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    """A bright cube in a dark image; the network's foreground probability is a blurred, shifted guess."""
    image = torch.zeros(24, 24, 12)
    image[8:16, 8:16, 3:9] = 3.0
    fg = torch.zeros(24, 24, 12)
    fg[9:17, 8:16, 3:9] = 0.8  # one voxel too far along x
    fg[8, 8:16, 3:9] = 0.4  # unsure on the true edge
    probs = torch.stack([1 - fg, fg])
    return probs, image


def test_crf_moves_an_uncertain_boundary_onto_the_image_edge() -> None:
    probs, image = _case()
    refined = refine(probs, image, (1.0, 1.0, 1.0), CrfConfig(enabled=True, weight=4.0, iterations=5))
    assert refined.shape == probs.shape
    assert torch.allclose(refined.sum(0), torch.ones(24, 24, 12), atol=1e-5)
    truth = image > 1
    before = (probs.argmax(0).bool() == truth).float().mean()
    after = (refined.argmax(0).bool() == truth).float().mean()
    assert after > before  # the row at x = 8 (bright, unsure) joins; the row at x = 16 (dark) leaves
    assert bool(refined.argmax(0)[8, 10, 5]) and not bool(refined.argmax(0)[16, 10, 5])


def test_crf_leaves_probabilities_without_foreground_and_its_input_alone() -> None:
    probs = torch.stack([torch.ones(8, 8, 8), torch.zeros(8, 8, 8)])
    copy = probs.clone()
    out = refine(probs, torch.randn(8, 8, 8), (1.0, 1.0, 2.0), CrfConfig(enabled=True))
    assert torch.equal(out, copy) and torch.equal(probs, copy)
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize(("window", "iterations"), [(1, 5), (2, 3)])
def test_crf_in_slabs_gives_exactly_the_one_pass_result_in_place_or_not(window: int, iterations: int) -> None:
    """The memory bound must not change the answer: slabs of 1 plane (less than the context needed), a few, many,
    and one pass all agree bit for bit, written in place or into a copy. Bit for bit because planes of 20 x 16
    voxels keep torch's vectorisation aligned (elsewhere the results differ by float rounding, 1e-7); a tolerance
    would not do: one plane of context too few changes the result by only 5e-7 to 3e-6 with the default window."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, 20, 16, generator=g) * 2
    logits[1:, :3] = -20  # no foreground on the first planes: the box starts inside the volume
    probs = torch.softmax(logits, dim=0)
    image = torch.randn(30, 20, 16, generator=g)
    cfg = CrfConfig(enabled=True, window_vox=window, iterations=iterations, smoothness_share=0.3)
    one_pass = refine(probs, image, (1.0, 0.8, 2.0), cfg, memory_mb=1e6)
    assert not torch.equal(one_pass, probs)
    for memory_mb in (1e-9, 1.0, 2.0):
        copy = probs.clone()
        assert torch.equal(refine(copy, image, (1.0, 0.8, 2.0), cfg, memory_mb=memory_mb), one_pass)
        assert torch.equal(copy, probs)  # not in place: the input is left alone
        cpu = torch.device("cpu")  # where the slabs run (infer passes its device; no GPU in CI)
        assert refine(copy, image, (1.0, 0.8, 2.0), cfg, memory_mb=memory_mb, inplace=True, device=cpu) is copy
        assert torch.equal(copy, one_pass), memory_mb
    odd = torch.softmax(torch.randn(3, 23, 17, 9, generator=g) * 2, dim=0)  # planes of 153 voxels: float rounding
    odd_image = torch.randn(23, 17, 9, generator=g)
    whole = refine(odd, odd_image, (1.0, 1.0, 1.0), cfg, memory_mb=1e6)
    assert torch.allclose(refine(odd, odd_image, (1.0, 1.0, 1.0), cfg, memory_mb=1e-9), whole, rtol=0, atol=1e-6)


def test_auto_switches_the_crf_on_only_where_it_raises_the_validation_dice() -> None:
    probs, image = _case()
    cfg = CrfConfig(weight=4.0)  # strong enough to move this case's unsure row (the defaults are gentler)
    truth = (image > 1).numpy().astype(np.uint8)
    helps = decide_crf([(probs.numpy(), image.numpy(), truth)], (1.0, 1.0, 1.0), cfg, ["organ"])
    assert helps["enabled"] is True and helps["n_cases"] == 1
    assert helps["classes"]["organ"]["dice_with_crf"] > helps["classes"]["organ"]["dice_before"]
    # the network was right and the image edge misleads: the CRF would lower the Dice, so it stays off
    network_right = probs.argmax(0).numpy().astype(np.uint8)
    hurts = decide_crf([(probs.numpy(), image.numpy(), network_right)], (1.0, 1.0, 1.0), cfg, ["organ"])
    assert hurts["enabled"] is False and hurts["mean_dice_with_crf"] < hurts["mean_dice_before"] == 1.0
    assert decide_crf([], (1.0, 1.0, 1.0), cfg, ["organ"])["enabled"] is False  # no validation cases: off


def test_folds_pool_their_crf_decisions_over_all_their_validation_cases() -> None:
    def record(n: int, before: tuple[float, float], after: tuple[float, float]) -> dict:
        names = ("a", "b")
        classes = {c: {"dice_before": x, "dice_with_crf": y} for c, x, y in zip(names, before, after, strict=True)}
        return {"n_cases": n, "classes": classes}

    # fold 1 alone would say off (class b down), but weighted by cases class b rises over both folds
    folds = [record(30, (0.80, 0.80), (0.81, 0.81)), record(10, (0.80, 0.80), (0.81, 0.79))]
    assert pool_crf_decisions(folds, ["a", "b"]) is True
    folds = [record(10, (0.80, 0.80), (0.81, 0.81)), record(30, (0.80, 0.80), (0.81, 0.79))]
    assert pool_crf_decisions(folds, ["a", "b"]) is False
    assert pool_crf_decisions([{"n_cases": 0}], ["a", "b"]) is False


@pytest.mark.parametrize(
    ("after_b", "enabled"),
    [
        (0.79994, True),  # b falls by 6e-5 (a vetoing drop seen on 8 hippocampus validation cases): noise, on
        (0.7991, True),  # by 9e-4: still within the tolerance
        (0.7989, False),  # by 1.1e-3: a real fall vetoes it, although the mean rises
    ],
)
def test_a_class_falling_by_less_than_the_tolerance_does_not_veto_the_crf(after_b: float, enabled: bool) -> None:
    record = {"n_cases": 8, "classes": {"a": {"dice_before": 0.80, "dice_with_crf": 0.803}}}
    record["classes"]["b"] = {"dice_before": 0.80, "dice_with_crf": after_b}
    assert pool_crf_decisions([record], ["a", "b"]) is enabled
    flat = {"n_cases": 8, "classes": {c: {"dice_before": 0.8, "dice_with_crf": 0.8} for c in ("a", "b")}}
    assert pool_crf_decisions([flat], ["a", "b"]) is False  # the mean must still rise


@pytest.mark.parametrize(("b_voxels_lost", "enabled"), [(1, True), (5, False)])
def test_one_case_decision_forgives_a_class_fall_within_the_tolerance(
    monkeypatch: pytest.MonkeyPatch, b_voxels_lost: int, enabled: bool
) -> None:
    label = np.zeros((20, 20, 20), np.uint8)
    label[:10, :10, :] = 1  # class a: 2000 voxels
    label[10:, 10:, :] = 2  # class b: 2000 voxels
    network = label.copy()
    network[0, 0, :10] = 0  # the network misses 10 voxels of a
    crf_says = label.copy()  # the CRF finds them, and drops 1 voxel of b (Dice -2.5e-4) or 5 (-1.25e-3)
    crf_says[10, 10, :b_voxels_lost] = 0

    def one_hot(x: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.as_tensor(x, dtype=torch.long), 3).permute(3, 0, 1, 2).float()

    monkeypatch.setattr("medseg.postprocess.decision.crf.refine", lambda *a, **k: one_hot(crf_says))
    image = np.zeros(label.shape, np.float32)
    decision = decide_crf([(one_hot(network).numpy(), image, label)], (1.0, 1.0, 1.0), CrfConfig(), ["a", "b"])
    b = decision["classes"]["b"]
    assert b["dice_with_crf"] < b["dice_before"] == 1.0
    assert decision["mean_dice_with_crf"] > decision["mean_dice_before"]
    assert decision["enabled"] is enabled


def test_infer_runs_the_crf_the_live_config_names_or_with_auto_the_one_training_decided() -> None:
    def config(enabled: bool | str) -> Config:
        return validate_config({"dataset": "x", "classes": ["a"], "postprocess": {"crf": {"enabled": enabled}}}, "t")

    assert config("auto").postprocess.crf.enabled == "auto"  # the default
    assert CrfConfig().enabled == "auto"
    assert effective_crf(config("auto"), config(True)).enabled is True
    assert effective_crf(config("auto"), config(False)).enabled is False
    assert effective_crf(config("auto"), config("auto")).enabled is False  # a checkpoint without a decision
    assert effective_crf(config(False), config(True)).enabled is False  # the user's word wins
    assert effective_crf(config(True), config(False)).enabled is True
