"""Hostile inputs for the reliability suite, each written inside the tests: one good tiny CT series, and one
builder per kind of bad input (corrupt, lying, degenerate or non-image files) that plants it beside the good one.

Every builder gets its own folder ``home`` (``<input>/hNN/<kind>/``) and the good series' files, and returns the
marker that the one failures-report row of its input must name: a path component of the row's ``source`` (the
``hNN`` top folder is redacted as a possible patient name; the kind's folder or file name is not).
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
import yaml
from fast_predict_config import fast_predict_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    RTPlanStorage,
    generate_uid,
)

from medseg import models
from medseg.config import Config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.networks import build_network

CLASSES = ["organ_a", "organ_b"]
SHAPE = (16, 16, 4)
# Identity values planted in every series: none may reach a report, a log line or a file name.
PATIENT_NAME = "Qzxvk^Wyrtle"
GEOMETRY = SeriesGeometry(np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), (1.5, 1.5), 2.5)
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])
MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level: no decoder medseg uses reads it


def config_data(key_file: Path) -> dict[str, Any]:
    """A config whose model is tiny and whose preprocessing is coarse (as the predict tests' ``tiny_config``)."""
    return fast_predict_config(CLASSES, key_file)


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(folder / "secret" / "key")))
    return path


def write_checkpoint(folder: Path) -> Path:
    """A randomly initialised tiny network in the checkpoint format `medseg train` writes (no contract)."""
    config = Config.model_validate(config_data(folder / "secret" / "key"))
    torch.manual_seed(0)
    model = build_network(config.train, config.num_classes)
    member = {"state_dict": model.state_dict(), "fold": None, "epoch": 0, "val_dice": 0.0}
    return models.save_checkpoint(folder / "model.pt", config, [member])


def _hu(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.normal(0.0, 20.0, SHAPE)
    hu[4:12, 4:12, 1:3] += 400.0
    return hu


def identity(n: int) -> Identity:
    return Identity(patient_name=PATIENT_NAME, patient_id=f"MRN-99{n:04d}")


def write_good_series(root: Path) -> list[Path]:
    """The one good series of every test: ``<root>/good/ct/IM000k.dcm``, 16 x 16 x 4."""
    return write_ct_series(_hu(0), GEOMETRY, identity(0), root / "good" / "ct")


def _series(home: Path, n_slices: int = 4, seed: int = 1) -> list[Path]:
    shape = (SHAPE[0], SHAPE[1], n_slices)
    hu = np.random.default_rng(seed).normal(0.0, 20.0, shape)
    return write_ct_series(hu, GEOMETRY, identity(seed), home)


def _edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the point is to write invalid values
        ds.save_as(path, enforce_file_format=True)


def _object(path: Path, sop_class: str, modality: str, series_of: Path | None) -> None:
    """A non-image object (no Rows); with ``series_of`` it shares that slice's patient, study and series UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesNumber = 1
    if series_of is not None:
        source = pydicom.dcmread(series_of, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(ds, keyword, source[keyword].value)
    else:
        ds.PatientName, ds.PatientID = PATIENT_NAME, "MRN-990099"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _nifti_with_sform(path: Path, sform: np.ndarray) -> Path:
    """A NIfTI whose stored sform is ``sform`` as given (nibabel's image constructor would normalise it)."""
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(sform, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), None, header=header), str(path))
    return path


# ---- the kinds ---------------------------------------------------------------------------------------------------


def sr_in_series(home: Path, good: list[Path]) -> str:
    """A structured report sharing the CT series' SeriesInstanceUID, sorting before its slices."""
    _object(good[0].parent / "00_report.dcm", BasicTextSRStorage, "SR", good[0])
    return "00_report.dcm"


def pr_in_series(home: Path, good: list[Path]) -> str:
    """A presentation state sharing the CT series' SeriesInstanceUID, sorting after its slices."""
    _object(good[0].parent / "zz_state.dcm", GrayscaleSoftcopyPresentationStateStorage, "PR", good[0])
    return "zz_state.dcm"


def rtplan_alone(home: Path, good: list[Path]) -> str:
    _object(home / "plan.dcm", RTPlanStorage, "RTPLAN", None)
    return "rtplan_alone"


def non_utf8_name(home: Path, good: list[Path]) -> str:
    """A file whose name is not UTF-8 (Latin-1 bytes from an old share) and whose content is not DICOM."""
    home.mkdir(parents=True)
    (home / os.fsdecode(b"scan_\xe9\xff.dcm")).write_bytes(np.random.default_rng(2).bytes(600))
    return "non_utf8_name"


def huge_rows(home: Path, good: list[Path]) -> str:
    """Slices whose Rows and Columns claim 65535 x 65535 over 16 x 16 pixels of data."""
    for path in _series(home, seed=3):
        _edit(path, lambda ds: setattr(ds, "Rows", 65535) or setattr(ds, "Columns", 65535))
    return "huge_rows"


