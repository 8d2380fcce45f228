"""Every network, 2D and 3D, takes (B, 1, X, Y, Z) and returns (B, C, X, Y, Z) logits."""

from __future__ import annotations

import pytest
import torch

from medseg.config import TrainConfig
from medseg.networks import SliceNetwork, build_network


@pytest.mark.parametrize("network", ["dynunet", "unet", "segresnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_networks_map_patches_to_logits(network: str, dims: int) -> None:
    strides = ((2, 2), (2, 2)) if dims == 2 else ((2, 2, 2), (2, 2, 1))
    cfg = TrainConfig(network=network, spatial_dims=dims, channels=(4, 8, 16), strides=strides)
    model = build_network(cfg, num_classes=3).eval()
    x = torch.randn(2, 1, 16, 16, 4 if dims == 3 else 3)
    with torch.no_grad():
        assert model(x).shape == (2, 3, *x.shape[2:])
    assert isinstance(model, SliceNetwork) == (dims == 2)


@pytest.mark.parametrize("dims", [2, 3])
def test_dynunet_deep_supervision_heads_in_training(dims: int) -> None:
    strides = ((2, 2), (2, 2), (2, 2)) if dims == 2 else ((2, 2, 2), (2, 2, 2), (2, 2, 1))
    cfg = TrainConfig(network="dynunet", spatial_dims=dims, channels=(4, 8, 16, 32), strides=strides)
    model = build_network(cfg, num_classes=3).train()
    x = torch.randn(2, 1, 16, 16, 8 if dims == 3 else 2)
    assert model(x).shape == (2, 3, 3, *x.shape[2:])  # (B, heads, C, ...): full-res head + 2 deeper


def test_slice_network_sees_each_slice_alone() -> None:
    model = build_network(TrainConfig(network="unet", spatial_dims=2, channels=(4, 8), strides=(2,)), 2).eval()
    x = torch.randn(1, 1, 8, 8, 3)
    with torch.no_grad():
        whole = model(x)
        single = model(x[..., 1:2])
    assert torch.allclose(whole[..., 1:2], single, atol=1e-5)


def test_unresolved_config_is_refused() -> None:
    with pytest.raises(ValueError, match="resolved"):
        build_network(TrainConfig(), 3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("size", [(16, 16, 8), (17, 15, 9), (21, 19, 7)])
def test_deeplab_returns_the_input_grid_for_odd_sizes(dims: int, size: tuple[int, int, int]) -> None:
    strides = ((2, 2), (2, 2), (2, 2)) if dims == 2 else ((2, 2, 2), (2, 2, 1), (2, 2, 1))
    cfg = TrainConfig(network="deeplab", spatial_dims=dims, channels=(4, 8, 16, 32), strides=strides)
    model = build_network(cfg, num_classes=3).eval()
    x = torch.randn(1, 1, *size[:2], size[2] if dims == 3 else 2)
    with torch.no_grad():
        assert model(x).shape == (1, 3, *x.shape[2:])
    deeplab = model.net if dims == 2 else model
    # the atrous encoder: dilated residual units after the two down-sampling ones; ASPP with an image-pooling branch
    dilations = [m.dilation for m in deeplab.atrous.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert {d[0] for d in dilations} >= {2, 4}
    assert isinstance(deeplab.image_pool[0], (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d))


@pytest.mark.parametrize("network", ["swin_unetr", "unetr"])
@pytest.mark.parametrize("dims", [2, 3])
def test_transformer_networks_map_patches_to_logits(network: str, dims: int) -> None:
    patch = (64, 32, 32) if dims == 3 else (64, 32, 1)
    strides = ((2,) * dims,) * 2
    cfg = TrainConfig(network=network, spatial_dims=dims, channels=(12, 24, 48), strides=strides, patch_size_vox=patch)
    model = build_network(cfg, num_classes=2).eval()
    x = torch.randn(1, 1, *patch[:2], 32 if dims == 3 else 2)
    with torch.no_grad():
        assert model(x).shape == (1, 2, *x.shape[2:])


def test_the_plan_rounds_the_patch_up_for_the_transformers() -> None:
    from medseg.plan.functional import resolve_train

    planned = {"channels": [8, 16, 32], "strides": [[2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 3}
    planned |= {"patch_size_vox": [40, 56, 20], "batch_size": 2, "epochs": 10}
    assert resolve_train(TrainConfig(network="swin_unetr"), planned).patch_size_vox == (64, 64, 32)
    assert resolve_train(TrainConfig(network="unetr"), planned).patch_size_vox == (48, 64, 32)
    flat = resolve_train(TrainConfig(network="swin_unetr", spatial_dims=2), planned | {"patch_size_vox": [40, 56, 1]})
    assert flat.patch_size_vox == (64, 64, 1)
    small = resolve_train(TrainConfig(network="swin_unetr"), planned | {"patch_size_vox": [20, 24, 30]})
    assert small.patch_size_vox == (64, 32, 32)  # a bottleneck of 2 voxels, not 1 (instance norm)
