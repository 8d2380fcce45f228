"""`medseg report`: one self-contained HTML page per run, readable offline and mailable as one file.

Everything is inline (CSS, a few lines of JavaScript for sorting, PNGs as base64): the page loads nothing from the
network. Sections: the per-class summary, box plots per class and metric, the sortable per-patient table
(``metrics.tsv`` of `medseg evaluate`), the worst patients with QC pictures (prediction solid, reference
dashed), the training curves (``history.tsv`` of `medseg train`) and the resolved config. Patients appear only
by their pseudonymised id. The page is logged into the training run's MLflow run as ``report/<name>.html``.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg import tracking
from medseg.config import Config
from medseg.errors import ManifestError
from medseg.io import read_json, read_tsv, read_volume, write_text
from medseg.manifest import read_manifest
from medseg.predict.functional import default_color
from medseg.qc import render_qc
from medseg.report.plots import box_plots, training_curves
from medseg.volume import Image, Label

log = logging.getLogger(__name__)

ID_COLUMNS = ("patient_id", "class")


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def numeric_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Columns of ``metrics.tsv`` whose every filled cell is a number (``nan`` included), in file order."""
    if not rows:
        return []

    def is_number(value: str) -> bool:
        try:
            float(value)
        except ValueError:
            return False
        return True

    columns = [c for c in rows[0] if c not in ID_COLUMNS]
    return [c for c in columns if all(is_number(r[c]) for r in rows if r.get(c) not in (None, ""))]


def lower_is_better(metric: str) -> bool:
    """Distances (``*_mm``) are better small; overlaps and F-scores are better large."""
    return metric.endswith("_mm")


