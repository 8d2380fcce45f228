"""`medseg ingest`: a folder of DICOM series and/or NIfTI files in; canonical RAS NIfTI, sidecars, a manifest and
a failures report out. One bad case never stops the batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.errors import GeometryError, ImageReadError, MedsegError
from medseg.ingest.dicom import read_series
from medseg.ingest.discover import Case, discover, rank_series
from medseg.ingest.pseudonym import Redactor, load_or_create_key, pseudonym
from medseg.io import read_volume, to_canonical, write_json, write_text, write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS, assign_splits
from medseg.volume import Image, Label, describe_grid, same_grid

log = logging.getLogger(__name__)

Track = Callable[[Iterable[Any], str, int], Iterable[Any]]


def _no_track(items: Iterable[Any], _description: str, _total: int) -> Iterable[Any]:
    return items


@dataclass
class IngestResult:
    rows: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    series_report: list[dict[str, str]] = field(default_factory=list)


def load_case_image(case: Case, config: Config, report: list[dict[str, str]], pid: str) -> tuple[Image, dict]:
    """Read the case's image: the best eligible DICOM series that reads cleanly, else its NIfTI image."""
    if case.nifti_image is not None:
        return read_volume(case.nifti_image, Image), {"source_format": "nifti"}
    eligible, skipped = rank_series(case, config.ingest.series)
    for s, why in skipped:
        report.append({"patient_id": pid, "series": s.name(), "status": "skipped", "reason": why})
    errors = []
    for s in eligible:
        try:
            image, facts = read_series(s.files, config.ingest.slice_tolerance_mm)
        except MedsegError as err:
            errors.append(f"{s.name()}: {err}")
            report.append({"patient_id": pid, "series": s.name(), "status": "refused", "reason": str(err)})
            continue
        for other in eligible:
            if other is not s and not any(r["series"] == other.name() for r in report):
                reason = f"not chosen: {s.name()} has more slices" if other.frames < s.frames else "not chosen"
                report.append({"patient_id": pid, "series": other.name(), "status": "skipped", "reason": reason})
        report.append({"patient_id": pid, "series": s.name(), "status": "chosen", "reason": "most slices"})
        return image, {"source_format": "dicom", **facts}
    if errors:
        raise ImageReadError("; ".join(errors))
    raise ImageReadError("no eligible image series (see the series report for why each was skipped)")


def ingest_case(case: Case, pid: str, config: Config, out: Path, report: list[dict[str, str]]) -> dict[str, str]:
    """Read, check and write one case. Returns its manifest row (without the split)."""
    image, facts = load_case_image(case, config, report, pid)
    facts["source_affine_ras"] = np.round(image.affine, 6).tolist()
    facts["source_shape"] = list(image.spatial_shape)
    image = to_canonical(image)
    row = {"patient_id": pid, "image": str(out / "images" / f"{pid}.nii.gz"), "label": ""}
    label = None
    if case.nifti_label is not None:
        label = to_canonical(read_volume(case.nifti_label, Label))
        if not same_grid(image, label, config.ingest.label_tolerance_mm):
            raise GeometryError(
                f"label {case.nifti_label.name} is not on its image's grid (tolerance "
                f"{config.ingest.label_tolerance_mm} mm): image {describe_grid(image)}; label {describe_grid(label)}"
            )
        top = int(label.array.max())
        if top > len(config.classes):
            raise ImageReadError(
                f"label {case.nifti_label.name} holds class {top} but the config lists {len(config.classes)} classes"
            )
        label = Label(label.array, image.affine.copy())  # identical within tolerance; keep one affine
        row["label"] = str(out / "labels" / f"{pid}.nii.gz")
    facts["canonical_affine_ras"] = np.round(image.affine, 6).tolist()
    facts["canonical_shape"] = list(image.spatial_shape)
    write_volume(image, row["image"])
    if label is not None:
        write_volume(label, row["label"])
    write_json(out / "sidecars" / f"{pid}.json", {"patient_id": pid, **facts})
    return row


def run(
    config: Config, input_dir: Path, output_dir: Path, manifest_path: Path, track: Track = _no_track
) -> IngestResult:
    """Ingest every case below ``input_dir``.

    Returns:
        The manifest rows, the failures (each with a reason) and the per-series report.

    Raises:
        ImageReadError: when ``input_dir`` does not exist.
    """
    if not input_dir.is_dir():
        raise ImageReadError(f"input folder {input_dir} does not exist")
    key = load_or_create_key(config.ingest.pseudonym_key_file)
    found = discover(input_dir)
    redact = Redactor(found.identity_values)
    result = IngestResult()
    for rel, why in found.failures:
        result.failures.append({"patient_id": "", "source": redact(rel), "reason": redact(why)})
    per_subject: dict[str, int] = {}
    cases = sorted(found.cases, key=lambda c: (pseudonym(key, c.patient_key), c.study_key))
    for case in cases:
        per_subject[case.patient_key] = per_subject.get(case.patient_key, 0) + 1
    seen: dict[str, int] = {}
    id_map = []
    for case in track(cases, "ingest", len(cases)):
        subject = pseudonym(key, case.patient_key)
        seen[subject] = seen.get(subject, 0) + 1
        pid = subject if per_subject[case.patient_key] == 1 else f"{subject}-{seen[subject]}"
        id_map.append({"patient_id": pid, "source_patient_id": case.patient_key})
        try:
            row = ingest_case(case, pid, config, output_dir, result.series_report)
        except MedsegError as err:
            message = redact(str(err))
            log.error("patient %s skipped: %s", pid, message)
            result.failures.append({"patient_id": pid, "source": "", "reason": message})
            continue
        row["subject_id"] = subject
        result.rows.append(row)
        log.info("patient %s ingested", pid)
    for entry in result.series_report:
        entry["reason"] = redact(entry["reason"])
        entry["series"] = redact(entry["series"])
    assign_splits(result.rows, config.ingest.split)
    write_tsv(manifest_path, result.rows, MANIFEST_COLUMNS)
    write_tsv(output_dir / "failures.tsv", result.failures, ["patient_id", "source", "reason"])
    write_tsv(output_dir / "series.tsv", result.series_report, ["patient_id", "series", "status", "reason"])
    write_text(output_dir / "config.yaml", config.to_yaml())
    if config.ingest.id_map_file is not None:
        write_tsv(config.ingest.id_map_file, id_map, ["patient_id", "source_patient_id"])
    return result
