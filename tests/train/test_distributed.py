"""DistributedDataParallel training on a CPU: 2 gloo processes under torchrun, started by `medseg train` itself
(``train.processes: 2``), killed with SIGKILL mid-run and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from medseg import tracking
from medseg.io import read_json, read_tsv
from medseg.train.data import EpochIndices
from medseg.train.run import run

EPOCHS = 30


def _history(folder: Path) -> list[dict[str, str]]:
    return read_tsv(folder / "history.tsv")


def test_ranks_draw_disjoint_parts_of_each_global_step() -> None:
    ranks = [EpochIndices(4, rank, 2) for rank in (0, 1)]
    for r in ranks:
        r.set_epoch(3)
    drawn = [list(r) for r in ranks]
    assert drawn[0] == [(3, 0), (3, 2), (3, 4), (3, 6)] and drawn[1] == [(3, 1), (3, 3), (3, 5), (3, 7)]
    assert list(EpochIndices(2)) == [(1, 0), (1, 1)]  # one process: as before DDP


def _ranks_of(out: Path) -> list[psutil.Process]:
    """Live processes training into ``out`` (torchrun's ranks carry the output folder on their command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(out) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_ddp_with_two_gloo_processes_trains_one_run_and_resumes_after_kill_9(
    tiny_dataset: dict, make_config: Callable
) -> None:
    root = tiny_dataset["root"]
    common = {"epochs": EPOCHS, "iterations_per_epoch": 3, "val_every_epochs": 1, "batch_size": 4, "num_workers": 0}
    config = make_config(root, processes=2, **common)
    config_path = root / "config.yaml"
    config_path.write_text(config.to_yaml())
    out = root / "ddp"
    command = [
        sys.executable, "-m", "medseg.cli", "train", "--config", str(config_path),
        "--manifest", str(tiny_dataset["manifest"]), "--resample-dir", str(tiny_dataset["resample_dir"]),
        "--output-dir", str(out), "--threads", "2",
    ]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)  # `medseg train` became torchrun (exec): this kills torchrun
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training ended before it could be killed"
    deadline = time.monotonic() + 30
    while _ranks_of(out) and time.monotonic() < deadline:  # the ranks die with torchrun (PR_SET_PDEATHSIG)
        time.sleep(0.2)
    assert not _ranks_of(out), "a rank outlived torchrun"
    run_id = read_json(out / "run.json")["run_id"]
    killed_at = len(_history_rows_in_last(out))
    assert 1 <= killed_at < EPOCHS

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    log = second.stderr
    assert "resuming from" in log and f"rank 0 of 2 trained to epoch {EPOCHS}" in log
    assert f"rank 1 of 2 trained to epoch {EPOCHS}" in log  # both ranks ran to the end
    crcs = {line.rsplit(" ", 1)[1] for line in log.splitlines() if f"trained to epoch {EPOCHS}" in line}
    assert len(crcs) == 2, "the two ranks drew the same batches"
    # one MLflow run, continued; one checkpoint; rank 0's history
    assert read_json(out / "run.json")["run_id"] == run_id
    client = tracking.client(config.tracking)
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 1
    assert client.get_run(run_id).data.tags["ddp_processes"] == "2"
    assert sorted({m.step for m in client.get_metric_history(run_id, "train_loss")}) == list(range(1, EPOCHS + 1))
    assert [int(r["epoch"]) for r in _history(out)] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in out.glob("*.pt")) == ["last.pt", "model.pt"]
    ddp_dice = float(client.get_run(run_id).data.metrics["val_dice_mean"])

    # a single process with the same global batch (4) learns about as well
    single = make_config(root, processes=1, **common)
    summary = run(single, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "single")
    single_dice = float(_history(root / "single")[-1]["val_dice_mean"])
    assert summary["epochs"] == EPOCHS
    assert abs(ddp_dice - single_dice) < 0.25, (ddp_dice, single_dice)


def _history_rows_in_last(out: Path) -> list[dict]:
    from medseg.models import load_state

    return load_state(out / "last.pt")["progress"]["history"]


def test_auto_processes_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.processes("auto", "auto") == 4 and distributed.processes("auto", "cuda") == 4
    assert distributed.processes("auto", "cpu") == 1  # a CPU run on a GPU machine: no gloo ranks
    assert distributed.processes(2, "cpu") == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert distributed.processes("auto", "auto") == 1