def worst_patients(rows: Sequence[Mapping[str, str]], metric: str, n: int) -> list[tuple[str, float]]:
    """The ``n`` patients with the worst mean of ``metric`` over classes (NaN left out; all-NaN patients last).

    >>> worst_patients([{"patient_id": "a", "dice": "0.9"}, {"patient_id": "b", "dice": "0.2"}], "dice", 1)
    [('b', 0.2)]
    """
    per_patient: dict[str, list[float]] = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], []).append(_float(r.get(metric)))
    means = []
    for pid, values in per_patient.items():
        finite = [v for v in values if not math.isnan(v)]
        means.append((pid, sum(finite) / len(finite) if finite else math.nan))
    sign = 1.0 if lower_is_better(metric) else -1.0
    means.sort(key=lambda item: (math.isnan(item[1]), -sign * item[1] if not math.isnan(item[1]) else 0.0, item[0]))
    return means[:n]


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(value: str) -> str:
    number = _float(value)
    if math.isnan(number):
        return f"<td>{html.escape(value)}</td>" if value not in ("", "nan") else '<td class="nan">NaN</td>'
    return f'<td data-v="{number!r}">{number:.4g}</td>'


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], table_id: str) -> str:
    head = "".join(f"<th onclick=\"sortTable('{table_id}', {i})\">{html.escape(c)}</th>" for i, c in enumerate(columns))
    body = "\n".join("<tr>" + "".join(_cell(str(r.get(c, ""))) for c in columns) + "</tr>" for r in rows)
    return f'<table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _summary_table(rows: Sequence[Mapping[str, str]], classes: Sequence[str], metrics: Sequence[str]) -> str:
    out = []
    for name in classes:
        entry: dict[str, Any] = {"class": name}
        for metric in metrics:
            values = [_float(r.get(metric)) for r in rows if r.get("class") == name]
            finite = sorted(v for v in values if not math.isnan(v))
            if finite:
                entry[metric] = (
                    f"{statistics.fmean(finite):.4g} (median {statistics.median(finite):.4g}, n={len(finite)})"
                )
            else:
                entry[metric] = "undefined"
        out.append(entry)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["class", *metrics])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(e[c]))}</td>" for c in ["class", *metrics]) + "</tr>" for e in out
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _qc_pictures(
    config: Config, worst: Sequence[tuple[str, float]], manifest: Path | None, predictions: Path | None, metric: str
) -> str:
    if not worst:
        return "<p>No patients to show.</p>"
    if manifest is None or predictions is None:
        return "<p>QC pictures need --manifest and --predictions.</p>" + "".join(
            f"<p>{html.escape(pid)}: mean {metric} {value:.4g}</p>" for pid, value in worst
        )
    entries = {e.patient_id: e for e in read_manifest(manifest)}
    colors = [
        (config.predict.segments[c].color_rgb if c in config.predict.segments else None) or default_color(i)
        for i, c in enumerate(config.classes, start=1)
    ]
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for pid, value in worst:
            caption = f"{pid}: mean {metric} {value:.4g}"
            entry, prediction = entries.get(pid), predictions / f"{pid}.nii.gz"
            if entry is None or not prediction.exists():
                parts.append(
                    f"<figure><figcaption>{html.escape(caption)} (no image or prediction)</figcaption></figure>"
                )
                continue
            try:
                image = read_volume(entry.image, Image)
                reference = read_volume(entry.label, Label) if entry.label else None
                picture = render_qc(
                    image,
                    read_volume(prediction, Label),
                    config.classes,
                    colors,
                    Path(tmp) / f"{pid}.png",
                    config.predict.qc_slices,
                    reference=reference,
                    title=caption,
                    # the CT soft-tissue window for CT (the manifest's modality, or a CT normalisation the
                    # config names); percentiles for anything else
                    window=config.predict.qc_ct_window_hu
                    if entry.modality == "CT" or config.resample.normalization in ("ct", "window")
                    else None,
                )
            except Exception as err:  # one unreadable case must not cost the whole report
                log.warning("no QC picture for %s: %s", pid, err)
                parts.append(
                    f"<figure><figcaption>{html.escape(caption)} (picture failed: {err})</figcaption></figure>"
                )
                continue
            parts.append(
                f"<figure>{_img(picture.read_bytes(), caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; position: sticky; top: 0; }
table.sortable th { cursor: pointer; } table.sortable th:hover { background: #e0e8f0; }
td:first-child, td:nth-child(2) { text-align: left; } td.nan { color: #999; }
.scroll { max-height: 480px; overflow-y: auto; display: inline-block; }
img { max-width: 100%; } figure { margin: 0.6em 0; } figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; max-height: 500px; overflow: auto; }
.meta { color: #666; font-size: 0.9em; }
"""

SCRIPT = """
function sortTable(id, column) {
  const table = document.getElementById(id);
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const ascending = table.dataset.sortColumn == column ? table.dataset.sortOrder != "asc" : true;
  const key = (row) => {
    const cell = row.cells[column];
    const v = cell.dataset.v;
    return v === undefined ? cell.textContent : parseFloat(v);
  };
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x === "number" && typeof y === "number") return ascending ? x - y : y - x;
    if (typeof x === "number") return -1;
    if (typeof y === "number") return 1;
    return ascending ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
  });
  rows.forEach((row) => body.appendChild(row));
  table.dataset.sortColumn = column;
  table.dataset.sortOrder = ascending ? "asc" : "desc";
}
"""


def _crf_line(config: Config, decision: Mapping[str, Any] | None) -> str:
    """Whether the predictions were refined by the CRF, and why (``postprocess.crf``)."""
    enabled = config.postprocess.crf.enabled
    if enabled != "auto":
        return f"CRF refinement: {'on' if enabled else 'off'} (postprocess.crf.enabled: {str(enabled).lower()})"
    if not decision:
        return "CRF refinement: auto, as the model records (no decision file beside the training history)"
    before, after = decision.get("mean_dice_before"), decision.get("mean_dice_with_crf")
    scores = f": validation mean Dice {before:.4f} without, {after:.4f} with" if None not in (before, after) else ""
    return (
        f"CRF refinement: {'on' if decision.get('enabled') else 'off'}, decided by training on "
        f"{decision.get('n_cases', 0)} validation case(s){scores}"
    )


def build_html(
    config: Config,
    rows: Sequence[Mapping[str, str]],
    history: Sequence[Mapping[str, float]],
    qc_html: str,
    summary: Mapping[str, Any] | None = None,
    crf_decision: Mapping[str, Any] | None = None,
) -> str:
    """The page as one string (see the module docstring); ``crf_decision``: training's ``crf_decision.json``."""
    classes = [c for c in config.classes if any(r.get("class") == c for r in rows)] or list(config.classes)
    numeric = numeric_columns(rows)
    plotted = [
        m for m in (config.report.metrics or [c for c in numeric if not c.endswith("volume_mm3")]) if m in numeric
    ]
    sections = [f"<h1>medseg report: {html.escape(config.dataset)}</h1>"]
    sections.append(
        f'<p class="meta">config digest {config.digest()}; {len({r["patient_id"] for r in rows})} test patient(s), '
        f"{len(classes)} class(es)</p>"
    )
    sections.append("<h2>Summary per class</h2>" + _summary_table(rows, classes, plotted))
    if summary and summary.get("empty_convention"):
        sections.append(f'<p class="meta">Empty masks: {html.escape(str(summary["empty_convention"]))}</p>')
    sections.append(f'<p class="meta">{html.escape(_crf_line(config, crf_decision))}</p>')
    if plotted and rows:
        values = {m: {c: [_float(r.get(m)) for r in rows if r.get("class") == c] for c in classes} for m in plotted}
        sections.append(
            "<h2>Metrics per class</h2>" + _img(box_plots(values, classes), "box plots per class and metric")
        )
    columns = [c for c in rows[0] if c in ID_COLUMNS or c in numeric] if rows else list(ID_COLUMNS)
    sections.append(
        '<h2>Per-patient metrics</h2><p class="meta">Click a column header to sort.</p>'
        f'<div class="scroll">{_table(rows, columns, "metrics")}</div>'
    )
    sections.append(f"<h2>Worst patients by {html.escape(config.report.worst_metric)}</h2>{qc_html}")
    if history:
        sections.append("<h2>Training curves</h2>" + _img(training_curves(history), "training curves"))
    else:
        sections.append("<h2>Training curves</h2><p>No training history given.</p>")
    sections.append(f"<h2>Configuration</h2><pre>{html.escape(config.to_yaml())}</pre>")
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>medseg report: {html.escape(config.dataset)}</title><style>{STYLE}</style>"
        f"<script>{SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


