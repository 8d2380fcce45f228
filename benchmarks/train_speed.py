"""Seconds per training iteration (forward, backward, AdamW step; batch 2) of the networks medseg can build, on
this machine's CPU: the measurement behind the plan's CPU feature default and the demo's choice of UNet.

    python benchmarks/train_speed.py [--threads 2] [--iterations 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.networks.nets import DynUNet, UNet


def dynunet(features: list[int]) -> torch.nn.Module:
    return DynUNet(
        3,
        1,
        3,
        kernel_size=[3] * 4,
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=features,
        norm_name=("instance", {"affine": True}),
        deep_supervision=True,
        deep_supr_num=2,
    )


def seconds_per_iteration(net: torch.nn.Module, shape: tuple[int, ...], iterations: int) -> float:
    optimizer = torch.optim.AdamW(net.parameters())
    x = torch.randn(*shape)
    for i in range(iterations + 1):  # the first iteration warms up allocators and is not timed
        if i == 1:
            start = time.perf_counter()
        net(x).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = UNet(3, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="instance")
    cases = [
        ("UNet 16-128, demo patch 48x48x24", unet, (2, 1, 48, 48, 24)),
        ("DynUNet 16-128, demo patch 48x48x24", dynunet([16, 32, 64, 128]), (2, 1, 48, 48, 24)),
        ("UNet 16-128, 48x64x48 (MONAI hippocampus recipe)", unet, (2, 1, 48, 64, 48)),
        ("DynUNet 16-128, 40x56x40 (hippocampus plan)", dynunet([16, 32, 64, 128]), (2, 1, 40, 56, 40)),
        ("DynUNet 8-64, 40x56x40 (hippocampus plan, CPU)", dynunet([8, 16, 32, 64]), (2, 1, 40, 56, 40)),
    ]
    for name, net, shape in cases:
        print(f"{name}: {seconds_per_iteration(net, shape, args.iterations):.3f} s/iteration")


if __name__ == "__main__":
    main()
