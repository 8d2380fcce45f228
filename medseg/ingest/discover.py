"""Walk an input folder as a PACS export or a research share lays it out, and group what it finds into cases.

A case is one study of one patient: the image series chosen for it (or a NIfTI image), and its label if any.
Supported layouts, mixed freely:

* DICOM files anywhere below the root, with or without ``.dcm``, grouped by StudyInstanceUID and
  SeriesInstanceUID (a DICOMDIR is ignored: the files themselves are the truth);
* one folder per patient holding ``image.nii.gz`` (any NIfTI/NRRD/MHA name) and a label whose name contains
  ``label``, ``seg`` or ``mask``; a label beside a DICOM series in the same patient folder belongs to that series;
* DICOM-SEG and RTSTRUCT objects anywhere: each is attached to the case holding the series it references
  (ReferencedSeriesSequence / RTReferencedSeriesSequence), whatever folder it lies in;
* an MSD / nnU-Net dataset folder (``dataset.json`` beside ``imagesTr/``, ``labelsTr/``, optionally ``imagesTs/``,
  ``labelsTs/``): one case per image, named by its file (MSD ``case.nii.gz`` or nnU-Net ``case_0000.nii.gz``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medseg.config import SeriesRuleConfig
from medseg.errors import one_line_reason
from medseg.ingest.pseudonym import Redactor, debug_traceback

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
LABEL_NAME = re.compile(r"(label|seg|mask)", re.IGNORECASE)
IGNORED_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION", "LICENSE", "README", "COPYING", "NOTICE", "AUTHORS", "THUMBS.DB"}
IGNORED_SUFFIXES = {".txt", ".md", ".json", ".csv", ".tsv", ".xml", ".html", ".pdf", ".png", ".jpg", ".zip"}
# A file with one of these suffixes (or none, or a number as exports name files by UID) that is not DICOM is
# listed as a failure; a file with any other suffix that is not DICOM is someone else's file and is ignored.
DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".dic", ".dc3", ".ima"}
# SOP classes that are documents, presentation states or plans, whatever Modality says: set aside, never stacked.
NON_IMAGE_SOP_WORDS = (
    "SR Storage", "Presentation State", "Key Object", "RT Plan", "RT Dose", "RT Beams", "RT Treatment",
    "RT Ion", "Registration", "Encapsulated", "Raw Data", "Waveform", "Spectroscopy", "Surface", "Deformable",
    "Real World Value", "Hanging Protocol", "Color Palette", "Measurement Report",
)  # fmt: skip
IDENTITY_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs")
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
LABEL_MODALITIES = {"SEG", "RTSTRUCT"}
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
    image_type: tuple[str, ...] = ()
    # For SEG and RTSTRUCT objects: the series and instances (slices) they were drawn on.
    referenced_series: set[str] = field(default_factory=set)
    referenced_instances: set[str] = field(default_factory=set)

    @property
    def is_label_object(self) -> bool:
        return self.modality in LABEL_MODALITIES

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
    label_objects: list[Series] = field(default_factory=list)  # DICOM-SEG / RTSTRUCT referencing a series here
    modality: str = ""  # of a NIfTI case, when its dataset.json says it


@dataclass
class Discovery:
    cases: list[Case]
    failures: list[tuple[str, str]]  # (path relative to the root, reason)
    identity_values: set[str]


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _references(ds: pydicom.Dataset) -> tuple[set[str], set[str]]:
    """The series and instance UIDs a SEG or RTSTRUCT object says it was drawn on."""
    series_uids: set[str] = set()
    instances: set[str] = set()
    for ref in ds.get("ReferencedSeriesSequence", []):  # DICOM-SEG
        series_uids.add(str(ref.get("SeriesInstanceUID", "")))
        instances.update(str(i.get("ReferencedSOPInstanceUID", "")) for i in ref.get("ReferencedInstanceSequence", []))
    for frame_ref in ds.get("ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT
        for study in frame_ref.get("RTReferencedStudySequence", []):
            for ref in study.get("RTReferencedSeriesSequence", []):
                series_uids.add(str(ref.get("SeriesInstanceUID", "")))
                instances.update(
                    str(i.get("ReferencedSOPInstanceUID", "")) for i in ref.get("ContourImageSequence", [])
                )
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            instances.update(
                str(i.get("ReferencedSOPInstanceUID", "")) for i in contour.get("ContourImageSequence", [])
            )
    return series_uids - {""}, instances - {""}


CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _strip_volume_suffix(name: str) -> str:
    return re.sub(r"\.(nii\.gz|nii|nrrd|mha|mhd|png|jpe?g)$", "", name, flags=re.IGNORECASE)


PLANAR_SUFFIXES = (".png", ".jpg", ".jpeg")  # 2D pictures: only inside a dataset folder, where dataset.json says so


def _is_dataset_file(path: Path) -> bool:
    return _is_volume_file(path) or path.name.lower().endswith(PLANAR_SUFFIXES)


MR_NAMES = {"MR", "MRI", "T1", "T1W", "T2", "T2W", "FLAIR", "ADC", "DWI", "T1GD", "T1C", "PD"}


def dataset_modality(path: Path) -> str:
    """The modality an MSD ``dataset.json`` (``modality``) or nnU-Net v2 one (``channel_names``) gives channel 0:
    ``CT``, ``MR`` for MR names (MRI, T1, T2, FLAIR, ...), else the name upper-cased; ``""`` when it says none."""
    try:
        data = json.loads(path.read_text())
        names = data.get("channel_names") or data.get("modality") or {}
        name = str(names.get("0", "")).strip().upper() if isinstance(names, dict) else ""
    except (OSError, ValueError, AttributeError):
        return ""
    return "MR" if name in MR_NAMES else name


def _dataset_folder_cases(folder: Path, root: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases of an MSD / nnU-Net folder: ``imagesTr/`` paired with ``labelsTr/``, ``imagesTs/`` with ``labelsTs/``.

    MSD names image and label alike (``case.nii.gz``); nnU-Net v2 adds a channel suffix to the image
    (``case_0000.nii.gz``). Only single-channel cases are supported: a second channel is reported, not guessed.
    nnU-Net's 2D datasets (``"file_ending": ".png"``) hold PNG or JPEG pictures: read as ``X x Y x 1`` images.
    """
    cases: list[Case] = []
    failures: list[tuple[str, str]] = []
    modality = dataset_modality(folder / "dataset.json")
    for images_name, labels_name in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        images_dir, labels_dir = folder / images_name, folder / labels_name
        if not images_dir.is_dir():
            continue
        labels = {
            _strip_volume_suffix(p.name): p
            for p in (labels_dir.iterdir() if labels_dir.is_dir() else [])
            if _is_dataset_file(p) and not p.name.startswith(".")
        }
        by_case: dict[str, list[Path]] = defaultdict(list)
        for path in sorted(images_dir.iterdir()):
            if not _is_dataset_file(path) or path.name.startswith("."):
                continue
            stem = _strip_volume_suffix(path.name)
            match = CHANNEL_SUFFIX.match(stem)
            case_id = match["case"] if match and stem not in labels else stem
            by_case[case_id].append(path)
        for case_id, paths in by_case.items():
            if len(paths) > 1:
                failures.append((str(paths[0].relative_to(root)), f"{len(paths)} channels; one is supported"))
                continue
            label = labels.pop(case_id, None)
            cases.append(Case(case_id, "", nifti_image=paths[0], nifti_label=label, modality=modality))
        for path in labels.values():
            failures.append((str(path.relative_to(root)), f"a label in {labels_name}/ without an image"))
    return cases, failures


