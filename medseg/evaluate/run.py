"""`medseg evaluate`: score predictions against the manifest's labels for the test patients.

Writes ``metrics.tsv`` (one row per patient x class) and ``summary.json`` (per-class means over patients, as
nnU-Net reports them, with the empty-mask convention and counts), and logs both to the MLflow run of training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg import tracking
from medseg.config import Config
from medseg.errors import GeometryError, ManifestError
from medseg.evaluate.metrics import EMPTY_CONVENTION, class_metrics
from medseg.io import read_json, read_volume, write_json, write_text, write_tsv
from medseg.manifest import read_manifest, select
from medseg.volume import Label, describe_grid, same_grid

log = logging.getLogger(__name__)

METRICS = ("dice", "iou", "boundary_f1")
COLUMNS = ["patient_id", "class", *METRICS, "ref_volume_mm3", "pred_volume_mm3"]


def score_patient(config: Config, patient_id: str, prediction: Path, reference: Path) -> list[dict[str, Any]]:
    pred, ref = read_volume(prediction, Label), read_volume(reference, Label)
    if not same_grid(pred, ref, config.ingest.label_tolerance_mm):
        raise GeometryError(
            f"{patient_id}: prediction {prediction} is not on the reference grid: "
            f"prediction {describe_grid(pred)}; reference {describe_grid(ref)}"
        )
    rows = []
    for index, name in enumerate(config.classes, start=1):
        values = class_metrics(
            pred.array[0] == index, ref.array[0] == index, ref.spacing, config.evaluate.boundary_tolerance_mm
        )
        rows.append({"patient_id": patient_id, "class": name, **values})
    return rows


def summarise(config: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n_patients": len({r["patient_id"] for r in rows}),
        "empty_convention": EMPTY_CONVENTION,
        "boundary_tolerance_mm": config.evaluate.boundary_tolerance_mm,
        "per_class": {},
    }
    for name in config.classes:
        class_rows = [r for r in rows if r["class"] == name]
        entry: dict[str, Any] = {
            "both_empty": sum(1 for r in class_rows if r["ref_volume_mm3"] == 0 and r["pred_volume_mm3"] == 0),
            "reference_empty": sum(1 for r in class_rows if r["ref_volume_mm3"] == 0),
            "prediction_empty": sum(1 for r in class_rows if r["pred_volume_mm3"] == 0),
        }
        for metric in METRICS:
            values = np.array([r[metric] for r in class_rows], dtype=float)
            finite = values[~np.isnan(values)]
            entry[metric] = {
                "mean": float(finite.mean()) if finite.size else None,
                "median": float(np.median(finite)) if finite.size else None,
                "std": float(finite.std()) if finite.size else None,
                "n": int(finite.size),
            }
        summary["per_class"][name] = entry
    means = [summary["per_class"][c]["dice"]["mean"] for c in config.classes]
    means = [m for m in means if m is not None]
    summary["mean_foreground_dice"] = float(np.mean(means)) if means else None
    return summary


def run(
    config: Config, manifest_path: Path, predictions_dir: Path, output_dir: Path, run_json: Path | None = None
) -> dict[str, Any]:
    entries = select(read_manifest(manifest_path), "test")
    if not entries:
        raise ManifestError(f"manifest {manifest_path} has no test patients to evaluate")
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry.label is None:
            continue
        rows.extend(score_patient(config, entry.patient_id, predictions_dir / f"{entry.patient_id}.nii.gz", entry.label))
    summary = summarise(config, rows)
    write_tsv(output_dir / "metrics.tsv", rows, COLUMNS)
    write_json(output_dir / "summary.json", summary)
    write_text(output_dir / "config.yaml", config.to_yaml())
    if run_json is not None and run_json.exists():
        with tracking.run(config.tracking, run_id=read_json(run_json)["run_id"]):
            metrics = {}
            for name, entry in summary["per_class"].items():
                for metric in METRICS:
                    if entry[metric]["mean"] is not None:
                        metrics[f"test_{metric}_{name}"] = entry[metric]["mean"]
            if summary["mean_foreground_dice"] is not None:
                metrics["test_dice_mean"] = summary["mean_foreground_dice"]
            tracking.log_metrics(metrics)
            for name in ("metrics.tsv", "summary.json"):
                tracking.log_artifact(output_dir / name, "evaluate")
    return summary
