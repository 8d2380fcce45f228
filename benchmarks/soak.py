"""Soak: `medseg predict` on many generated DICOM series in one process; memory must not grow, and a kill -9 at a
random moment followed by a rerun must give the same NIfTI outputs as an uninterrupted run.

    python benchmarks/soak.py --series 200 --workdir /tmp/soak [--seed 0]

1. Writes ``--series`` CT series (one patient each, 48 x 48 x 12, a bright blob) and a tiny untrained checkpoint.
2. Run A, in this process (``medseg.predict.run.run``): the resident set size after every series; reports RSS
   after the 10th and after the last series, and their ratio (target: within 10%).
3. Run B, ``medseg predict`` in a subprocess, killed with SIGKILL at a random moment between 20% and 80% of run
   A's duration, then rerun to the end (it resumes); every NIfTI output of B is compared with A's, byte for byte
   and voxel for voxel.
Prints and writes ``soak.json`` into the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from medseg.config import Config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.io import read_volume
from medseg.models import save_checkpoint
from medseg.networks import build_network
from medseg.volume import Label

CONFIG = {
    "classes": ["blob"],
    "ingest": {"pseudonym_key_file": "secret/key"},
    "resample": {"target_spacing_mm": [1.5, 1.5, 2.5], "normalization": "window"},
    "train": {"network": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
              "patch_size_vox": [32, 32, 8], "batch_size": 2, "epochs": 1},
    "infer": {"device": "cpu"},
}  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def write_inputs(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    geometry = SeriesGeometry(np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), (1.5, 1.5), 2.5)
    for i in range(n):
        hu = rng.normal(0.0, 20.0, (48, 48, 12))
        cx, cy = rng.integers(12, 36, 2)
        hu[cx - 6 : cx + 6, cy - 6 : cy + 6, 3:9] += 300.0
        write_ct_series(hu, geometry, Identity(patient_name=f"Soak^P{i}", patient_id=f"S{i:05d}"), folder / f"p{i:04d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("soak"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    inputs = work / "inputs"
    if not inputs.exists():
        write_inputs(inputs, args.series, args.seed)
    config = Config.model_validate(CONFIG)
    (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    net = build_network(config.train, config.num_classes)
    model = save_checkpoint(work / "model.pt", config, [{"state_dict": net.state_dict(), "fold": None}])

    from medseg.predict.run import run

    rss: list[float] = []

    def track(items, _description, _total):  # type: ignore[no-untyped-def]
        for item in items:
            yield item
            rss.append(rss_mb())  # after the previous series was predicted and written

    start = time.perf_counter()
    result = run(config, str(model), inputs, work / "out_a", track=track)
    seconds_a = time.perf_counter() - start
    rss.append(rss_mb())
    done = [r for r in result.records if r["status"] in ("predicted", "done")]

    kill_at = random.Random(args.seed).uniform(0.2, 0.8) * seconds_a
    command = [sys.executable, "-m", "medseg.cli", "predict", "--config", "config.yaml", "--model", str(model)]
    command += ["--input", str(inputs), "--output", str(work / "out_b"), "--skips-ok"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_at)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished_before_kill = len(list((work / "out_b" / "records").glob("*.json")))
    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    identical_bytes = identical_voxels = 0
    names = sorted(p.name for p in (work / "out_a" / "nifti").glob("*.nii.gz"))
    for name in names:
        a, b = work / "out_a" / "nifti" / name, work / "out_b" / "nifti" / name
        identical_bytes += b.exists() and a.read_bytes() == b.read_bytes()
        identical_voxels += b.exists() and np.array_equal(read_volume(a, Label).array, read_volume(b, Label).array)
    leftovers = [str(p.relative_to(work)) for p in (work / "out_b").rglob(".*partial*")]
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "series": args.series,
        "predicted_in_run_a": len(done),
        "seconds_run_a": round(seconds_a, 1),
        "rss_mb_after_10th": round(rss[10], 1),
        "rss_mb_after_last": round(rss[-1], 1),
        "rss_ratio_last_to_10th": round(rss[-1] / rss[10], 3),
        "rss_mb_max": round(max(rss), 1),
        "kill_after_s": round(kill_at, 1),
        "records_before_kill": finished_before_kill,
        "rerun_exit": rerun.returncode,
        "nifti_outputs": len(names),
        "identical_bytes": int(identical_bytes),
        "identical_voxels": int(identical_voxels),
        "partial_files_left": leftovers,
    }
    (work / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
