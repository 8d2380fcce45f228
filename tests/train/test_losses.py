"""Each loss on a case small enough to compute by hand: one or a few voxels, two classes, known logits."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import TrainConfig
from medseg.train.losses import build_loss

LN2 = math.log(2.0)


def _one_voxel(target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (0, 0) on one voxel (softmax 0.5/0.5, sigmoid 0.5 each) and its label."""
    return torch.zeros(1, 2, 1, 1, 1), torch.full((1, 1, 1, 1, 1), target)


def test_dice_ce_on_one_voxel() -> None:
    # Dice per channel: bg 1 - 1e-5/(0.5 + 1e-5) ~ 1, fg 1 - (2*0.5)/(0.5 + 1) = 1/3 -> mean 2/3; CE = ln 2.
    loss = build_loss(TrainConfig(loss="dice_ce"), 2)(*_one_voxel(1))
    assert float(loss) == pytest.approx(2 / 3 + LN2, abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_dice_bce_weights_its_terms_by_alpha(alpha: float) -> None:
    # sigmoid(0) = 0.5 per channel; one-hot (0, 1): Dice mean 2/3 as above, BCE = ln 2 per channel.
    loss = build_loss(TrainConfig(loss="dice_bce", dice_bce_alpha=alpha), 2)(*_one_voxel(1))
    assert float(loss) == pytest.approx(alpha * 2 / 3 + (1 - alpha) * LN2, abs=1e-4)


def test_focal_gamma_and_alpha() -> None:
    # p_true = 0.5: focal = alpha_t * (1 - 0.5)^gamma * ln 2; foreground alpha_t = alpha, background 1 - alpha.
    cfg = TrainConfig(loss="focal", focal_gamma=2.0, focal_alpha=0.25)
    assert float(build_loss(cfg, 2)(*_one_voxel(1))) == pytest.approx(0.25 * 0.25 * LN2, abs=1e-6)
    assert float(build_loss(cfg, 2)(*_one_voxel(0))) == pytest.approx(0.75 * 0.25 * LN2, abs=1e-6)
    # gamma 0 and no alpha is plain cross-entropy
    plain = TrainConfig(loss="focal", focal_gamma=0.0)
    assert float(build_loss(plain, 2)(*_one_voxel(1))) == pytest.approx(LN2, abs=1e-6)


def test_focal_ignores_unlabelled_voxels() -> None:
    cfg = TrainConfig(loss="focal", focal_gamma=0.0, ignore_index=255)
    logits = torch.tensor([0.0, 0.0, 0.0, 5.0]).reshape(1, 2, 2, 1, 1)  # voxel 1: (0, 0); voxel 2: (0, 5)
    target = torch.tensor([1, 255]).reshape(1, 1, 2, 1, 1)
    assert float(build_loss(cfg, 2)(logits, target)) == pytest.approx(LN2, abs=1e-6)


def test_cross_entropy_with_class_weights_and_ignore_index() -> None:
    # voxel a: logits (0, ln 3) -> p = (1/4, 3/4), label 1; voxel b: (0, 0), label 0; voxel c: ignored.
    logits = torch.tensor([[0.0, 0.0, 9.0], [math.log(3.0), 0.0, -9.0]]).reshape(1, 2, 3, 1, 1)
    target = torch.tensor([1, 0, 255]).reshape(1, 1, 3, 1, 1)
    cfg = TrainConfig(loss="ce", class_weights=(1.0, 3.0), ignore_index=255)
    expected = (3.0 * -math.log(0.75) + 1.0 * LN2) / (3.0 + 1.0)  # weighted mean over the labelled voxels
    assert float(build_loss(cfg, 2)(logits, target)) == pytest.approx(expected, abs=1e-6)
    unweighted = TrainConfig(loss="ce", ignore_index=255)
    assert float(build_loss(unweighted, 2)(logits, target)) == pytest.approx((-math.log(0.75) + LN2) / 2, abs=1e-6)


def test_deep_supervision_heads_are_weighted_and_normalised() -> None:
    logits, target = _one_voxel(1)
    loss = build_loss(TrainConfig(loss="ce"), 2)
    same = torch.stack([logits, logits, logits], dim=1)  # (B, H, C, ...): identical heads -> the single loss
    assert float(loss(same, target)) == pytest.approx(float(loss(logits, target)), abs=1e-6)
    # head 0 perfect (loss ~0), heads 1 and 2 at ln 2: weights 1, 1/2, 1/4 normalised -> (0.75 / 1.75) ln 2
    perfect = torch.tensor([-20.0, 20.0]).reshape(1, 2, 1, 1, 1)
    mixed = torch.stack([perfect, logits, logits], dim=1)
    assert float(loss(mixed, target)) == pytest.approx(0.75 / 1.75 * LN2, abs=1e-5)


def test_ignore_index_needs_a_loss_that_supports_it() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        TrainConfig(loss="dice_ce", ignore_index=255)


def test_dice_ce_without_background_and_over_the_batch() -> None:
    # Two one-voxel patches, logits (0, 0): the first is foreground, the second background. Per patch, the
    # foreground Dice is 1/3 on the first and ~1 on the second (no foreground: 1 - 1e-5/(0.5 + 1e-5)); over the
    # batch it is 1 - 2 * 0.5 / (1 + 1) = 1/2. CE is ln 2 either way.
    logits, target = torch.zeros(2, 2, 1, 1, 1), torch.tensor([1, 0]).reshape(2, 1, 1, 1, 1)
    per_patch = build_loss(TrainConfig(dice_background=False), 2)(logits, target)
    assert float(per_patch) == pytest.approx((1 / 3 + 1) / 2 + LN2, abs=1e-4)
    batch = build_loss(TrainConfig(dice_background=False, batch_dice=True), 2)(logits, target)
    assert float(batch) == pytest.approx(1 / 2 + LN2, abs=1e-4)
    with_background = build_loss(TrainConfig(batch_dice=True), 2)(logits, target)
    assert float(with_background) == pytest.approx(1 / 2 + LN2, abs=1e-4)  # background: also 1/2 over the batch
