"""Network construction from config. MONAI's networks, nothing of our own."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from medseg.config import TrainConfig


def build_network(config: TrainConfig, num_classes: int, spatial_dims: int = 3) -> torch.nn.Module:
    """A MONAI ``UNet`` with one input channel and ``num_classes`` output logits (background included)."""
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=num_classes,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm="instance",
    )
