"""CPU inference on a CT-sized scan: medseg against MONAI's ``sliding_window_inference`` with its defaults followed
by a naive resample back, same model, same machine, one script.

The scan: 512 x 512 x ``--slices`` voxels of 0.8 x 0.8 x 1.0 mm, a synthetic abdomen (body in air, lungs at the
top, a spine, two labelled organs: 1 liver-like, 2 kidney-like), with its true label. The model: MONAI ``UNet``
(16-32-64-128, two residual units, instance norm), trained here for ``--iterations`` steps on the same kind of
scan (seeded), so both methods predict something meaningful and their Dice can be compared.

Both methods get the same loaded image and model and share medseg's preprocessing (resample to 1.6 x 1.6 x
2.5 mm, CT window); they differ in what the issue compares:

- ``monai``: ``sliding_window_inference(x, roi, sw_batch_size=1, predictor=model)`` with MONAI's defaults (25%
  overlap, constant blending), then every logit channel resampled at once onto the original grid (MONAI's
  ``SpatialResample``, linear) and the argmax taken.
- ``medseg``: ``medseg.infer.run.predict`` with the default ``infer`` config (50% overlap, Gaussian blending,
  windows batched to the device, constant windows reused, slabbed resample back with a running argmax).
- ``medseg-crf`` (only when named in ``--methods``): the same with ``postprocess.crf.enabled: true`` (its default
  settings): what the CRF refinement adds to a CT-sized prediction when training's ``auto`` decision turns it on.

Each method runs in a fresh subprocess, so its peak resident memory (``VmHWM``, which sees torch's allocations,
unlike tracemalloc; see :func:`peak_rss_mb`) is its own. Reported: seconds from loaded image to label, the
process's peak RSS, and the peak above the RSS it had just before predicting (image and model loaded).

    .venv/bin/python benchmarks/infer.py [--slices 300] [--iterations 150] [--repeats 2] [--methods monai medseg]
    .venv/bin/python benchmarks/infer.py --methods medseg medseg-crf      # the CRF's cost
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SPACING = (0.8, 0.8, 1.0)
PATCH = (48, 48, 24)
TRAIN = {
    "network": "unet",
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "patch_size_vox": list(PATCH),
}


def make_scan(n_slices: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic abdominal CT: HU float32 ``(X, Y, Z)``, label uint8, affine (RAS, 0.8 x 0.8 x 1.0 mm)."""
    rng = np.random.default_rng(seed)
    shape = (512, 512, n_slices)
    x, y, z = np.meshgrid(
        *[((np.arange(n) - n / 2) * s).astype(np.float32) for n, s in zip(shape, SPACING, strict=True)],
        indexing="ij",
        sparse=True,
    )
    wobble = float(rng.uniform(-8, 8))
    body = (x / 165) ** 2 + ((y + 10) / 120) ** 2 <= 1
    hu = np.where(body, np.float32(40), np.float32(-1000))
    top = z > n_slices * SPACING[2] * 0.25
    for side in (-1, 1):  # lungs in the upper quarter
        lung = ((x - side * 75) / 60) ** 2 + ((y + 5) / 70) ** 2 <= 1
        hu = np.where(lung & top & body, np.float32(-850), hu)
    spine = ((x / 18) ** 2 + ((y - 70) / 20) ** 2 <= 1) & body
    hu = np.where(spine, np.float32(700), hu)
    label = np.zeros(shape, np.uint8)
    liver = ((x + 70 + wobble) / 80) ** 2 + ((y + 10) / 65) ** 2 + ((z - 10) / 75) ** 2 <= 1 + 0.1 * np.sin(x / 9)
    kidney = ((x - 70) / 28) ** 2 + ((y - 40 - wobble) / 25) ** 2 + ((z + 40) / 50) ** 2 <= 1
    label[liver & body & ~spine] = 1
    label[kidney & body & ~spine] = 2
    hu = np.where(label == 1, np.float32(130), hu)
    hu = np.where(label == 2, np.float32(200), hu)
    hu = hu + rng.normal(0, 15, shape).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-200.0, -180.0, -100.0]
    return hu.astype(np.float32), label, affine


