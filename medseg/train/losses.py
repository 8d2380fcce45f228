"""Losses from config, all MONAI's. Every loss takes logits ``(B, C, ...)`` and an integer label ``(B, 1, ...)``."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, FocalLoss

from medseg.config import TrainConfig


def build_loss(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """``dice_ce``: soft Dice + cross-entropy over softmax (multi-class); ``dice_bce``: soft Dice + binary
    cross-entropy over sigmoid, foreground channels only (binary or multi-label); ``focal``: focal loss."""
    if config.loss == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if config.loss == "dice_bce":
        return _DiceBCE(num_classes)
    return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)


class _DiceBCE(torch.nn.Module):
    """MONAI's DiceCELoss in sigmoid mode is Dice + BCE; it needs one-hot targets, which we build here."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loss = DiceCELoss(sigmoid=True, include_background=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(target[:, 0].long(), self.num_classes).movedim(-1, 1).float()
        return self.loss(logits, onehot)