def _series_key(ds: pydicom.Dataset, path: Path) -> tuple[str, str]:
    """SeriesInstanceUID is unique on its own (some exports give each slice of a series another study UID);
    without one, the folder, study and series number stand in."""
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if series_uid:
        return ("uid", series_uid)
    return (str(path.parent), f"{ds.get('StudyInstanceUID', '')}#{ds.get('SeriesNumber', '')}")


@dataclass
class _Found:
    """What the walk of an input folder collects before cases are put together."""

    failures: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the root, reason)
    identity: set[str] = field(default_factory=set)
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    volumes: dict[str, dict[str, Path]] = field(default_factory=lambda: defaultdict(dict))
    cases: dict[tuple[str, str], Case] = field(default_factory=dict)


def discover(root: Path) -> Discovery:
    """Group every readable file below ``root`` into cases.

    Three steps: walk the folder (MSD / nnU-Net dataset folders, NIfTI-like volumes, DICOM headers); attach each
    SEG or RTSTRUCT object to the case of the series it references (one whose series is not in the input is a
    failure); pair loose volumes into cases (a mask beside a DICOM series belongs to that series' study).

    Each file is read inside its own boundary: any error becomes that file's failure (a one-line reason, paths
    relative to ``root``) and the walk goes on. Failures, not silence: an empty file, a file named like DICOM
    (``.dcm``, no suffix, a number) that is not DICOM, a link that leads nowhere, and a non-image object (SR,
    presentation state, key object, plan, dose, registration, ...: :func:`not_an_image`), which is set aside
    and never joins the image series whose UID it may share. Files of other kinds (text, pictures) are ignored.
    """
    found = _walk(root)
    _attach_label_objects(found, root)
    _pair_volumes(found, root)
    return Discovery(list(found.cases.values()), found.failures, found.identity)


