"""`medseg evaluate`: score predictions against the manifest's labels for the test patients.

Writes ``metrics.tsv`` (one row per patient x class; the per-patient values pixel accuracy and mean IoU repeat on
each of that patient's rows so the table stays one table), ``summary.json`` (per-class mean, median, std and
count over patients, as nnU-Net reports them, with the empty-mask convention and counts, and the patients that
could not be scored with the reason), ``instances.tsv`` (every instance, a connected component of a class, of the
reference and of the prediction: volume, best IoU with the other side, matched or not: the lesion-wise table) and
logs them to the MLflow run of training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg import tracking
from medseg.config import Config
from medseg.errors import GeometryError, ManifestError, MedsegError
from medseg.io import read_json, read_volume, write_json, write_text, write_tsv
from medseg.manifest import read_manifest, select
from medseg.metrics import (
    CLASS_METRICS,
    EMPTY_CONVENTION,
    PATIENT_METRICS,
    empty_case,
    label_results,
)
from medseg.volume import Label, describe_grid, same_grid

log = logging.getLogger(__name__)

COLUMNS = ["patient_id", "class", *CLASS_METRICS, "ref_volume_mm3", "pred_volume_mm3", *PATIENT_METRICS]
INSTANCE_COLUMNS = ["patient_id", "class", "side", "instance", "volume_mm3", "best_iou", "matched"]
EMPTY_CASES = ("both_empty", "reference_empty_only", "prediction_empty_only")


def score_patient(config: Config, patient_id: str, prediction: Path, reference: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.tsv`` for one patient.

    Raises:
        ImageReadError: a file is missing or unreadable.
        GeometryError: the prediction is not on the reference's grid.
    """
    return _score(config, patient_id, prediction, reference)[0]


def _score(
    config: Config, patient_id: str, prediction: Path, reference: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The patient's rows of ``metrics.tsv`` and of ``instances.tsv`` (each class's instances, both sides)."""
    pred, ref = read_volume(prediction, Label), read_volume(reference, Label)
    if not same_grid(pred, ref, config.ingest.label_tolerance_mm):
        raise GeometryError(
            f"{patient_id}: prediction {prediction} is not on the reference grid: "
            f"prediction {describe_grid(pred)}; reference {describe_grid(ref)}"
        )
    e = config.evaluate
    per_class, per_patient, tables = label_results(
        pred.array[0],
        ref.array[0],
        ref.spacing,
        len(config.classes),
        boundary_tolerance_mm=e.boundary_tolerance_mm,
        surface_tolerance_mm=e.surface_dice_tolerance_mm,
        percentile=e.hausdorff_percentile,
        instance_iou=e.instance_iou_threshold,
    )
    instance_table = [
        {"patient_id": patient_id, "class": name, **row}
        for name, rows in zip(config.classes, tables, strict=True)
        for row in rows
    ]
    rows = [
        {"patient_id": patient_id, "class": name, **values, **per_patient}
        for name, values in zip(config.classes, per_class, strict=True)
    ]
    return rows, instance_table


def _stats(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    finite = array[~np.isnan(array)]
    if not finite.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "std": float(finite.std()),
        "n": int(finite.size),
    }


def summarise(
    config: Config, rows: list[dict[str, Any]], failures: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """``summary.json``: statistics over patients per class and metric, empty-mask counts, the convention."""
    e = config.evaluate
    summary: dict[str, Any] = {
        "n_patients": len({r["patient_id"] for r in rows}),
        "empty_convention": EMPTY_CONVENTION,
        "boundary_tolerance_mm": e.boundary_tolerance_mm,
        "surface_dice_tolerance_mm": e.surface_dice_tolerance_mm,
        "hausdorff_percentile": e.hausdorff_percentile,
        "instance_iou_threshold": e.instance_iou_threshold,
        "per_class": {},
        "per_patient": {},
        "failures": failures or [],
    }
    for name in config.classes:
        class_rows = [r for r in rows if r["class"] == name]
        cases = [empty_case(r) for r in class_rows]
        entry: dict[str, Any] = {case: cases.count(case) for case in EMPTY_CASES}
        for metric in (*CLASS_METRICS, "ref_volume_mm3", "pred_volume_mm3"):
            entry[metric] = _stats([r[metric] for r in class_rows])
        summary["per_class"][name] = entry
    first_rows = {r["patient_id"]: r for r in rows}.values()
    for metric in PATIENT_METRICS:
        summary["per_patient"][metric] = _stats([r[metric] for r in first_rows])
    means = [summary["per_class"][c]["dice"]["mean"] for c in config.classes]
    means = [m for m in means if m is not None]
    summary["mean_foreground_dice"] = float(np.mean(means)) if means else None
    return summary


def run(
    config: Config, manifest_path: Path, predictions_dir: Path, output_dir: Path, run_json: Path | None = None
) -> dict[str, Any]:
    """Score every test patient of the manifest that has a label; one bad case is recorded, not fatal.

    Returns:
        The summary (also written to ``output_dir/summary.json``); ``summary["failures"]`` lists the patients
        that could not be scored.

    Raises:
        ManifestError: the manifest has no test patients.
    """
    entries = select(read_manifest(manifest_path), "test")
    if not entries:
        raise ManifestError(f"manifest {manifest_path} has no test patients to evaluate")
    rows: list[dict[str, Any]] = []
    instance_table: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for entry in entries:
        if entry.label is None:
            continue
        try:
            scored = _score(config, entry.patient_id, predictions_dir / f"{entry.patient_id}.nii.gz", entry.label)
            rows.extend(scored[0])
            instance_table.extend(scored[1])
        except MedsegError as err:
            log.error("%s: not scored: %s", entry.patient_id, err)
            failures.append({"patient_id": entry.patient_id, "reason": str(err)})
    summary = summarise(config, rows, failures)
    write_tsv(output_dir / "metrics.tsv", rows, COLUMNS)
    write_tsv(output_dir / "instances.tsv", instance_table, INSTANCE_COLUMNS)
    write_json(output_dir / "summary.json", summary)
    write_text(output_dir / "config.yaml", config.to_yaml())
    if run_json is not None and run_json.exists():
        with tracking.run(config.tracking, run_id=read_json(run_json)["run_id"]):
            tracking.log_metrics(_mlflow_metrics(summary))
            for name in ("metrics.tsv", "instances.tsv", "summary.json"):
                tracking.log_artifact(output_dir / name, "evaluate")
    return summary


def _mlflow_metrics(summary: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, entry in summary["per_class"].items():
        for metric in CLASS_METRICS:
            if entry[metric]["mean"] is not None:
                metrics[f"test_{metric}_{name}"] = entry[metric]["mean"]
        for case in EMPTY_CASES:
            metrics[f"test_{case}_{name}"] = entry[case]
    for metric, stats in summary["per_patient"].items():
        if stats["mean"] is not None:
            metrics[f"test_{metric}"] = stats["mean"]
    if summary["mean_foreground_dice"] is not None:
        metrics["test_dice_mean"] = summary["mean_foreground_dice"]
    metrics["test_failures"] = len(summary["failures"])
    return metrics
