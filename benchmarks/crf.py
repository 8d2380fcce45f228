"""The CRF refinement (``postprocess.crf``) on a large foreground: one pass over the box against medseg's slabs.

``medseg.postprocess.crf.refine`` works on the bounding box of the voxels where some foreground class is possible.
On a hippocampus that box is a few thousand voxels; on a whole-body CT on a fine grid it is the whole scan, and the
mean-field working set (26 weight maps and a few probability maps for the default 26-neighbour window, about 200
bytes a voxel) grows with it. ``refine`` therefore goes slab by slab, each slab with the context its voxels depend
on, within ``memory_mb`` (default ``MEMORY_MB``); the result is the one-pass result (``tests/test_crf.py``): bit
for bit on the default maps, to float rounding where a plane is not a multiple of 16 voxels.

The map: ``--shape`` voxels, 3 classes, a smooth random foreground over most of the volume (so the box is the whole
grid), a z-scored image. Each setting runs in a fresh subprocess, so its peak resident memory (``VmHWM``) is its
own: the one-pass baseline (``memory_mb`` so large that the box is one slab) and the default slabs, both written in
place as ``infer`` does. Reported: seconds of ``refine``, the process's peak RSS above its peak with the map and
image loaded, and the largest difference between the two results (compared in the parent).

    .venv/bin/python benchmarks/crf.py [--shape 256 256 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import fresh_process, peak_rss_mb

SETTINGS = {"one pass": 1e12, "slabs (default)": None}


def make_map(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax ``(3, X, Y, Z)`` with foreground over most of the grid, and a z-scored image with edges."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, *(max(s // 16, 2) for s in shape), generator=g) * 4
    logits = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0]
    probs = torch.softmax(logits, dim=0)
    image = (probs.argmax(0).float() + 0.3 * torch.randn(shape, generator=g)).numpy()
    image = (image - image.mean()) / image.std()
    return probs.numpy(), image.astype(np.float32)


def child(setting: str, workdir: Path) -> None:
    from medseg.config import CrfConfig
    from medseg.postprocess.crf import MEMORY_MB, refine

    probs = torch.from_numpy(np.load(workdir / "probs.npy"))
    image = torch.from_numpy(np.load(workdir / "image.npy"))
    before = peak_rss_mb()
    memory_mb = SETTINGS[setting] or MEMORY_MB
    start = time.perf_counter()
    refine(probs, image, (1.0, 1.0, 1.0), CrfConfig(enabled=True), memory_mb=memory_mb, inplace=True)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    np.save(workdir / f"out-{setting.split()[0]}.npy", probs.numpy())
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 200])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        child(args.child, args.workdir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        probs, image = make_map(tuple(args.shape))
        np.save(workdir / "probs.npy", probs)
        np.save(workdir / "image.npy", image)
        del probs, image
        results: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}
        for round_ in range(args.repeats):
            for setting in SETTINGS:
                print(f"round {round_ + 1}: {setting} in a fresh process ...", flush=True)
                r = fresh_process(__file__, setting, workdir)
                seconds, peak, before = r["seconds"], r["peak_rss_mb"], r["baseline_rss_mb"]
                results[setting].append((seconds, peak, before))
                print(f"  {seconds:.1f} s, peak RSS {peak:.0f} MB (+{peak - before:.0f} MB)", flush=True)
        difference = float(np.abs(np.load(workdir / "out-one.npy") - np.load(workdir / "out-slabs.npy")).max())
    voxels = int(np.prod(args.shape))
    print(
        f"\nmap 3 x {' x '.join(map(str, args.shape))} ({voxels / 1e6:.1f} M voxels); {platform.machine()}, 2 threads"
    )
    print(f"medians of {args.repeats} run(s)")
    for setting, rows in results.items():
        s = statistics.median(r[0] for r in rows)
        extra = statistics.median(r[1] - r[2] for r in rows)
        print(f"{setting:16s} {s:6.1f} s   peak RSS +{extra:6.0f} MB over the loaded map")
    one, slabs = (statistics.median(r[0] for r in results[k]) for k in SETTINGS)
    print(f"slabs: {slabs / one:.2f}x the one pass's seconds; largest difference of the results: {difference:.1e}")


if __name__ == "__main__":
    main()
