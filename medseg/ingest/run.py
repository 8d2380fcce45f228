"""`medseg ingest`: a folder of DICOM series and/or NIfTI files in; canonical RAS NIfTI, sidecars, a manifest and
a failures report out. One bad case never stops the batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.errors import ConfigError, GeometryError, ImageReadError, one_line_reason
from medseg.ingest.dicom import SeriesVolume, read_series
from medseg.ingest.discover import Case, Series, discover, rank_series
from medseg.ingest.labels import read_label_object
from medseg.ingest.pseudonym import Redactor, debug_traceback, load_or_create_key, pseudonym
from medseg.io import read_volume, to_canonical, write_json, write_text, write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS, assign_splits
from medseg.volume import Image, Label, check_image, describe_grid, same_grid

log = logging.getLogger(__name__)

Track = Callable[[Iterable[Any], str, int], Iterable[Any]]


def _no_track(items: Iterable[Any], _description: str, _total: int) -> Iterable[Any]:
    return items


@dataclass
class IngestResult:
    rows: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    series_report: list[dict[str, str]] = field(default_factory=list)


def load_case_image(
    case: Case, config: Config, report: list[dict[str, str]], pid: str
) -> tuple[Image, dict[str, Any], SeriesVolume | None, Series | None]:
    """Read the case's image: the best eligible DICOM series that reads cleanly, else its NIfTI/NRRD image.

    A series that a SEG or RTSTRUCT of the case references goes first: the label decides which image it labels.

    Returns:
        ``(image, facts, volume, series)``: the chosen series read and as discovered (both None for a NIfTI/NRRD
        image).
    """
    limit = config.ingest.max_image_mb
    if case.nifti_image is not None:
        image = read_volume(case.nifti_image, Image, limit)
        check_image(image, case.nifti_image.name)
        return image, {"source_format": _volume_format(case.nifti_image)}, None, None
    eligible, skipped = rank_series(case, config.ingest.series)
    for s, why in skipped:
        report.append({"patient_id": pid, "series": s.name(), "status": "skipped", "reason": why})
    referenced = {uid for obj in case.label_objects for uid in obj.referenced_series}
    eligible.sort(key=lambda s: s.series_uid not in referenced)  # stable: keeps the rule's order otherwise
    errors = []
    for s in eligible:
        try:
            series = read_series(s.files, config.ingest.slice_tolerance_mm, max_image_mb=limit)
            check_image(series.image, s.name())
        except Exception as err:  # any error of one series refuses that series; the next eligible one is tried
            log.debug("a series could not be read: %s", type(err).__name__)  # the message goes to the report, redacted
            reason = one_line_reason(err)
            errors.append(f"{s.name()}: {reason}")
            report.append({"patient_id": pid, "series": s.name(), "status": "refused", "reason": reason})
            continue
        if s.series_uid in referenced:
            why = "referenced by a label object (SEG/RTSTRUCT) of the study"
        else:
            why = "first by the series rule: most slices, then lowest series number"
        for other in eligible:
            if other is not s and not any(r["series"] == other.name() for r in report):
                reason = f"not chosen: {s.name()} was ({why})"
                report.append({"patient_id": pid, "series": other.name(), "status": "skipped", "reason": reason})
        report.append({"patient_id": pid, "series": s.name(), "status": "chosen", "reason": why})
        return series.image, {"source_format": "dicom", **series.facts}, series, s
    if errors:
        raise ImageReadError("; ".join(errors))
    raise ImageReadError("no eligible image series (see the series report for why each was skipped)")


def _volume_format(path: Path) -> str:
    name = path.name.lower()
    return "nifti" if name.endswith((".nii", ".nii.gz")) else name.rsplit(".", 1)[-1]


def load_case_label(
    case: Case,
    volume: SeriesVolume | None,
    chosen: Series | None,
    config: Config,
    report: list[dict[str, str]],
    failures: list[dict[str, str]],
    pid: str,
) -> tuple[Label | None, dict[str, Any]]:
    """The case's label on its image's own grid (not yet reoriented), or None if it has none.

    A SEG/RTSTRUCT that references the chosen series is read onto it; one that fails is refused (series report
    and failures report) and the next is tried, so one broken object does not cost the case its image. A label
    file (NIfTI/NRRD/MHA) is used when no label object applies.
    """
    for obj in sorted(case.label_objects, key=lambda o: (o.series_number, str(o.files[0]))):
        name = f"{obj.name()} in {obj.files[0].name}"
        if volume is None or chosen is None or chosen.series_uid not in obj.referenced_series:
            report.append(
                {"patient_id": pid, "series": name, "status": "skipped", "reason": "references a series not chosen"}
            )
            continue
        try:
            label, facts = read_label_object(
                obj.files[0],
                obj.modality,
                volume,
                config.ingest.label_tolerance_mm,
                config.ingest.label_overlap,
            )
        except Exception as err:  # any error of one label object refuses that object only
            log.debug("a label object could not be read: %s", type(err).__name__)
            reason = one_line_reason(err)
            report.append({"patient_id": pid, "series": name, "status": "refused", "reason": reason})
            failures.append({"patient_id": pid, "source": obj.files[0].name, "reason": reason})
            continue
        report.append({"patient_id": pid, "series": name, "status": "label", "reason": "labels the chosen series"})
        for other in case.label_objects:
            if other is not obj and not any(r["series"].endswith(f" in {other.files[0].name}") for r in report):
                other_name = f"{other.name()} in {other.files[0].name}"
                reason = f"not used: {name} already labels the chosen series"
                report.append({"patient_id": pid, "series": other_name, "status": "skipped", "reason": reason})
        return label, facts
    if case.nifti_label is not None:
        label_file = read_volume(case.nifti_label, Label, config.ingest.max_image_mb)
        return label_file, {"label_source": _volume_format(case.nifti_label)}
    return None, {}


def ingest_case(
    case: Case,
    pid: str,
    config: Config,
    out: Path,
    report: list[dict[str, str]],
    failures: list[dict[str, str]] | None = None,
    redact: Callable[[str], str] = str,
) -> dict[str, str]:
    """Read, check and write one case. Returns its manifest row (without the split).

    ``redact`` cleans free text that goes into the sidecar (a series description or segment name may hold a
    patient's name: some sites type it there)."""
    image, facts, volume, chosen = load_case_image(case, config, report, pid)
    facts["source_affine_ras"] = np.round(image.affine, 6).tolist()
    facts["source_shape"] = list(image.spatial_shape)
    failures = failures if failures is not None else []
    label, label_facts = load_case_label(case, volume, chosen, config, report, failures, pid)
    facts.update(label_facts)
    image = to_canonical(image)
    modality = str(facts.get("modality") or case.modality or config.ingest.nifti_modality or "")
    row = {"patient_id": pid, "image": str(out / "images" / f"{pid}.nii.gz"), "label": "", "modality": modality}
    if label is not None:
        label = to_canonical(label)
        source = case.nifti_label.name if case.nifti_label is not None else "label object"
        if not same_grid(image, label, config.ingest.label_tolerance_mm):
            raise GeometryError(
                f"label {source} is not on its image's grid (tolerance "
                f"{config.ingest.label_tolerance_mm} mm): image {describe_grid(image)}; label {describe_grid(label)}. "
                "Labels are never resampled: export the label on the image's grid"
            )
        top = int(label.array.max())
        if top > len(config.classes):
            raise ImageReadError(f"label {source} holds class {top} but the config lists {len(config.classes)} classes")
        label = Label(label.array, image.affine.copy())  # identical within tolerance; keep one affine
        row["label"] = str(out / "labels" / f"{pid}.nii.gz")
    facts["canonical_affine_ras"] = np.round(image.affine, 6).tolist()
    facts["canonical_shape"] = list(image.spatial_shape)
    write_volume(image, row["image"])
    if label is not None:
        write_volume(label, row["label"])
    write_json(out / "sidecars" / f"{pid}.json", {"patient_id": pid, **_redact_facts(facts, redact)})
    return row


def case_source(case: Case, root: Path) -> str:
    """The input a case was read from, relative to ``root``: its image file, or the folder holding its series
    (identifying: redact it before it is written)."""
    if case.nifti_image is not None:
        return str(case.nifti_image.relative_to(root))
    folders = [str(f.parent) for s in case.series for f in s.files]
    if not folders:
        return ""
    common = Path(os.path.commonpath(folders))
    return str(common.relative_to(root)) if common.is_relative_to(root) else ""


def _remove_case_outputs(output_dir: Path, pid: str) -> None:
    """Nothing of a refused case is left behind (an image written before its label was refused, say)."""
    for path in (
        output_dir / "images" / f"{pid}.nii.gz",
        output_dir / "labels" / f"{pid}.nii.gz",
        output_dir / "sidecars" / f"{pid}.json",
    ):
        path.unlink(missing_ok=True)


def _redact_facts(facts: dict[str, Any], redact: Callable[[str], str]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in facts.items():
        if isinstance(value, str) and key != "transfer_syntax":  # a transfer syntax UID is a standard, not a person
            value = redact(value)
        elif isinstance(value, dict):
            value = {k: redact(v) if isinstance(v, str) else v for k, v in value.items()}
        cleaned[key] = value
    return cleaned


def run(
    config: Config, input_dir: Path, output_dir: Path, manifest_path: Path, track: Track = _no_track
) -> IngestResult:
    """Ingest every case below ``input_dir``.

    Returns:
        The manifest rows, the failures (each with a reason) and the per-series report.

    Raises:
        ConfigError: ``input_dir`` is not a folder (as in ``medseg predict``).
    """
    if not input_dir.is_dir():
        # the path is not quoted: a folder named after the patient must not reach the log
        raise ConfigError("the input folder (--input) does not exist or is not a folder")
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
        n_failures = len(result.failures)
        # The boundary of one case: whatever goes wrong becomes its failure row, its outputs are removed, and the
        # batch goes on. The traceback goes to the debug log only.
        try:
            row = ingest_case(case, pid, config, output_dir, result.series_report, result.failures, redact)
        except Exception as err:
            debug_traceback(log, f"patient {pid}", redact)
            message = redact(one_line_reason(err, str(input_dir)))
            log.error("patient %s skipped: %s", pid, message)
            source = redact(case_source(case, input_dir))
            result.failures.append({"patient_id": pid, "source": source, "reason": message})
            _remove_case_outputs(output_dir, pid)
            continue
        row["subject_id"] = subject
        result.rows.append(row)
        refused = len(result.failures) - n_failures
        if refused:
            log.warning("patient %s: %d label object(s) refused, see failures.tsv", pid, refused)
        log.info("patient %s ingested%s", pid, " with a label" if row["label"] else "")
    root = str(input_dir).rstrip("/") + "/"  # reports name inputs relative to the input folder
    for entry in result.series_report:
        entry["reason"] = redact(entry["reason"].replace(root, ""))
        entry["series"] = redact(entry["series"])
    for entry in result.failures:
        entry["source"] = redact(entry["source"])
        entry["reason"] = redact(entry["reason"].replace(root, ""))
    assign_splits(result.rows, config.ingest.split)
    write_tsv(manifest_path, result.rows, MANIFEST_COLUMNS)
    write_tsv(output_dir / "failures.tsv", result.failures, ["patient_id", "source", "reason"])
    write_tsv(output_dir / "series.tsv", result.series_report, ["patient_id", "series", "status", "reason"])
    write_text(output_dir / "config.yaml", config.to_yaml())
    if config.ingest.id_map_file is not None:
        write_tsv(config.ingest.id_map_file, id_map, ["patient_id", "source_patient_id"])
    return result
