"""`medseg evaluate` end to end on tiny files: tables, summary counts, a bad case recorded, MLflow logging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from medseg import tracking
from medseg.config import Config
from medseg.evaluate.run import COLUMNS, INSTANCE_COLUMNS, run
from medseg.io import read_tsv, write_json, write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS
from medseg.volume import Label

AFFINE = np.diag([0.8, 0.9, 2.5, 1.0])


def _label(values: dict[int, tuple[slice, ...]]) -> Label:
    array = np.zeros((1, 10, 10, 6), np.uint8)
    for c, box in values.items():
        array[(0, *box)] = c
    return Label(array, AFFINE)


def _setup(tmp_path: Path) -> tuple[Config, Path, Path]:
    box_a, box_b = (slice(1, 5), slice(1, 5), slice(1, 4)), (slice(6, 9), slice(6, 9), slice(2, 5))
    cases = {
        # patient: (reference, prediction or None for a missing file)
        "p1": (_label({1: box_a, 2: box_b}), _label({1: box_a, 2: box_b})),  # perfect
        "p2": (_label({1: box_a}), _label({1: box_a, 2: box_b})),  # class 2: false positive
        "p3": (_label({1: box_a, 2: box_b}), _label({2: box_b})),  # class 1: missed
        "p4": (_label({1: box_a}), None),  # no prediction file
    }
    rows = []
    for pid, (ref, pred) in cases.items():
        write_volume(ref, tmp_path / "labels" / f"{pid}.nii.gz")
        if pred is not None:
            write_volume(pred, tmp_path / "pred" / f"{pid}.nii.gz")
        label = str(tmp_path / "labels" / f"{pid}.nii.gz")
        rows.append({"patient_id": pid, "subject_id": pid, "image": label, "label": label, "split": "test"})
    write_tsv(tmp_path / "manifest.tsv", rows, MANIFEST_COLUMNS)
    config = Config.model_validate(
        {"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_dir": str(tmp_path / "artifacts")}}
    )
    return config, tmp_path / "manifest.tsv", tmp_path / "pred"


def test_evaluate_writes_tables_counts_and_failures(tmp_path: Path) -> None:
    config, manifest, pred_dir = _setup(tmp_path)
    summary = run(config, manifest, pred_dir, tmp_path / "out")
    rows = read_tsv(tmp_path / "out" / "metrics.tsv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 3 * 2  # p4 could not be scored
    assert [f["patient_id"] for f in summary["failures"]] == ["p4"]
    a, b = summary["per_class"]["organ_a"], summary["per_class"]["organ_b"]
    assert (a["both_empty"], a["reference_empty_only"], a["prediction_empty_only"]) == (0, 0, 1)
    assert (b["both_empty"], b["reference_empty_only"], b["prediction_empty_only"]) == (0, 1, 0)
    assert a["dice"]["n"] == 3 and math.isclose(a["dice"]["mean"], 2 / 3)  # 1, 1, 0
    assert a["hd95_mm"]["n"] == 2 and a["hd95_mm"]["mean"] == 0.0  # the miss has no distance, only a count
    assert summary["empty_convention"] and summary["hausdorff_percentile"] == 95.0
    p2 = {r["class"]: r for r in rows if r["patient_id"] == "p2"}
    assert float(p2["organ_b"]["dice"]) == 0.0 and p2["organ_b"]["hd95_mm"] == "nan"
    assert float(p2["organ_b"]["ref_volume_mm3"]) == 0.0
    assert float(p2["organ_b"]["pred_volume_mm3"]) == 27 * 0.8 * 0.9 * 2.5
    assert float(p2["organ_a"]["pixel_accuracy"]) == 1 - 27 / 600
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_patients"] == 3
    # the lesion-wise table: p2's organ_b is predicted where the reference has none: one unmatched prediction
    instances = read_tsv(tmp_path / "out" / "instances.tsv")
    assert list(instances[0]) == INSTANCE_COLUMNS
    p2b = [r for r in instances if r["patient_id"] == "p2" and r["class"] == "organ_b"]
    assert [(r["side"], r["instance"], r["matched"]) for r in p2b] == [("prediction", "1", "False")]
    assert float(p2b[0]["volume_mm3"]) == 27 * 0.8 * 0.9 * 2.5 and float(p2b[0]["best_iou"]) == 0.0


def test_evaluate_logs_both_files_to_the_training_run(tmp_path: Path) -> None:
    config, manifest, pred_dir = _setup(tmp_path)
    with tracking.run(config.tracking, run_name="train") as run_id:
        pass
    write_json(tmp_path / "run.json", {"run_id": run_id})
    run(config, manifest, pred_dir, tmp_path / "out", tmp_path / "run.json")
    client = tracking.client(config.tracking)
    logged = client.get_run(run_id)
    assert logged.data.metrics["test_dice_organ_a"] == 2 / 3
    assert logged.data.metrics["test_prediction_empty_only_organ_a"] == 1
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert artifacts == {"evaluate/metrics.tsv", "evaluate/instances.tsv", "evaluate/summary.json"}