def run(
    config: Config,
    metrics: Path,
    output: Path,
    history: Path | None = None,
    manifest: Path | None = None,
    predictions: Path | None = None,
    run_json: Path | None = None,
) -> Path:
    """Write the report and log it into the training run's MLflow run (when ``run_json`` is given).

    Args:
        config: the run's config.
        metrics: ``metrics.tsv`` of `medseg evaluate` (a ``summary.json`` beside it is used when present).
        output: the HTML file.
        history: ``history.tsv`` of `medseg train`; the curves are left out if missing.
        manifest: for the worst patients' images and reference labels.
        predictions: folder of ``<patient_id>.nii.gz`` predictions.
        run_json: ``run.json`` of training, naming the MLflow run.

    Returns:
        ``output``.

    Raises:
        ManifestError: ``metrics`` is missing or lacks the ``patient_id`` and ``class`` columns.
    """
    if not metrics.exists():
        raise ManifestError(f"metrics table {metrics} does not exist: run `medseg evaluate` first")
    rows = read_tsv(metrics)
    if rows and not all(c in rows[0] for c in ID_COLUMNS):
        raise ManifestError(f"metrics table {metrics} lacks the columns {list(ID_COLUMNS)}")
    history_rows = []
    if history is not None and history.exists():
        history_rows = [{k: _float(v) for k, v in r.items()} for r in read_tsv(history)]
    summary_path = metrics.parent / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else None
    worst = worst_patients(rows, config.report.worst_metric, config.report.worst_patients)
    qc_html = _qc_pictures(config, worst, manifest, predictions, config.report.worst_metric)
    decision_path = history.parent / "crf_decision.json" if history is not None else None
    decision = read_json(decision_path) if decision_path is not None and decision_path.exists() else None
    write_text(output, build_html(config, rows, history_rows, qc_html, summary, decision))
    if run_json is not None and run_json.exists():
        with tracking.run(config.tracking, run_id=read_json(run_json)["run_id"]):
            tracking.log_artifact(output, "report")
    return output
