"""A team's own data, first try: the README's "Your own data" config on an MSD folder, through the real workflow.

    python benchmarks/own_data.py --raw-dir ../shared/data/hippocampus --minutes 15 [--workdir DIR] [--cores 8]
    python benchmarks/own_data.py --raw-dir ../shared/data/hippocampus --minutes 15 --folds 5   # same total budget

Writes ``my.yaml`` with only the keys a new user writes (dataset, classes, demo off, the input folder, the
resample spacing and normalisation, ``train.max_minutes``), runs ``snakemake --cores N --configfile my.yaml`` in
``--workdir``, and prints (and writes to ``own_data.json``):

* the wall time of the whole run, of training (Snakemake's ``benchmark:`` file of the train rule) and of
  everything else (ingest, plan, resample, infer, postprocess, evaluate, report): their difference, since nothing
  runs beside training (it takes every core);
* the mean test Dice per class from ``results/evaluate/summary.json`` (the manifest's test split);
* the plan's recipe and the MLflow params of the run, to show they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-dir", type=Path, required=True, help="MSD folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--minutes", type=float, default=15.0, help="train.max_minutes")
    parser.add_argument("--workdir", type=Path, default=Path("own_data_benchmark"))
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--classes", default="anterior,posterior")
    parser.add_argument("--dataset", default="hippocampus")
    parser.add_argument(
        "--folds", type=int, default=None, help="train.folds: an ensemble, each fold given minutes / folds"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    my = {
        "dataset": args.dataset,
        "classes": args.classes.split(","),
        "demo_data": {"enabled": False},
        "paths": {"raw_dir": str(args.raw_dir.resolve())},
        "resample": {"target_spacing_mm": [1, 1, 1], "normalization": "zscore"},
        "train": {"max_minutes": args.minutes},
    }
    if args.folds:
        my["train"] = {"max_minutes": round(args.minutes / args.folds, 3), "folds": args.folds}
    (args.workdir / "my.yaml").write_text(yaml.safe_dump(my, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(args.workdir)]
    command += ["--cores", str(args.cores), "--configfile", "my.yaml"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=args.workdir, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    (args.workdir / "snakemake.out").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed ({done.returncode}); see {args.workdir / 'snakemake.out'}")
    results = args.workdir / "results"
    train_s = sum(float(row.split("\t")[0]) for row in _benchmark_rows(results / "benchmarks"))
    summary = json.loads((results / "evaluate" / "summary.json").read_text())
    plan = json.loads((results / "plan" / "plan.json").read_text())
    history = (results / "train" / "history.tsv").read_text().splitlines()
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(command[1:]),
        "my_yaml": my,
        "wall_s": round(wall, 1),
        "train_s": round(train_s, 1),
        "outside_training_s": round(wall - train_s, 1),
        "epochs": len(history) - 1,
        "folds": args.folds,
        "n_test": summary["n_patients"],
        "mean_test_dice": summary["mean_foreground_dice"],
        "test_dice_per_class": {c: v["dice"]["mean"] for c, v in summary["per_class"].items()},
        "plan_train": {k: plan["train"][k] for k in ("network", "channels", "patch_size_vox", "batch_size")},
        "plan_resample": {k: plan["resample"][k] for k in ("target_spacing_mm", "normalization")},
        "plan_overrides": plan["overrides"],
    }
    (args.workdir / "own_data.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _benchmark_rows(folder: Path) -> list[str]:
    """Data rows of Snakemake's benchmark files of the training jobs (``train*.tsv``: seconds first)."""
    rows: list[str] = []
    for path in sorted(folder.glob("train*.tsv")):
        rows += path.read_text().splitlines()[1:]
    return rows


if __name__ == "__main__":
    main()
