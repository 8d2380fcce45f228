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
