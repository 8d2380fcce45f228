"""The real Snakemake workflow: lint, dry run from a fresh copy, and a tiny end-to-end run with MLflow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from predict.predict_helpers import assert_dciodvfy_ok

from medseg import cli
from medseg.config import load_config
from medseg.demo_data.dicom import Identity, write_dx_image
from medseg.demo_data.run import run
from medseg.demo_data.xray import radiograph
from medseg.io import read_json, read_tsv, read_volume
from medseg.manifest import read_manifest
from medseg.postprocess.decision import pool_crf_decisions
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


def _client(config: Any, workdir: Path) -> Any:
    """An MLflow client on the run's database by its absolute path (MLflow caches stores by URI, so the same
    relative URI in two test folders would reach the first one's database)."""
    absolute = f"sqlite:///{(workdir / 'results' / 'mlflow.db').resolve()}"
    return client(config.tracking.model_copy(update={"uri": absolute}))


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


def test_a_file_changed_inside_the_input_folder_runs_ingest_again(repo: Path, tmp_path: Path) -> None:
    """Snakemake dates a folder input by the folder's own time; a file fixed in a patient's folder below it (the one
    failures.tsv named) must still run ingest again, and only real files count."""
    hospital = tmp_path / "export"
    tiny = repo / "configs" / "tiny.yaml"
    run(load_config(tiny), hospital)  # the tiny demo's cohort, as a team's own folder
    own = tmp_path / "own.yaml"
    own.write_text(f"dataset: own\ndemo_data:\n  enabled: false\npaths:\n  raw_dir: {hospital}\n")
    nested = sorted(hospital.glob("*/*.nii.gz"))[0]  # a patient's file, below the folder Snakemake dates
    args = ("data_manifests/own.tsv", "--cores", "2", "--configfile", str(tiny), str(own))
    done = _snakemake(repo, tmp_path, *args)
    assert done.returncode == 0 and (tmp_path / "data_manifests" / "own.tsv").is_file(), done.stderr[-3000:]

    def planned() -> str:
        result = _snakemake(repo, tmp_path, *args, "-n")
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    first = planned()
    assert "Nothing to be done" in first, first[-3000:]
    (nested.parent / ".DS_Store").write_bytes(b"Finder")  # not a scan
    assert "Nothing to be done" in planned()
    stat = nested.stat()
    os.utime(nested, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    again = planned()
    assert re.search(r"^ingest +1$", again, re.M) and "Params have changed" in again, again[-3000:]


@pytest.mark.slow
def test_tiny_workflow_end_to_end(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(repo / "configs" / "tiny.yaml"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    monkeypatch.chdir(tmp_path)  # config paths are relative to the workflow's directory
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
    decision = read_json(wf.postprocess_decision)
    assert decision["n_cases"] == len(val) and set(decision["keep_largest"]) <= set(config.classes)

    rows = read_tsv(wf.stage_dir("evaluate") / "metrics.tsv")
    assert sorted((r["patient_id"], r["class"]) for r in rows) == sorted(
        (e.patient_id, c) for e in test for c in config.classes
    )
    for r in rows:
        for metric in ("dice", "iou", "boundary_f1"):
            assert 0.0 <= float(r[metric]) <= 1.0, (metric, r)

    mlflow = _client(config, tmp_path)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    # MLflow records what ran: the plan's effective sections, and the keys the config set over the plan
    plan = read_json(wf.plan)
    assert run.data.params["train.epochs"] == str(config.train.epochs) == str(plan["train"]["epochs"])
    for key in ("patch_size_vox", "channels", "batch_size", "network"):
        value = plan["train"][key]
        assert run.data.params[f"train.{key}"] == str(value), key
    for key in ("target_spacing_mm", "normalization"):
        assert run.data.params[f"resample.{key}"] == str(plan["resample"][key]), key
    assert run.data.params["plan_overrides.train.epochs"] == "2"  # tiny.yaml sets it
    resampled = read_json(wf.stage_dir("resample") / f"{val[0]}.json")
    assert resampled["resample"] == plan["resample"]  # resample ran the plan's section
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
    # results/ deleted, data_manifests/tiny.tsv kept: the manifest names ingested images that are gone, so ingest
    # runs again (it did not: plan then failed on the first missing image)
    shutil.rmtree(tmp_path / "results")
    again = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(repo / "configs" / "tiny.yaml"), "-n")
    planned = again.stdout + again.stderr
    assert again.returncode == 0 and re.search(r"^ingest +1$", planned, re.M), planned[-3000:]


@pytest.mark.slow
def test_two_fold_workflow_ensembles_both_folds(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folds = tmp_path / "folds.yaml"
    folds.write_text("dataset: tinyfolds\ntrain: {folds: 2}\ntracking: {experiment: medseg-tiny-folds}\n")
    tiny = str(repo / "configs" / "tiny.yaml")
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", tiny, str(folds))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "results" / "config.yaml")
    wf = Workflow(config)
    from medseg.models import load_checkpoint

    ensemble = load_checkpoint(wf.model)
    assert [m["fold"] for m in ensemble.members] == [0, 1]
    for k in (0, 1):  # each member is its fold's best model
        fold_model = load_checkpoint(wf.fold_dir(k) / "model.pt")
        state = fold_model.members[0]["state_dict"]
        assert all(np.array_equal(state[n], ensemble.members[k]["state_dict"][n]) for n in state)
    # the test patients were predicted by both folds averaged; every train/val patient out of fold by its own fold
    test_records = [read_json(p) for p in wf.infer_records("test")]
    assert test_records and all(r["ensemble_members"] == 2 for r in test_records)
    plan = read_json(wf.plan)
    for k in (0, 1):
        held_out = sorted(p for p, f in plan["folds"].items() if f == k)
        records = [read_json(p) for p in wf.infer_records(f"fold{k}")]
        assert sorted(p for r in records for p in r["patients"]) == held_out
        assert all(r["ensemble_members"] == 1 for r in records)
    decision = read_json(wf.postprocess_decision)
    assert decision["n_cases"] == len(plan["folds"]) and decision["split"] == "train+val"
    rows = read_tsv(wf.stage_dir("evaluate") / "metrics.tsv")
    assert {r["patient_id"] for r in rows} == set(wf.patients("test"))
    mlflow = _client(config, tmp_path)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("fold", "ensemble") for r in runs) == ["0", "1", "ensemble"]
    ensemble_run = next(r for r in runs if "fold" not in r.data.tags)
    assert "test_dice_organ_a" in ensemble_run.data.metrics  # evaluate logs into the ensemble's run
    # postprocess.crf auto: each fold decided on its validation patients; the ensemble on all of them pooled
    fold_decisions = [read_json(wf.fold_dir(k) / "crf_decision.json") for k in (0, 1)]
    crf_on = pool_crf_decisions(fold_decisions, config.classes)
    assert ensemble.config.postprocess.crf.enabled is crf_on
    assert ensemble_run.data.tags["postprocess_crf"] == ("on" if crf_on else "off")
    assert ensemble_run.data.params["postprocess.crf.enabled"] == str(crf_on)


def test_tiny_2d_radiograph_workflow_end_to_end(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2D demo (demo_data.kind: xray): PNG radiographs in an nnU-Net 2D dataset, binary lung fields, Dice+BCE,
    through the whole workflow; metrics on 2D boundaries."""
    tiny = tmp_path / "xray.yaml"
    tiny.write_text(
        "demo_data: {kind: xray, n_patients: 8, shape_vox: [64, 64, 1]}\n"
        "train: {epochs: 2, iterations_per_epoch: 2, val_every_epochs: 1, channels: [8, 16, 32], strides: [2, 2],"
        " patch_size_vox: [64, 64, 1], batch_size: 4}\n"
        "tracking: {experiment: medseg-xray-tiny}\n"
    )
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(tiny))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "results" / "config.yaml")
    assert config.classes == ["lung"] and config.train.spatial_dims == 2 and config.train.loss == "dice_bce"
    wf = Workflow(config)
    entries = read_manifest(wf.manifest)
    assert len(entries) == 8
    test = [e for e in entries if e.split == "test"]
    for e in test:
        image = read_volume(e.image, Image)
        assert image.spatial_shape == (64, 64, 1)
        prediction = read_volume(wf.stage_dir("postprocess") / f"{e.patient_id}.nii.gz", Label)
        assert prediction.spatial_shape == (64, 64, 1)
    rows = read_tsv(wf.stage_dir("evaluate") / "metrics.tsv")
    assert sorted(r["patient_id"] for r in rows) == sorted(e.patient_id for e in test)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and r["class"] == "lung"
        assert float(r["n_ref_instances"]) == 2  # two lung fields per radiograph
    lesions = read_tsv(wf.stage_dir("evaluate") / "instances.tsv")  # the lesion-wise table, one row per instance
    assert sum(r["side"] == "reference" for r in lesions) == 2 * len(test)
    assert (wf.stage_dir("report") / "report.html").exists()
    mlflow = _client(config, tmp_path)
    run = mlflow.search_runs([mlflow.get_experiment_by_name("medseg-xray-tiny").experiment_id])[0]
    assert "test_dice_lung" in run.data.metrics and run.data.params["train.spatial_dims"] == "2"

    # the trained model on new radiographs: DICOM DX (each answered with a DICOM-SEG) and PNGs in a dataset folder
    new = tmp_path / "new"
    for i in range(2):
        picture, _ = radiograph(np.random.default_rng(100 + i), (64, 64))
        write_dx_image(picture, 1.0, Identity(f"Roe^Richard{i}", f"MRN-55{i}"), new / f"Roe_Richard{i}" / "chest.dcm")
    (new / "pngs" / "imagesTs").mkdir(parents=True)
    shutil.copy(next((tmp_path / "data" / "demo_raw" / "imagesTr").glob("*.png")), new / "pngs" / "imagesTs")
    shutil.copy(tmp_path / "data" / "demo_raw" / "dataset.json", new / "pngs")
    out = tmp_path / "predicted"
    args = ["predict", "--config", "results/config.yaml", "--model", str(wf.model), "--input", str(new)]
    assert cli.main([*args, "--output", str(out)]) == 0
    records = read_tsv(out / "summary.tsv")
    assert sorted(r["source_format"] for r in records) == ["dicom", "dicom", "nifti"]
    assert all(r["status"] == "predicted" for r in records)
    segs = sorted(out.rglob("*.dcm"))
    assert len(segs) == 2
    for seg in segs:
        assert_dciodvfy_ok(seg)
    # the whole planted values: a pseudonym is base32 (A-Z, 2-7), so a bare "MRN" turns up in about one run in 800
    planted = ("Roe", "Richard", "MRN-55")
    assert not [p for p in out.rglob("*") if any(v in str(p.relative_to(out)) for v in planted)]
