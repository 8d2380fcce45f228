"""Losses from config. Every loss takes logits ``(B, C, ...)`` and an integer label ``(B, 1, ...)``; with deep
supervision the logits are ``(B, H, C, ...)`` (head 0 full resolution) and the heads are weighted 1, 1/2, 1/4...
(normalised to sum to 1), as nnU-Net does.

- ``dice_ce``: soft Dice + cross-entropy (1:1) over softmax, for multi-class (nnU-Net's loss); CE may be weighted
  per class (``class_weights``).
- ``dice_bce``: ``alpha * Dice + (1 - alpha) * BCE`` over a sigmoid per channel (one-hot targets, background
  channel included so that the argmax at inference is meaningful), for binary or multi-label tasks.
- ``focal``: focal loss over softmax with ``gamma``; ``alpha`` weighs foreground classes (background ``1 - alpha``).
- ``ce``: cross-entropy with optional ``class_weights`` and an ``ignore_index`` label for unlabelled voxels.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss

from medseg.config import TrainConfig


def build_loss(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The configured loss; wrapped for deep-supervision outputs ``(B, H, C, ...)`` too (see module docstring)."""
    weights = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else None
    loss: torch.nn.Module
    if config.loss == "dice_ce":
        loss = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            weight=weights,
            include_background=config.dice_background,
            batch=config.batch_dice,
        )
    elif config.loss == "dice_bce":
        loss = DiceBCELoss(num_classes, config.dice_bce_alpha)
    elif config.loss == "focal":
        loss = _Focal(num_classes, config.focal_gamma, config.focal_alpha, config.ignore_index)
    else:
        loss = CrossEntropyLoss(weights, config.ignore_index)
    return DeepSupervisionLoss(loss)


class DeepSupervisionLoss(torch.nn.Module):
    """Applies a loss to plain logits ``(B, C, ...)`` or to deep-supervision heads ``(B, H, C, ...)``."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != target.dim() + 1:
            return self.loss(logits, target)
        # MONAI's DeepSupervisionLoss does not normalise its weights (3 heads sum to 1.75), which changes the
        # loss scale with the number of heads; DynUNet already upsamples every head to the label's size.
        weights = [0.5**i for i in range(logits.shape[1])]
        total = sum(w * self.loss(logits[:, i], target) for i, w in enumerate(weights))
        return total / sum(weights)


def _onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).float()


class DiceBCELoss(torch.nn.modules.loss._Loss):
    """``alpha * soft Dice + (1 - alpha) * binary cross-entropy``, sigmoid per channel on one-hot targets.

    MONAI's ``DiceCELoss(sigmoid=True)`` is Dice + BCE but fixes the weights per term through lambdas that do
    not sum to one; this names the trade-off once.
    """

    def __init__(self, num_classes: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.num_classes, self.alpha = num_classes, alpha
        self.dice = DiceLoss(sigmoid=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = _onehot(target, self.num_classes)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot)
        return self.alpha * self.dice(logits, onehot) + (1 - self.alpha) * bce


class CrossEntropyLoss(torch.nn.modules.loss._Loss):
    """Cross-entropy on an integer label ``(B, 1, ...)``; voxels labelled ``ignore_index`` do not count."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ce = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=-100 if ignore_index is None else ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target[:, 0].long())


class _Focal(torch.nn.modules.loss._Loss):
    """MONAI's softmax ``FocalLoss`` on one-hot targets; ``ignore_index`` voxels are masked out before one-hot
    encoding (one_hot cannot encode an out-of-range label)."""

    def __init__(self, num_classes: int, gamma: float, alpha: float | None, ignore_index: int | None) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.focal = FocalLoss(use_softmax=True, gamma=gamma, alpha=alpha, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target = torch.where(keep, target, torch.zeros_like(target))
        per_voxel = self.focal(logits, _onehot(target, self.num_classes)).sum(dim=1, keepdim=True)
        return (per_voxel * keep).sum() / keep.sum().clamp(min=1)
