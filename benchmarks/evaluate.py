"""Seconds per case of the full metric set on a CT-sized pair: medseg against MONAI on the same label maps.

The pair: 512 x 512 x 300 voxels of 0.8 x 0.8 x 1.0 mm, three foreground classes of organ size (a liver-sized
lumpy ellipsoid, a kidney, a small lesion); the prediction is the reference moved by a voxel or two with a
ragged boundary, and six false-positive specks of class 1 scattered over the scan (they stretch the class's
bounding box to nearly the whole scan, the case a plain bounding-box crop handles worst).

- medseg: ``label_results`` (Dice, IoU, boundary F1, surface Dice, HD95, mean surface distance, volumes per
  class; pixel accuracy and mean IoU per patient).
- MONAI: ``HausdorffDistanceMetric(percentile=95)`` + ``SurfaceDiceMetric`` with the same spacing, on one-hot
  tensors (MONAI's metrics take one-hot input; the one-hot conversion is timed separately and reported).

The two methods run interleaved ``--repeats`` times; the median counts. HD95 and surface Dice of the two are
printed side by side as a check that they measure the same thing.

    .venv/bin/python benchmarks/evaluate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from scipy import ndimage

from medseg.metrics import label_results

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.0)
TOLERANCE_MM = 2.0


def make_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n, dtype=np.float32) - n / 2) * s for n, s in zip(SHAPE, SPACING, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    ref = np.zeros(SHAPE, np.uint8)
    organs = [  # centre (mm), radii (mm), class
        ((-60.0, 20.0, 0.0), (85.0, 65.0, 80.0), 1),
        ((75.0, -45.0, -20.0), (30.0, 25.0, 50.0), 2),
        ((-40.0, 35.0, 30.0), (9.0, 8.0, 7.0), 3),
    ]
    for (cx, cy, cz), (rx, ry, rz), c in organs:
        r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
        lump = 1.0 + 0.1 * np.sin(x / 9.0) * np.cos(y / 11.0 + z / 13.0)
        ref[r <= lump] = c
    pred = np.zeros_like(ref)
    for c, shift in ((1, (2, -1, 1)), (2, (-1, 2, 0)), (3, (1, 1, -1))):
        mask = np.roll(ref == c, shift, axis=(0, 1, 2))
        box = ndimage.find_objects(mask.view(np.uint8))[0]
        noise = ndimage.gaussian_filter(rng.normal(size=mask[box].shape).astype(np.float32), 2.0)
        shell = ndimage.binary_dilation(mask[box]) & ~mask[box]
        ragged = mask[box] | (shell & (noise > 0.1))  # a ragged outer boundary
        pred[box][ragged] = c
    for _ in range(6):  # false-positive specks of class 1 far from the organ
        i, j, k = (int(rng.integers(0, n - 4)) for n in SHAPE)
        pred[i : i + 3, j : j + 3, k : k + 3] = 1
    return pred, ref


def run_medseg(pred: np.ndarray, ref: np.ndarray) -> dict[str, list[float]]:
    per_class, _, _ = label_results(pred, ref, SPACING, 3, TOLERANCE_MM, TOLERANCE_MM)
    return {"hd95": [m["hd95_mm"] for m in per_class], "nsd": [m["surface_dice"] for m in per_class]}


def onehot(label: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(label).long(), 4).permute(3, 0, 1, 2)[None].bool()


def run_monai(y_pred: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    hd = HausdorffDistanceMetric(include_background=False, percentile=95)(y_pred, y, spacing=SPACING)
    nsd = SurfaceDiceMetric(class_thresholds=[TOLERANCE_MM] * 3, include_background=False)(y_pred, y, spacing=SPACING)
    return {"hd95": hd[0].tolist(), "nsd": nsd[0].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    t = time.perf_counter()
    pred, ref = make_pair()
    print(
        f"pair {SHAPE} built in {time.perf_counter() - t:.1f} s; voxels per class (ref):",
        [int(np.count_nonzero(ref == c)) for c in (1, 2, 3)],
    )
    times: dict[str, list[float]] = {"medseg": [], "monai": [], "monai_onehot": []}
    results = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        results["medseg"] = run_medseg(pred, ref)
        times["medseg"].append(time.perf_counter() - t)
        t = time.perf_counter()
        y_pred, y = onehot(pred), onehot(ref)
        times["monai_onehot"].append(time.perf_counter() - t)
        t = time.perf_counter()
        results["monai"] = run_monai(y_pred, y)
        times["monai"].append(time.perf_counter() - t)
        del y_pred, y
    med = {k: statistics.median(v) for k, v in times.items()}
    monai_total = med["monai"] + med["monai_onehot"]
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"medseg full metric set:             {med['medseg']:.2f} s per case (runs: {times['medseg']})")
    print(f"MONAI HD95 + surface Dice:          {med['monai']:.2f} s + one-hot {med['monai_onehot']:.2f} s")
    with_onehot, metrics_only = monai_total / med["medseg"], med["monai"] / med["medseg"]
    print(f"speed-up: {with_onehot:.1f}x (incl. one-hot), {metrics_only:.1f}x (metrics only)")
    for name in ("hd95", "nsd"):
        ours, theirs = (np.round(results[m][name], 4).tolist() for m in ("medseg", "monai"))
        print(f"{name}: medseg {ours}  MONAI {theirs}")


if __name__ == "__main__":
    main()
