"""Walk an input folder as a PACS export or a research share lays it out, and group what it finds into cases.

A case is one study of one patient: the image series chosen for it (or a NIfTI image), and its label if any.
Supported layouts, mixed freely:

* DICOM files anywhere below the root, with or without ``.dcm``, grouped by StudyInstanceUID and
  SeriesInstanceUID (a DICOMDIR is ignored: the files themselves are the truth);
* one folder per patient holding ``image.nii.gz`` (any NIfTI name) and a label whose name contains ``label``,
  ``seg`` or ``mask``; a label beside a DICOM series in the same patient folder belongs to that series.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.config import SeriesRuleConfig

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
LABEL_NAME = re.compile(r"(label|seg|mask)", re.IGNORECASE)
IGNORED_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION"}
IGNORED_SUFFIXES = {".txt", ".md", ".json", ".csv", ".tsv", ".xml", ".html", ".pdf", ".png", ".jpg", ".zip"}
IDENTITY_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs")
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE", "REG", "DOC"}


@dataclass
class Series:
    """Headers-only summary of one DICOM series."""

    patient_key: str
    study_uid: str
    series_uid: str
    modality: str
    description: str
    series_number: int
    files: list[Path] = field(default_factory=list)
    frames: int = 0

    def name(self) -> str:
        """How the series is named in reports: number and description, never a UID."""
        return f"series {self.series_number} '{self.description}' ({self.modality}, {self.frames} slices)"


@dataclass
class Case:
    """One study of one patient, before reading any pixels."""

    patient_key: str  # the source patient id or folder name: identifying, never written out
    study_key: str
    series: list[Series] = field(default_factory=list)
    nifti_image: Path | None = None
    nifti_label: Path | None = None


@dataclass
class Discovery:
    cases: list[Case]
    failures: list[tuple[str, str]]  # (path relative to the root, reason)
    identity_values: set[str]


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def discover(root: Path) -> Discovery:
    """Group every readable file below ``root`` into cases.

    Unreadable DICOM-looking files become failures; files of other kinds (text, pictures) are ignored.
    """
    failures: list[tuple[str, str]] = []
    identity: set[str] = set()
    series: dict[tuple[str, str], Series] = {}
    volumes: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        top = rel.parts[0] if len(rel.parts) > 1 else None
        if _is_volume_file(path):
            key = top or re.sub(r"([_-]?(label|seg|mask).*)?\.(nii\.gz|nii|nrrd|mha|mhd)$", "", path.name, flags=re.I)
            identity.add(key)
            role = "label" if LABEL_NAME.search(path.name) else "image"
            if role in volumes[key]:
                failures.append((str(rel), f"a second {role} file for the same patient folder; only one is used"))
                continue
            volumes[key][role] = path
            continue
        if path.name.upper() in IGNORED_NAMES or path.suffix.lower() in IGNORED_SUFFIXES or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM at all: not ours to judge
        except Exception as err:
            failures.append((str(rel), f"unreadable DICOM file ({type(err).__name__}: {err})"))
            continue
        if "SOPClassUID" not in ds:
            failures.append((str(rel), "DICOM file without a SOP class (not an image or object)"))
            continue
        for tag in (*IDENTITY_TAGS, *UID_TAGS):
            value = ds.get(tag)
            if value not in (None, ""):
                identity.add(str(value))
        patient = str(ds.get("PatientID", "") or "").strip() or (top or "unknown")
        identity.add(patient)
        if top:
            identity.add(top)
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        if key not in series:
            series[key] = Series(
                patient_key=patient,
                study_uid=key[0],
                series_uid=key[1],
                modality=str(ds.get("Modality", "")),
                description=str(ds.get("SeriesDescription", "")),
                series_number=int(ds.get("SeriesNumber", 0) or 0),
            )
        series[key].files.append(path)
        series[key].frames += int(ds.get("NumberOfFrames", 1) or 1)
    cases: dict[tuple[str, str], Case] = {}
    for s in series.values():
        cases.setdefault((s.patient_key, s.study_uid), Case(s.patient_key, s.study_uid)).series.append(s)
    # A label beside a DICOM series in the same top-level folder belongs to that series' study.
    folder_cases: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for case_key, case in cases.items():
        for s in case.series:
            rel = s.files[0].relative_to(root)
            if len(rel.parts) > 1:
                folder_cases[rel.parts[0]].add(case_key)
    for key, files in volumes.items():
        if "image" in files:
            cases[(key, "")] = Case(key, "", nifti_image=files["image"], nifti_label=files.get("label"))
        elif len(folder_cases[key]) == 1:
            cases[next(iter(folder_cases[key]))].nifti_label = files["label"]
        else:
            why = "a label without an image" if not folder_cases[key] else "a label beside several studies"
            failures.append((str(files["label"].relative_to(root)), why))
    return Discovery(list(cases.values()), failures, identity)


def rank_series(case: Case, rule: SeriesRuleConfig) -> tuple[list[Series], list[tuple[Series, str]]]:
    """Order a case's image series by preference and give the reason each ineligible one is skipped.

    Eligible: an image modality listed in ``rule.modalities``, at least ``rule.min_slices`` slices, and a
    description that matches ``description_include`` and not ``description_exclude``. Preference: most slices,
    then lowest series number.
    """
    eligible, skipped = [], []
    for s in case.series:
        if s.modality in NON_IMAGE_MODALITIES:
            continue  # label objects and documents are handled elsewhere
        if s.modality not in rule.modalities:
            skipped.append((s, f"modality {s.modality} is not one of {rule.modalities}"))
        elif s.frames < rule.min_slices:
            skipped.append((s, f"{s.frames} slices, fewer than min_slices={rule.min_slices}"))
        elif rule.description_include and not re.search(rule.description_include, s.description, re.I):
            skipped.append((s, f"description does not match include pattern '{rule.description_include}'"))
        elif rule.description_exclude and re.search(rule.description_exclude, s.description, re.I):
            skipped.append((s, f"description matches exclude pattern '{rule.description_exclude}'"))
        else:
            eligible.append(s)
    eligible.sort(key=lambda s: (-s.frames, s.series_number))
    return eligible, skipped