def _walk(root: Path) -> _Found:
    found = _Found()
    # The input folder itself may be named after the patient (`--input /exports/Roe^Richard_MRN555`): its name and
    # path are identity values from the start, redacted from every reason and source that quotes them.
    found.identity.update({root.name, str(root), str(root.resolve())})
    files = _files(root, found)
    dataset_folders = sorted(
        p.parent
        for p in files
        if p.name == "dataset.json" and ((p.parent / "imagesTr").is_dir() or (p.parent / "imagesTs").is_dir())
    )
    for folder in dataset_folders:
        try:
            folder_cases, folder_failures = _dataset_folder_cases(folder, root)
        except Exception as err:  # one unreadable dataset folder must not stop the walk
            debug_traceback(log, "a dataset folder could not be listed", Redactor(found.identity))
            found.failures.append((str(folder.relative_to(root)), one_line_reason(err, str(root))))
            continue
        found.failures.extend(folder_failures)
        for case in folder_cases:
            found.identity.add(case.patient_key)
            found.cases[(str(folder.relative_to(root)), case.patient_key)] = case
    for path in files:
        if any(folder in path.parents for folder in dataset_folders):
            continue
        rel = path.relative_to(root)
        top = rel.parts[0] if len(rel.parts) > 1 else None
        if top:
            found.identity.add(top)  # a folder name may be the patient's: redacted, even where its files are refused
        ignored = (
            path.name.upper() in IGNORED_NAMES or path.suffix.lower() in IGNORED_SUFFIXES or path.name.startswith(".")
        )
        if ignored and not _is_volume_file(path):
            continue
        # The boundary of one file: whatever goes wrong with it becomes its failure row, and the walk goes on.
        try:
            if path.stat().st_size == 0:
                found.failures.append((str(rel), "empty file (0 bytes)"))
            elif _is_volume_file(path):
                _add_volume(found, path, rel, top)
            else:
                _add_dicom(found, path, rel, top)
        except Exception as err:
            debug_traceback(log, "a file could not be read", Redactor(found.identity))
            found.failures.append((str(rel), one_line_reason(err, str(root))))
    return found


def _files(root: Path, found: _Found) -> list[Path]:
    """Every regular file below ``root`` (symbolic links to files followed, to folders not), sorted.

    A link that leads nowhere (broken, or a loop) and a folder that cannot be listed are failures, not silence.
    """
    files = []

    def fail(path: Path, why: str, folder: bool = False) -> None:
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(".")
        if len(rel.parts) > (0 if folder else 1):
            found.identity.add(rel.parts[0])  # a top folder's name may be the patient's: redacted in the report
        found.failures.append((str(rel), why))

    def unlisted(err: OSError) -> None:
        why = f"folder cannot be listed ({err.strerror or 'error'})"
        fail(Path(err.filename) if err.filename else root, why, folder=True)

    for folder, dirs, names in os.walk(root, onerror=unlisted):
        dirs.sort()
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() and not path.exists():  # exists() follows the link: False for broken or looping
                fail(path, "a symbolic link that leads nowhere (broken or a loop)")
            elif path.is_file():
                files.append(path)
    return sorted(files)


def _add_volume(found: _Found, path: Path, rel: Path, top: str | None) -> None:
    key = top or re.sub(r"([_-]?(label|seg|mask).*)?\.(nii\.gz|nii|nrrd|mha|mhd)$", "", path.name, flags=re.I)
    found.identity.add(key)
    role = "label" if LABEL_NAME.search(path.name) else "image"
    if role in found.volumes[key]:
        found.failures.append((str(rel), f"a second {role} file for the same patient folder; only one is used"))
        return
    found.volumes[key][role] = path


def not_an_image(ds: pydicom.Dataset) -> str | None:
    """Why a DICOM object that is not a label object (SEG, RTSTRUCT) is no image slice, or None if it is one.

    Documents, presentation states, key object selections, plans, doses and registrations (by Modality or SOP
    class), and any object of a non-image SOP class without Rows. An object of an image SOP class without Rows is
    a broken slice, not a document: it stays in its series, which is then refused (never silently one slice short).
    """
    modality = str(ds.get("Modality", "") or "")
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    sop_name = sop_class.name if sop_class else "none"
    why = f"not an image (SOP class {sop_name}, modality {modality or 'none'}): set aside"
    if modality in NON_IMAGE_MODALITIES - LABEL_MODALITIES or any(w in sop_name for w in NON_IMAGE_SOP_WORDS):
        return why
    if "Rows" not in ds and "Image Storage" not in sop_name:
        return why
    return None