def train_model(workdir: Path, iterations: int) -> None:
    """A quick, seeded training on a second synthetic scan; writes a medseg checkpoint."""
    from monai.losses import DiceCELoss

    from medseg.config import Config
    from medseg.models import save_checkpoint
    from medseg.networks import build_network
    from medseg.resample.functional import preprocess, resample_to_spacing
    from medseg.volume import Image, Label

    config = Config.model_validate(
        {"train": TRAIN, "resample": {"target_spacing_mm": [1.6, 1.6, 2.5], "normalization": "window"}}
    )
    hu, label, affine = make_scan(120, seed=1)
    image = preprocess(Image(hu[None], affine), config.resample).array[0]
    target = resample_to_spacing(Label(label[None], affine), config.resample.target_spacing_mm).array[0]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_network(config.train, config.num_classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    by_class = [np.argwhere(target == c) for c in (1, 2)]  # class-balanced: the kidney is 10x smaller
    high = np.array(image.shape) - np.array(PATCH)
    t = time.perf_counter()
    for step in range(iterations):
        xs, ys = [], []
        for _ in range(4):
            if rng.random() < 0.67:
                voxels = by_class[rng.integers(2)]
                centre = voxels[rng.integers(len(voxels))]
            else:
                centre = rng.integers(0, image.shape)
            lo = np.clip(centre - np.array(PATCH) // 2, 0, high)
            box = tuple(slice(a, a + p) for a, p in zip(lo, PATCH, strict=True))
            xs.append(image[box][None])
            ys.append(target[box][None])
        x, y = torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys).astype(np.int64))
        loss = loss_fn(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 20 == 0 or step == iterations - 1:
            print(f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    save_checkpoint(workdir / "model.pt", config, [{"state_dict": model.state_dict(), "fold": None}])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: on Linux a child started
    by ``subprocess`` (vfork + exec) inherits the parent's peak in it (a child of a parent that had peaked at 1.9 GB
    reported 1934 MB there and 27 MB here), so the benchmarks' children reported their parent's peak wherever it was
    higher than their own (up to session 15)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def fresh_process(script: str, name: str, workdir: Path) -> dict:
    """Run ``script --child name --workdir workdir`` in a fresh Python process (so that its peak RSS is its own);
    return the JSON object its last line of output prints."""
    out = subprocess.run(
        [sys.executable, script, "--child", name, "--workdir", str(workdir)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(method: str, workdir: Path) -> None:
    """One method in a fresh process: load, predict, report JSON on the last stdout line."""
    from monai.inferers import sliding_window_inference

    from medseg.config import Config
    from medseg.infer.run import predict
    from medseg.io import read_volume
    from medseg.models import load_model
    from medseg.resample.functional import preprocess, resample_to_grid
    from medseg.volume import Image

    torch.set_num_threads(2)
    device = torch.device("cpu")
    model, trained = load_model(workdir / "model.pt", device)
    image = read_volume(workdir / "image.nii", Image)

    def run(scan: Image) -> np.ndarray:
        with torch.no_grad():
            if method in ("medseg", "medseg-crf"):
                live = Config(postprocess={"crf": {"enabled": method == "medseg-crf"}})
                return predict(model, trained, scan, live, device).array[0]
            prepared = preprocess(scan, trained.resample)
            x = torch.as_tensor(prepared.array[None])
            logits = sliding_window_inference(x, PATCH, 1, model)  # MONAI's defaults
            back = resample_to_grid(Image(logits[0].numpy(), prepared.affine), scan.affine, scan.spatial_shape)
            return back.array.argmax(axis=0).astype(np.uint8)

    # Warm-up on a small corner: lazy imports and the convolution kernels' setup are not the method's memory.
    run(Image(np.ascontiguousarray(image.array[:, :128, :128, :64]), image.affine))
    baseline = _rss_mb()
    t = time.perf_counter()
    label = run(image)
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    np.save(workdir / f"label_{method}.npy", label)
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline}))


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    inter = np.count_nonzero((a == c) & (b == c))
    total = np.count_nonzero(a == c) + np.count_nonzero(b == c)
    return 2 * inter / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--methods", nargs="+", default=["monai", "medseg"])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; medians are reported")
    parser.add_argument("--child", choices=["monai", "medseg", "medseg-crf"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print(f"training the model ({args.iterations} steps) ...", flush=True)
        train_model(workdir, args.iterations)
        hu, truth, affine = make_scan(args.slices, seed=0)
        nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(workdir / "image.nii"))
        del hu
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for round_ in range(args.repeats):  # interleaved, so a busy spell of the shared machine hits both
            for method in args.methods:
                print(f"round {round_ + 1}: {method} in a fresh process ...", flush=True)
                r = fresh_process(__file__, method, workdir)
                print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
                runs[method].append(r)
        results = {}
        for method, rs in runs.items():
            results[method] = {
                key: statistics.median(r[key] for r in rs) for key in ("seconds", "peak_rss_mb", "baseline_rss_mb")
            }
            label = np.load(workdir / f"label_{method}.npy")
            results[method]["dice"] = [round(float(dice(label, truth, c)), 4) for c in (1, 2)]
        print(f"\nscan 512x512x{args.slices} at {SPACING} mm; machine {platform.machine()}, 2 torch threads")
        print(f"medians of {args.repeats} run(s) per method")
        for method, r in results.items():
            print(
                f"{method:10s} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_mb']:7.0f} MB "
                f"(+{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MB over {r['baseline_rss_mb']:.0f} MB loaded)   "
                f"Dice to truth {r['dice']}"
            )
        if {"monai", "medseg"} <= set(results):
            m, s = results["monai"], results["medseg"]
            a, b = np.load(workdir / "label_monai.npy"), np.load(workdir / "label_medseg.npy")
            print(
                f"speed-up {m['seconds'] / s['seconds']:.2f}x; peak RSS ratio medseg/monai "
                f"{s['peak_rss_mb'] / m['peak_rss_mb']:.2f} (above-loaded ratio "
                f"{(s['peak_rss_mb'] - s['baseline_rss_mb']) / (m['peak_rss_mb'] - m['baseline_rss_mb']):.2f}); "
                f"Dice medseg vs monai labels {[round(float(dice(a, b, c)), 4) for c in (1, 2)]}"
            )
        if {"medseg", "medseg-crf"} <= set(results):
            s, c = results["medseg"], results["medseg-crf"]
            print(f"the CRF: {c['seconds'] / s['seconds']:.2f}x medseg's seconds, peak RSS {c['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
