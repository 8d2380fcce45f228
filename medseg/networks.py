"""Network construction from config: MONAI's ``DynUNet`` (nnU-Net-style, deep supervision), ``UNet``, ``SegResNet``,
``SwinUNETR`` and ``UNETR`` (transformer encoders), and :class:`DeepLab` (atrous residual encoder, ASPP head).

Every network takes ``(B, 1, X, Y, Z)`` (a click-guided one more channels, :mod:`medseg.clicks`) and returns
logits ``(B, C, X, Y, Z)`` (background included). A 2D network (``spatial_dims: 2``) is wrapped so that it sees
each XY slice alone but still takes and returns 3D tensors: training, sliding-window validation, ``medseg infer``
and the checkpoint format stay the same for 2D.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from monai.networks.blocks import Convolution, ResidualUnit, SimpleASPP
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR, UNet
from torch.nn.functional import interpolate

from medseg.clicks import input_channels
from medseg.config import TrainConfig
from medseg.plan.functional import PATCH_MULTIPLE

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


class DeepLab(torch.nn.Module):
    """DeepLabv3+ for 2D or 3D: an atrous residual encoder, an ASPP head and a light decoder.

    MONAI has the blocks (``ResidualUnit`` with ``dilation``, ``SimpleASPP``) but no DeepLab network, and its ASPP has
    no image-pooling branch, so both are assembled here. The encoder halves the grid twice (``strides[0]``,
    ``strides[1]``: output stride 4) and then widens its view with dilated residual units (at least two, rates 2,
    4, ...) instead of striding further. The head is ASPP: a 1x1 branch and three 3x3 branches at dilations 2, 4
    and 6 (``SimpleASPP``), plus an image-pooling branch (global average, 1x1 convolution, broadcast back),
    concatenated and projected by a 1x1 convolution. The decoder upsamples the head to the stride-2 features,
    concatenates them (projected to a few channels), refines with one residual unit and upsamples the logits to the
    input's grid by interpolation to its exact size, so odd sizes come back unchanged.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_classes: int,
        channels: list[int],
        strides: list[list[int]],
        dilations: tuple[int, ...] = (2, 4, 6),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) < 3:
            raise ValueError("train.network deeplab needs 3 or more levels (train.channels)")
        dims = spatial_dims
        norm = ("instance", {"affine": True})
        down = [strides[0] if strides else [2] * dims, strides[1] if len(strides) > 1 else [2] * dims]
        self.stem = ResidualUnit(dims, in_channels, channels[0], strides=1, norm=norm)
        self.low = ResidualUnit(dims, channels[0], channels[1], strides=down[0], norm=norm)
        self.down = ResidualUnit(dims, channels[1], channels[2], strides=down[1], norm=norm)
        atrous = []
        widths = channels[2:] + [channels[-1]] * max(0, 3 - len(channels[2:]))  # 2 dilated units at least
        for i, (cin, cout) in enumerate(pairwise(widths)):
            atrous.append(ResidualUnit(dims, cin, cout, strides=1, dilation=2 ** (i + 1), norm=norm))
        self.atrous = torch.nn.Sequential(*atrous)
        deep = channels[-1]
        branch = max(deep // 4, 8)
        self.aspp = SimpleASPP(
            dims, deep, branch, kernel_sizes=(1, 3, 3, 3), dilations=(1, *dilations), norm_type=norm, acti_type="RELU"
        )
        pool = torch.nn.AdaptiveAvgPool3d if dims == 3 else torch.nn.AdaptiveAvgPool2d
        self.image_pool = torch.nn.Sequential(pool(1), Convolution(dims, deep, branch, kernel_size=1, norm=None))
        self.project = Convolution(dims, 5 * branch, deep, kernel_size=1, norm=norm)
        low_out = max(channels[1] // 2, 8)
        self.low_project = Convolution(dims, channels[1], low_out, kernel_size=1, norm=norm)
        self.refine = ResidualUnit(dims, deep + low_out, channels[1], strides=1, norm=norm)
        self.head = Convolution(dims, channels[1], num_classes, kernel_size=1, conv_only=True)
        self.mode = "trilinear" if dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(self.stem(x))
        deep = self.atrous(self.down(low))
        pooled = self.image_pool(deep).expand(-1, -1, *deep.shape[2:])
        head = self.project(torch.cat([self.aspp(deep), pooled], dim=1))
        head = interpolate(head, size=low.shape[2:], mode=self.mode, align_corners=False)
        logits = self.head(self.refine(torch.cat([head, self.low_project(low)], dim=1)))
        return interpolate(logits, size=x.shape[2:], mode=self.mode, align_corners=False)


def _per_axis(value: int | tuple[int, ...], dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)[:dims]


def build_network(config: TrainConfig, num_classes: int, spatial_dims: int | None = None) -> torch.nn.Module:
    """The configured network: one input channel (the image; more with ``train.clicks``), ``num_classes`` outputs.

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
    inputs = input_channels(config, num_classes)  # 1, or more for a click-guided model (medseg.clicks)
    strides = [_per_axis(s, dims) for s in config.strides]
    net: torch.nn.Module
    if config.network == "dynunet":
        kernels = [_per_axis(k, dims) for k in (config.kernel_sizes or [3] * len(channels))]
        supervised = config.deep_supervision and len(channels) >= 3  # heads need two decoder levels at least
        net = DynUNet(
            spatial_dims=dims,
            in_channels=inputs,
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
            in_channels=inputs,
            out_channels=num_classes,
            channels=channels,
            strides=strides,
            num_res_units=config.num_res_units,
            norm="instance",
        )
    elif config.network == "deeplab":
        net = DeepLab(dims, num_classes, channels, strides, in_channels=inputs)
    elif config.network == "swin_unetr":
        net = SwinUNETR(
            in_channels=inputs,
            out_channels=num_classes,
            feature_size=12 * max(1, round(channels[0] / 12)),  # a multiple of 12 (its attention heads)
            spatial_dims=dims,
            norm_name="instance",
        )
    elif config.network == "unetr":
        patch = list(config.patch_size_vox or ())[:dims]
        if not patch or any(p % PATCH_MULTIPLE["unetr"] for p in patch):
            raise ValueError(f"train.network unetr needs a patch divisible by 16 per axis, got {patch}")
        net = UNETR(
            in_channels=inputs,
            out_channels=num_classes,
            img_size=patch,
            feature_size=channels[0],
            spatial_dims=dims,
            norm_name="instance",
        )
    else:
        net = SegResNet(
            spatial_dims=dims,
            init_filters=channels[0],
            in_channels=inputs,
            out_channels=num_classes,
            blocks_down=tuple([1, 2, 2, 4, 4, 4][: len(channels)]),
            blocks_up=tuple([1] * (len(channels) - 1)),
            norm="instance",
        )
    return SliceNetwork(net) if dims == 2 else net
