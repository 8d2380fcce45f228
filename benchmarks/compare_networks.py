"""Every network on the hippocampus benchmark at the same budget, tabulated from the MLflow runs.

    python benchmarks/compare_networks.py --train-dir ../shared/data/hippocampus --minutes 3 --workdir /tmp/nets
    python benchmarks/compare_networks.py --workdir /tmp/nets --table-only      # the table again, from MLflow

Each network trains in its own process (``benchmarks/hippocampus.py --recipes medseg --set train.network=<name>``,
so its peak memory is its own; scored without test-time mirroring) with medseg's plan for everything else, one after
the other, all logging into one MLflow database (``<workdir>/mlflow.db``); ``hippocampus.py`` logs the held-out
test metrics, the parameter count, the process's peak resident memory and the median seconds per epoch into each
training run. The table is then read back from MLflow alone (``MlflowClient.search_runs``) and printed as Markdown
for BENCHMARKS.md. One network's model (``--crf-network``) is also scored with ``postprocess.crf`` on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

NETWORKS = ("unet", "dynunet", "segresnet", "deeplab", "swin_unetr", "unetr")
EXPERIMENT = "hippocampus-networks"


def train_all(args: argparse.Namespace, uri: str) -> None:
    script = Path(__file__).with_name("hippocampus.py")
    for network in args.networks.split(","):
        folder = args.workdir / network
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, str(script), "--train-dir", str(args.train_dir.resolve()), "--minutes", str(args.minutes),
            "--recipes", "medseg", "--workdir", str(folder), "--threads", str(args.threads),
            "--set", f"train.network={network}", "--set", f"tracking.uri={uri}",
            "--set", f"tracking.experiment={EXPERIMENT}",
            "--set", "infer.mirror=false",  # scored without test-time mirroring, all alike (8x the transformers' time)
            *(["--crf"] if network == args.crf_network else []),
        ]  # fmt: skip
        with (folder / "log.txt").open("w") as log:
            # in its folder: hippocampus.py writes metrics.tsv and summary.json into the working directory
            done = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False)
        print(f"{network}: exit {done.returncode} (log {folder / 'log.txt'})", flush=True)


def table(uri: str) -> str:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"no experiment {EXPERIMENT} in {uri}: train first")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    lines = [
        "| network | test Dice | boundary F1 | HD95 (mm) | s/epoch | epochs | parameters | peak memory (MB) | patch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m, p = run.data.metrics, run.data.params
        if "test_dice_mean" not in m:
            continue  # a run that failed before scoring
        lines.append(
            f"| {p.get('train.network')} | {m['test_dice_mean']:.4f} | {m['test_boundary_f1_mean']:.4f} "
            f"| {m['test_hd95_mm_mean']:.2f} | {m['median_seconds_per_epoch']:.2f} | {int(m['epochs_trained'])} "
            f"| {int(m['n_parameters']):,} | {m['peak_rss_mb']:.0f} | {p.get('train.patch_size_vox')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-dir", type=Path, default=Path("../shared/data/hippocampus"))
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per network")
    parser.add_argument("--workdir", type=Path, default=Path("network_comparison"))
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--crf-network", default="unet", help="score this network's model with postprocess.crf too (its summary.json)"
    )
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.workdir / 'mlflow.db'}"
    if not args.table_only:
        train_all(args, uri)
    print(table(uri))
    crf = args.workdir / args.crf_network / "summary.json"
    if crf.exists():
        summary = json.loads(crf.read_text())
        for recipe in ("medseg", "medseg+crf"):
            if recipe in summary:
                per_class = summary[recipe]["per_class"]
                means = {m: [per_class[c][m]["mean"] for c in per_class] for m in ("dice", "boundary_f1", "hd95_mm")}
                print(f"{args.crf_network} {recipe}: " + ", ".join(f"{m} {means[m]}" for m in means))


if __name__ == "__main__":
    main()