def short_pixel_data(home: Path, good: list[Path]) -> str:
    """A slice holding 100 bytes of pixel data where 16 x 16 x 2 bytes are declared."""
    files = _series(home, seed=4)
    _edit(files[1], lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))
    return "short_pixel_data"


def missing_rows(home: Path, good: list[Path]) -> str:
    files = _series(home, seed=5)
    _edit(files[1], lambda ds: delattr(ds, "Rows"))
    return "missing_rows"


def zero_spacing(home: Path, good: list[Path]) -> str:
    for path in _series(home, seed=6):
        _edit(path, lambda ds: setattr(ds, "PixelSpacing", ["0", "0"]))
    return "zero_spacing"


def nan_position(home: Path, good: list[Path]) -> str:
    files = _series(home, seed=7)
    _edit(files[2], lambda ds: setattr(ds, "ImagePositionPatient", ["nan", "0", "5"]))
    return "nan_position"


def parallel_orientation(home: Path, good: list[Path]) -> str:
    """Row and column directions that are the same vector: no slice normal."""
    for path in _series(home, seed=8):
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]))
    return "parallel_orientation"


def colour_slices(home: Path, good: list[Path]) -> str:
    for path in _series(home, seed=9):
        _edit(path, lambda ds: setattr(ds, "SamplesPerPixel", 3))
    return "colour_slices"


def missing_slice(home: Path, good: list[Path]) -> str:
    files = _series(home, n_slices=5, seed=10)
    files[2].unlink()
    return "missing_slice"


