"""Network construction from config: MONAI's ``DynUNet`` (nnU-Net-style, deep supervision), ``UNet``, ``SegResNet``.

Every network takes ``(B, 1, X, Y, Z)`` and returns logits ``(B, C, X, Y, Z)`` (background included). A 2D
network (``spatial_dims: 2``) is wrapped so that it sees each XY slice alone but still takes and returns 3D
tensors: training, sliding-window validation, ``medseg infer`` and the checkpoint format stay the same for 2D.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet

from medseg.config import TrainConfig

DEEP_SUPERVISION_HEADS = 2  # extra decoder outputs scored in training (nnU-Net scores all; 2 is MONAI's default)


class SliceNetwork(torch.nn.Module):
    """Runs a 2D network on every Z slice of a 3D tensor (slices folded into the batch).

    Input ``(B, C, X, Y, Z)``; output ``(B, K, X, Y, Z)``, or ``(B, H, K, X, Y, Z)`` when the wrapped network
    returns deep-supervision heads ``(B*Z, H, K, X, Y)`` in training.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, sx, sy, sz = x.shape
        out = self.net(x.permute(0, 4, 1, 2, 3).reshape(b * sz, c, sx, sy))
        if out.dim() == 5:  # deep supervision heads: (B*Z, H, K, X, Y)
            return out.reshape(b, sz, *out.shape[1:]).permute(0, 2, 3, 4, 5, 1)
        return out.reshape(b, sz, *out.shape[1:]).permute(0, 2, 3, 4, 1)


def _per_axis(value: int | tuple[int, ...], dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)[:dims]


def build_network(config: TrainConfig, num_classes: int, spatial_dims: int | None = None) -> torch.nn.Module:
    """The configured network with one input channel and ``num_classes`` outputs.

    Args:
        config: a train config resolved by the plan (``channels``, ``strides``, ``kernel_sizes`` set).
        num_classes: output channels, background included.
        spatial_dims: overrides ``config.spatial_dims`` when given.

    Raises:
        ValueError: the config was not resolved (``channels`` or ``strides`` still null).
    """
    dims = spatial_dims or config.spatial_dims
    if config.channels is None or config.strides is None or config.network == "auto":
        raise ValueError("train.network, channels and strides must be resolved by the plan (medseg.plan) first")
    channels = list(config.channels)
    strides = [_per_axis(s, dims) for s in config.strides]
    net: torch.nn.Module
    if config.network == "dynunet":
        kernels = [_per_axis(k, dims) for k in (config.kernel_sizes or [3] * len(channels))]
        supervised = config.deep_supervision and len(channels) >= 3  # heads need two decoder levels at least
        net = DynUNet(
            spatial_dims=dims,
            in_channels=1,
            out_channels=num_classes,
            kernel_size=kernels,
            strides=[[1] * dims, *strides],
            upsample_kernel_size=strides,
            filters=channels,
            norm_name=("instance", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=supervised,
            deep_supr_num=min(DEEP_SUPERVISION_HEADS, len(channels) - 2) if supervised else 1,
        )
    elif config.network == "unet":
        net = UNet(
            spatial_dims=dims,
            in_channels=1,
            out_channels=num_classes,
            channels=channels,
            strides=strides,
            num_res_units=config.num_res_units,
            norm="instance",
        )
    else:
        net = SegResNet(
            spatial_dims=dims,
            init_filters=channels[0],
            in_channels=1,
            out_channels=num_classes,
            blocks_down=tuple([1, 2, 2, 4, 4, 4][: len(channels)]),
            blocks_up=tuple([1] * (len(channels) - 1)),
            norm="instance",
        )
    return SliceNetwork(net) if dims == 2 else net