def _add_dicom(found: _Found, path: Path, rel: Path, top: str | None) -> None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        suffix = path.suffix.lower()
        if suffix in DICOM_SUFFIXES or suffix[1:].isdigit():
            found.failures.append((str(rel), "not DICOM (no DICOM header), though named like a DICOM file"))
        return  # any other name: someone else's file, not ours to judge
    except Exception as err:
        found.failures.append((str(rel), f"unreadable DICOM file ({type(err).__name__}: {err})"))
        return
    if "SOPClassUID" not in ds:
        found.failures.append((str(rel), "DICOM file without a SOP class (not an image or object)"))
        return
    for tag in (*IDENTITY_TAGS, *UID_TAGS):
        value = ds.get(tag)
        if value not in (None, ""):
            found.identity.add(str(value))
    patient = str(ds.get("PatientID", "") or "").strip() or (top or "unknown")
    found.identity.add(patient)
    # Each SEG/RTSTRUCT file is its own label object, even where several share a series.
    is_label = str(ds.get("Modality", "")) in LABEL_MODALITIES
    if not is_label:
        why = not_an_image(ds)
        if why is not None:  # an SR or presentation state may share the image series' UID: never one of its slices
            found.failures.append((str(rel), why))
            return
    # Everything that can fail on a hostile header is read before the series is touched.
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    references = _references(ds) if is_label else (set(), set())
    key = ("object", str(path)) if is_label else _series_key(ds, path)
    if key not in found.series:
        image_type = ds.get("ImageType") or ()
        found.series[key] = Series(
            patient_key=patient,
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")),
            description=str(ds.get("SeriesDescription", "")),
            series_number=int(ds.get("SeriesNumber", 0) or 0),
            image_type=tuple(str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)),
        )
    s = found.series[key]
    s.files.append(path)
    s.frames += frames
    if s.is_label_object:
        s.referenced_series |= references[0]
        s.referenced_instances |= references[1]


def _attach_label_objects(found: _Found, root: Path) -> None:
    label_objects = [s for s in found.series.values() if s.is_label_object]
    for s in found.series.values():
        if not s.is_label_object:
            found.cases.setdefault((s.patient_key, s.study_uid), Case(s.patient_key, s.study_uid)).series.append(s)
    # A SEG or RTSTRUCT belongs to the case holding the series it was drawn on, wherever it lies.
    owner = {s.series_uid: case for case in found.cases.values() for s in case.series if s.series_uid}
    for obj in label_objects:
        targets = {id(owner[uid]): owner[uid] for uid in obj.referenced_series if uid in owner}
        rel = str(obj.files[0].relative_to(root))
        if len(targets) == 1:
            next(iter(targets.values())).label_objects.append(obj)
        elif not obj.referenced_series:
            found.failures.append(
                (rel, f"{obj.modality} object names no referenced series: cannot tell which image it labels")
            )
        elif not targets:
            found.failures.append((rel, f"{obj.modality} object references a series that is not in the input folder"))
        else:
            found.failures.append((rel, f"{obj.modality} object references series of {len(targets)} different studies"))


def _pair_volumes(found: _Found, root: Path) -> None:
    # A label beside a DICOM series in the same top-level folder belongs to that series' study.
    folder_cases: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for case_key, case in found.cases.items():
        for s in case.series:
            rel_path = s.files[0].relative_to(root)
            if len(rel_path.parts) > 1:
                folder_cases[rel_path.parts[0]].add(case_key)
    for key, files in found.volumes.items():
        if "image" in files:
            found.cases[(key, "")] = Case(key, "", nifti_image=files["image"], nifti_label=files.get("label"))
        elif len(folder_cases[key]) == 1:
            found.cases[next(iter(folder_cases[key]))].nifti_label = files["label"]
        else:
            why = "a label without an image" if not folder_cases[key] else "a label beside several studies"
            found.failures.append((str(files["label"].relative_to(root)), why))


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
        elif rule.exclude_derived and "DERIVED" in s.image_type:
            skipped.append((s, "ImageType DERIVED: a crop, reformat or map, not an acquisition (exclude_derived)"))
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