def mixed_slice_sizes(home: Path, good: list[Path]) -> str:
    files = _series(home, seed=11)

    def smaller(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 12, 12
        ds.PixelData = np.zeros((12, 12), np.int16).tobytes()

    _edit(files[1], smaller)
    return "mixed_slice_sizes"


def unsupported_syntax(home: Path, good: list[Path]) -> str:
    """Slices that say MPEG2 (encapsulated), a transfer syntax no decoder medseg uses can read."""

    def mpeg2(ds: Dataset) -> None:
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = MPEG2

    for path in _series(home, seed=12):
        _edit(path, mpeg2)
    return "unsupported_syntax"


def empty_file(home: Path, good: list[Path]) -> str:
    home.mkdir(parents=True)
    (home / "IM0001.dcm").write_bytes(b"")
    return "empty_file"


def random_dcm(home: Path, good: list[Path]) -> str:
    home.mkdir(parents=True)
    (home / "IM0001.dcm").write_bytes(np.random.default_rng(13).bytes(2048))
    return "random_dcm"


def random_no_suffix(home: Path, good: list[Path]) -> str:
    home.mkdir(parents=True)
    (home / "IM0001").write_bytes(np.random.default_rng(14).bytes(2048))
    return "random_no_suffix"


def symlink_loop(home: Path, good: list[Path]) -> str:
    home.mkdir(parents=True)
    os.symlink("IM0001.dcm", home / "IM0001.dcm")  # a link to itself
    return "symlink_loop"


def two_channel_nifti(home: Path, good: list[Path]) -> str:
    _nifti(home / "image.nii.gz", np.random.default_rng(15).normal(size=(*SHAPE, 2)).astype(np.float32))
    return "two_channel_nifti"


def singular_affine_nifti(home: Path, good: list[Path]) -> str:
    singular = AFFINE.copy()
    singular[:3, 2] = [1.5, 1.5, 0.0]  # the third axis lies in the plane of the first two
    _nifti_with_sform(home / "image.nii.gz", singular)
    return "singular_affine_nifti"


def nan_affine_nifti(home: Path, good: list[Path]) -> str:
    broken = AFFINE.copy()
    broken[0, 3] = np.nan
    _nifti_with_sform(home / "image.nii.gz", broken)
    return "nan_affine_nifti"


def nan_voxels_nifti(home: Path, good: list[Path]) -> str:
    data = np.random.default_rng(16).normal(size=SHAPE).astype(np.float32)
    data[1, 2, 3] = data[4, 5, 1] = data[7, 7, 0] = np.nan
    _nifti(home / "image.nii.gz", data)
    return "nan_voxels_nifti"


def inf_voxels_nifti(home: Path, good: list[Path]) -> str:
    data = np.random.default_rng(17).normal(size=SHAPE).astype(np.float32)
    data[0, 0, 0] = np.inf
    _nifti(home / "image.nii.gz", data)
    return "inf_voxels_nifti"


def truncated_nii_gz(home: Path, good: list[Path]) -> str:
    path = _nifti(home / "image.nii.gz", np.random.default_rng(18).normal(size=SHAPE).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated_nii_gz"


def huge_header_nifti(home: Path, good: list[Path]) -> str:
    """A NIfTI header claiming 30000^3 int16 voxels (about 50 TB) over a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    header.set_sform(AFFINE, code=1)
    header.set_data_offset(352)
    home.mkdir(parents=True)
    with gzip.open(home / "image.nii.gz", "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (352 - 348 + 64))
    return "huge_header_nifti"


def label_out_of_classes(home: Path, good: list[Path]) -> str:
    """A label holding class 7 where the config lists 2 classes (ingest only: predict reads no labels)."""
    _nifti(home / "image.nii.gz", np.random.default_rng(19).normal(size=SHAPE).astype(np.float32))
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:6, 1:3] = 7
    _nifti(home / "label.nii.gz", label)
    return "label_out_of_classes"


def negative_spacing(home: Path, good: list[Path]) -> str:
    for path in _series(home, seed=20):
        _edit(path, lambda ds: setattr(ds, "PixelSpacing", ["-1.5", "1.5"]))
    return "negative_spacing"


def inf_position(home: Path, good: list[Path]) -> str:
    files = _series(home, seed=21)
    _edit(files[1], lambda ds: setattr(ds, "ImagePositionPatient", ["0", "inf", "2.5"]))
    return "inf_position"


def duplicate_slice(home: Path, good: list[Path]) -> str:
    """A slice exported twice under two instance UIDs: two images at one position."""
    files = _series(home, seed=22)
    copy = files[1].with_name("IM_copy.dcm")
    copy.write_bytes(files[1].read_bytes())
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    return "duplicate_slice"


def truncated_dicom(home: Path, good: list[Path]) -> str:
    """A slice cut off in the middle of its pixel data (an interrupted copy)."""
    files = _series(home, seed=23)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 200])
    return "truncated_dicom"


def text_as_nii_gz(home: Path, good: list[Path]) -> str:
    """A text file named like a NIfTI image."""
    home.mkdir(parents=True)
    (home / "image.nii.gz").write_text("not an image\n")
    return "text_as_nii_gz"


def label_wrong_grid(home: Path, good: list[Path]) -> str:
    """A mask one slice longer than its image (ingest only: predict reads no labels)."""
    _nifti(home / "image.nii.gz", np.random.default_rng(24).normal(size=SHAPE).astype(np.float32))
    _nifti(home / "label.nii.gz", np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.uint8))
    return "label_wrong_grid"


def label_fractional(home: Path, good: list[Path]) -> str:
    """A mask of probabilities, not class numbers (ingest only)."""
    _nifti(home / "image.nii.gz", np.random.default_rng(25).normal(size=SHAPE).astype(np.float32))
    _nifti(home / "label.nii.gz", np.full(SHAPE, 0.5, np.float32))
    return "label_fractional"


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable[[Path, list[Path]], str]
    predict: bool = True  # whether `medseg predict` must refuse it too (it reads no labels)


KINDS = [
    Kind("sr_in_series", sr_in_series),
    Kind("pr_in_series", pr_in_series),
    Kind("rtplan_alone", rtplan_alone),
    Kind("non_utf8_name", non_utf8_name),
    Kind("huge_rows", huge_rows),
    Kind("short_pixel_data", short_pixel_data),
    Kind("missing_rows", missing_rows),
    Kind("zero_spacing", zero_spacing),
    Kind("nan_position", nan_position),
    Kind("parallel_orientation", parallel_orientation),
    Kind("colour_slices", colour_slices),
    Kind("missing_slice", missing_slice),
    Kind("mixed_slice_sizes", mixed_slice_sizes),
    Kind("unsupported_syntax", unsupported_syntax),
    Kind("empty_file", empty_file),
    Kind("random_dcm", random_dcm),
    Kind("random_no_suffix", random_no_suffix),
    Kind("symlink_loop", symlink_loop),
    Kind("two_channel_nifti", two_channel_nifti),
    Kind("singular_affine_nifti", singular_affine_nifti),
    Kind("nan_affine_nifti", nan_affine_nifti),
    Kind("nan_voxels_nifti", nan_voxels_nifti),
    Kind("inf_voxels_nifti", inf_voxels_nifti),
    Kind("truncated_nii_gz", truncated_nii_gz),
    Kind("huge_header_nifti", huge_header_nifti),
    Kind("label_out_of_classes", label_out_of_classes, predict=False),
    Kind("negative_spacing", negative_spacing),
    Kind("inf_position", inf_position),
    Kind("duplicate_slice", duplicate_slice),
    Kind("truncated_dicom", truncated_dicom),
    Kind("text_as_nii_gz", text_as_nii_gz),
    Kind("label_wrong_grid", label_wrong_grid, predict=False),
    Kind("label_fractional", label_fractional, predict=False),
]
PREDICT_KINDS = [k for k in KINDS if k.predict]


def plant(root: Path, kinds: list[Kind]) -> tuple[list[Path], dict[str, str]]:
    """Write the good series and ``kinds`` below ``root``; returns the good files and each kind's marker."""
    good = write_good_series(root)
    markers = {}
    for kind in kinds:
        n = KINDS.index(kind) + 1
        markers[kind.name] = kind.build(root / f"h{n:02d}" / kind.name, good)
    return good, markers


def naming(rows: list[dict[str, str]], marker: str) -> list[dict[str, str]]:
    """The failure rows whose ``source`` names ``marker`` as one of its path components."""
    return [r for r in rows if marker in r["source"].split("/")]
