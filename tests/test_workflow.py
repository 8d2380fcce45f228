"""The real Snakemake workflow: lint, dry run from a fresh copy, and a tiny end-to-end run with MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.io import read_json, read_tsv, read_volume
from medseg.manifest import read_manifest
from medseg.tracking import client
from medseg.volume import Image, Label
from medseg.workflow import Workflow


def _snakemake(repo: Path, workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _fresh_copy(repo: Path, dest: Path) -> Path:
    """The files a fresh clone has: tracked ones (and new ones not ignored), nothing generated."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (repo / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
    return dest


def test_lint_reports_only_the_documented_conda_warning(repo: Path, tmp_path: Path) -> None:
    result = _snakemake(repo, tmp_path, "--lint")
    output = result.stdout + result.stderr
    assert "Error" not in output and "Lints for rule train" in output, output[-3000:]
    lints = {line.strip() for line in output.splitlines() if line.strip().startswith("* ")}
    # README ("Workflow lint") explains why rules carry no conda directive.
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, lints


def test_dry_run_from_a_fresh_clone(repo: Path, tmp_path: Path) -> None:
    clone = _fresh_copy(repo, tmp_path / "clone")
    result = _snakemake(clone, clone, "-n", "--cores", "8")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "demo_data" in result.stdout and "ingest" in result.stdout


@pytest.mark.slow
def test_tiny_workflow_end_to_end(repo: Path, tmp_path: Path) -> None:
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(repo / "configs" / "tiny.yaml"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    os.chdir(tmp_path)  # config paths are relative to the workflow's directory
    config = load_config(tmp_path / "results" / "config.yaml")
    wf = Workflow(config)
    entries = read_manifest(wf.manifest)
    test = [e for e in entries if e.split == "test"]
    assert test and [e for e in entries if e.split == "train"]

    for e in entries:
        assert e.image.exists() and e.label is not None and e.label.exists()
        assert (wf.stage_dir("ingest") / "sidecars" / f"{e.patient_id}.json").exists()
        if e.split in ("train", "val"):
            for suffix in ("_image.nii.gz", "_label.nii.gz", ".json"):
                assert (wf.stage_dir("resample") / f"{e.patient_id}{suffix}").exists()
    for e in test:
        original = read_volume(e.image, Image)
        for stage in ("infer", "postprocess"):
            prediction = read_volume(wf.stage_dir(stage) / f"{e.patient_id}.nii.gz", Label)
            assert prediction.spatial_shape == original.spatial_shape
            assert np.allclose(prediction.affine, original.affine, atol=1e-4)

    # keep-largest decided on the validation patients' predictions, and applied to every test patient
    val = [e.patient_id for e in entries if e.split == "val"]
    assert val and all((wf.stage_dir("infer") / f"{p}.nii.gz").exists() for p in val)
    decision = read_json(wf.postprocess_plan)
    assert decision["n_cases"] == len(val) and set(decision["keep_largest"]) <= set(config.classes)

    rows = read_tsv(wf.stage_dir("evaluate") / "metrics.tsv")
    assert sorted((r["patient_id"], r["class"]) for r in rows) == sorted(
        (e.patient_id, c) for e in test for c in config.classes
    )
    for r in rows:
        for metric in ("dice", "iou", "boundary_f1"):
            assert 0.0 <= float(r[metric]) <= 1.0, (metric, r)

    mlflow = client(config.tracking)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.epochs"] == str(config.train.epochs)
    assert run.data.params["resample.target_spacing_mm"] == str(list(config.resample.target_spacing_mm))
    assert len(mlflow.get_metric_history(run.info.run_id, "train_loss")) == config.train.epochs
    assert "val_dice_mean" in run.data.metrics
    for name in config.classes:
        assert 0.0 <= run.data.metrics[f"test_dice_{name}"] <= 1.0
    # The run's identity: the workflow's resolved config, and the config training resolved with its data plan.
    assert run.data.tags["config_digest"] == config.digest()
    trained_with = load_config(wf.stage_dir("train") / "config.yaml")
    assert run.data.tags["resolved_config_digest"] == trained_with.digest()
    artifacts = {
        f.path for folder in ("train", "evaluate", "manifest") for f in mlflow.list_artifacts(run.info.run_id, folder)
    }
    assert {"train/model.pt", "train/config.yaml", "evaluate/metrics.tsv", "manifest/tiny.tsv"} <= artifacts

    # A second invocation finds nothing to do: every output is up to date.
    again = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(repo / "configs" / "tiny.yaml"), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
