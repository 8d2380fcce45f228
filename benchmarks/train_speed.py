"""Seconds per training iteration (forward, backward, AdamW step; batch 2) of the networks medseg can build: the
measurement behind the plan's choice of network and width per device (``train.network: auto``).

    python benchmarks/train_speed.py [--threads 2] [--iterations 3] [--device cpu|cuda]

On CUDA the iterations run under autocast (float16), as ``medseg train`` does with ``amp: true``.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.networks.nets import DynUNet, UNet


def dynunet(features: list[int]) -> torch.nn.Module:
    levels = len(features)
    return DynUNet(
        3,
        1,
        3,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=features,
        norm_name=("instance", {"affine": True}),
        deep_supervision=True,
        deep_supr_num=2,
    )


def unet(features: list[int]) -> torch.nn.Module:
    return UNet(3, 1, 3, features, [2] * (len(features) - 1), num_res_units=2, norm="instance")


def seconds_per_iteration(net: torch.nn.Module, shape: tuple[int, ...], iterations: int, device: str) -> float:
    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters())
    x = torch.randn(*shape, device=device)
    amp = device == "cuda"
    for i in range(iterations + 1):  # the first iteration warms up allocators (and cuDNN) and is not timed
        if i == 1:
            if amp:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            loss = net(x).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if amp:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    cases = [
        ("UNet 16-128, demo patch 48x48x24", unet([16, 32, 64, 128]), (2, 1, 48, 48, 24)),
        ("DynUNet 16-128, demo patch 48x48x24", dynunet([16, 32, 64, 128]), (2, 1, 48, 48, 24)),
        ("UNet 16-128, 48x64x48 (MONAI hippocampus recipe)", unet([16, 32, 64, 128]), (2, 1, 48, 64, 48)),
        ("UNet 16-128, 40x56x40 (hippocampus plan, CPU)", unet([16, 32, 64, 128]), (2, 1, 40, 56, 40)),
        ("DynUNet 8-64, 40x56x40", dynunet([8, 16, 32, 64]), (2, 1, 40, 56, 40)),
        ("DynUNet 16-128, 40x56x40", dynunet([16, 32, 64, 128]), (2, 1, 40, 56, 40)),
        ("DynUNet 32-256, 40x56x40 (hippocampus plan, GPU)", dynunet([32, 64, 128, 256]), (2, 1, 40, 56, 40)),
    ]
    for name, net, shape in cases:
        print(f"{name}: {seconds_per_iteration(net, shape, args.iterations, args.device):.3f} s/iteration", flush=True)


if __name__ == "__main__":
    main()
