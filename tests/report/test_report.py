"""The HTML report: self-contained (no network), tables and plots present, worst patients with pictures, logged
to MLflow. Parsed with the standard library's HTML parser, as a browser-free stand-in."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg import tracking
from medseg.config import Config
from medseg.io import write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS
from medseg.report.run import lower_is_better, run, worst_patients
from medseg.volume import Image, Label

CLASSES = ["organ_a", "organ_b"]
DICE = {"P1": (0.9, 0.8), "P2": (0.3, 0.1), "P3": (0.7, float("nan")), "P4": (0.5, 0.6)}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self._tag = tag
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("src", "href"):
            if (values.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(values[key] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._tag == "h2":
            self.headings.append(data)
            self._tag = ""


def _cohort(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    manifest_rows, metric_rows = [], []
    for pid, dice in DICE.items():
        image = Image(rng.normal(size=(1, 20, 20, 8)).astype(np.float32), affine)
        label = np.zeros((1, 20, 20, 8), dtype=np.uint8)
        label[0, 5:12, 5:12, 2:6] = 1
        label[0, 12:16, 5:9, 2:6] = 2
        write_volume(image, tmp_path / "images" / f"{pid}.nii.gz")
        write_volume(Label(label, affine), tmp_path / "labels" / f"{pid}.nii.gz")
        write_volume(Label(np.roll(label, 2, axis=1), affine), tmp_path / "pred" / f"{pid}.nii.gz")
        manifest_rows.append(
            {
                "patient_id": pid,
                "subject_id": pid,
                "image": str(tmp_path / "images" / f"{pid}.nii.gz"),
                "label": str(tmp_path / "labels" / f"{pid}.nii.gz"),
                "split": "test",
                "modality": "CT" if pid == "P2" else "MR",
            }
        )
        for name, d in zip(CLASSES, dice, strict=True):
            metric_rows.append({"patient_id": pid, "class": name, "dice": d, "hd95_mm": 10 * (1 - d) if d == d else d,
                                "pred_volume_mm3": 100.0})  # fmt: skip
    write_tsv(tmp_path / "manifest.tsv", manifest_rows, MANIFEST_COLUMNS)
    write_tsv(tmp_path / "metrics.tsv", metric_rows, ["patient_id", "class", "dice", "hd95_mm", "pred_volume_mm3"])
    history = [{"epoch": e, "train_loss": 1 / e, "val_dice_mean": 0.1 * e, "val_dice_organ_a": 0.1 * e,
                "val_dice_organ_b": 0.05 * e} for e in range(1, 6)]  # fmt: skip
    write_tsv(tmp_path / "history.tsv", history, list(history[0]))
    return tmp_path / "metrics.tsv", tmp_path / "history.tsv", tmp_path / "manifest.tsv", tmp_path / "pred"


def test_worst_patients_by_hand() -> None:
    rows = [
        {"patient_id": p, "class": c, "dice": str(d)}
        for p, ds in DICE.items()
        for c, d in zip(CLASSES, ds, strict=True)
    ]
    # Means over classes with NaN left out: P1 0.85, P2 0.2, P3 0.7, P4 0.55.
    assert [p for p, _ in worst_patients(rows, "dice", 3)] == ["P2", "P4", "P3"]
    assert lower_is_better("hd95_mm") and not lower_is_better("dice")
    distance_rows = [{"patient_id": "a", "hd95_mm": "3"}, {"patient_id": "b", "hd95_mm": "9"}]
    assert worst_patients(distance_rows, "hd95_mm", 1) == [("b", 9.0)]


def test_report_is_self_contained_with_tables_plots_and_pictures(tmp_path: Path) -> None:
    metrics, history, manifest, predictions = _cohort(tmp_path)
    config = Config.model_validate(
        {"classes": CLASSES, "report": {"worst_patients": 2},
         "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_dir": str(tmp_path / "artifacts")}}
    )  # fmt: skip
    with tracking.run(config.tracking) as run_id:
        pass
    (tmp_path / "run.json").write_text(f'{{"run_id": "{run_id}"}}')
    out = run(config, metrics, tmp_path / "report.html", history, manifest, predictions, tmp_path / "run.json")

    page = _Page()
    page.feed(out.read_text())
    assert not page.external
    assert "<script src" not in out.read_text() and "<link" not in out.read_text()
    # box plots, training curves, and one QC picture per worst patient; each a real inline PNG
    assert len(page.images) == 2 + 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    per_patient = next(t for t in page.tables if t[0][:2] == ["patient_id", "class"])
    assert per_patient[0] == ["patient_id", "class", "dice", "hd95_mm", "pred_volume_mm3"]
    assert len(per_patient) == 1 + len(DICE) * len(CLASSES)
    assert ["P2", "organ_b", "0.1", "9", "100"] in per_patient
    assert any(heading.startswith("Worst patients") for heading in page.headings)
    assert "P2: mean dice 0.2" in out.read_text()
    assert "Training curves" in page.headings and "Configuration" in page.headings
    # no decision file beside the history: the report says the model's record decides
    assert "CRF refinement: auto, as the model records" in out.read_text()
    decision = {"enabled": True, "n_cases": 3, "mean_dice_before": 0.9658, "mean_dice_with_crf": 0.9736}
    (history.parent / "crf_decision.json").write_text(json.dumps(decision))
    again = run(config, metrics, tmp_path / "report2.html", history, manifest, predictions)
    assert "CRF refinement: on, decided by training on 3 validation case(s): validation mean Dice 0.9658 without, " \
        "0.9736 with" in again.read_text()  # fmt: skip

    artifacts = [a.path for a in tracking.client(config.tracking).list_artifacts(run_id, "report")]
    assert artifacts == ["report/report.html"]


def test_report_without_history_or_images_still_renders(tmp_path: Path) -> None:
    metrics, _history, _manifest, _predictions = _cohort(tmp_path)
    out = run(Config.model_validate({"classes": CLASSES}), metrics, tmp_path / "r.html")
    page = _Page()
    page.feed(out.read_text())
    assert len(page.images) == 1  # the box plots only
    assert "No training history given." in out.read_text()
    assert "CRF refinement: auto, as the model records" in out.read_text()
    forced = Config.model_validate({"classes": CLASSES, "postprocess": {"crf": {"enabled": False}}})
    assert (
        "CRF refinement: off (postprocess.crf.enabled: false)" in run(forced, metrics, tmp_path / "f.html").read_text()
    )


def test_missing_metrics_is_a_clear_error(tmp_path: Path) -> None:
    from medseg.errors import ManifestError

    with pytest.raises(ManifestError, match="run `medseg evaluate` first"):
        run(Config(), tmp_path / "metrics.tsv", tmp_path / "r.html")


def test_qc_pictures_use_the_ct_window_for_ct_cases_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.report.run as report

    metrics, _history, manifest, predictions = _cohort(tmp_path)
    windows: dict[str, object] = {}
    real = report.render_qc

    def spy(image, label, classes, colors, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        windows[Path(path).stem] = kwargs.get("window")
        return real(image, label, classes, colors, path, *args, **kwargs)

    monkeypatch.setattr(report, "render_qc", spy)
    config = Config.model_validate({"classes": CLASSES, "report": {"worst_patients": 4}})  # normalisation: the plan's
    run(config, metrics, tmp_path / "r.html", manifest=manifest, predictions=predictions)
    assert windows["P2"] == config.predict.qc_ct_window_hu  # a CT case: the soft-tissue window
    assert all(w is None for pid, w in windows.items() if pid != "P2")  # MR: percentiles
