"""Click-guided refinement on the hippocampus held-out split: mean Dice after 0, 1, 2, ... simulated clicks.

    python benchmarks/hippocampus.py --train-dir ../shared/data/hippocampus --minutes 15 --recipes medseg \\
        --set train.clicks.enabled=true --workdir clicks_benchmark
    python benchmarks/click_refinement.py --model clicks_benchmark/medseg/model.pt \\
        --train-dir ../shared/data/hippocampus [--initial-model OTHER/model.pt] [--clicks 5]

The simulated user follows the protocol interactive segmentation is measured with (RITM's NoC evaluation): the mask
to correct is the click model's own automatic prediction (0 clicks), or ``--initial-model``'s (e.g. medseg's
default automatic model); each next click goes to the interior-most voxel of the largest remaining error region on
the scan's original grid, labelled with the true class there; after every click the model refines that initial
mask with all the clicks so far, as ``medseg refine --mask INITIAL --clicks ALL`` does. Test cases: the
``HOLDOUT`` list of ``benchmarks/hippocampus.py`` (never trained on). Writes ``clicks.tsv`` (case x clicks x
class) and ``clicks_summary.json`` in the working directory and prints the Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hippocampus import CLASSES, HOLDOUT, msd_cases

from medseg.clicks import simulate_clicks
from medseg.device import select_device
from medseg.infer.run import predict
from medseg.io import read_volume, write_json, write_tsv
from medseg.metrics import overlap
from medseg.models import load_model
from medseg.volume import Image, Label

log = logging.getLogger("click_refinement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model.pt of a training with train.clicks")
    parser.add_argument("--train-dir", type=Path, required=True, help="the MSD hippocampus folder")
    parser.add_argument("--initial-model", type=Path, default=None, help="the masks to correct come from this model")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per case")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    device = select_device("auto")
    model, trained = load_model(args.model, device)
    if not trained.train.clicks.enabled:
        raise SystemExit(f"{args.model} was not trained with train.clicks.enabled")
    initial = load_model(args.initial_model, device) if args.initial_model else (model, trained)
    cases = [c for c in msd_cases(args.train_dir, "imagesTr", "labelsTr") if c["case"] in HOLDOUT]
    rows = []
    start = time.perf_counter()
    for case in cases:
        image, truth = read_volume(case["image"], Image), read_volume(case["label"], Label)
        reference = truth.array[0]
        mask = predict(*initial, image, trained, device)  # the live config = the trained one (no CRF)
        current, clicks = mask.array[0], []
        for n in range(args.clicks + 1):
            if n:
                clicks += simulate_clicks(reference, current, 1, trained.num_classes)
                current = predict(model, trained, image, trained, device, clicks, mask).array[0]
            for k, name in enumerate(CLASSES, start=1):
                dice, _ = overlap(current == k, reference == k)
                rows.append({"case": case["case"], "clicks": n, "class": name, "dice": dice})
        log.info("%s: Dice %s", case["case"], [round(r["dice"], 3) for r in rows[-2 * (args.clicks + 1) :: 2]])
    seconds = time.perf_counter() - start
    curve = {}
    for n in range(args.clicks + 1):
        per_class = {
            name: float(np.mean([r["dice"] for r in rows if r["clicks"] == n and r["class"] == name]))
            for name in CLASSES
        }
        curve[n] = {"mean": float(np.mean(list(per_class.values()))), **per_class}
    write_tsv("clicks.tsv", rows, ["case", "clicks", "class", "dice"])
    summary = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch threads {args.threads}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": str(args.model),
        "initial_model": str(args.initial_model or args.model),
        "n_cases": len(cases),
        "seconds": seconds,
        "curve": curve,
    }
    write_json("clicks_summary.json", summary)
    header = " | ".join(f"{n} clicks" for n in curve)
    log.info("| initial masks | %s |", header)
    log.info(
        "| %s | %s |",
        args.initial_model or "click model, automatic",
        " | ".join(f"{c['mean']:.4f}" for c in curve.values()),
    )


if __name__ == "__main__":
    main()
