"""Write a volume as a CT DICOM series, one file per slice, the way a scanner exports it; a radiograph as a DX image.

Used for the demo cohort and by tests that need DICOM with known geometry or planted identity values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medseg.io import atomic_path


@dataclass(frozen=True)
class SeriesGeometry:
    """Slice geometry in DICOM's LPS frame.

    Attributes:
        origin: ImagePositionPatient of the first slice written (mm).
        row_dir: direction cosine along a row (first three of ImageOrientationPatient).
        col_dir: direction cosine down a column (last three).
        pixel_spacing: (between rows, between columns) in mm, as DICOM's PixelSpacing.
        slice_step: signed step along ``row_dir x col_dir`` between consecutive slices (mm).
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_step: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def lps_affine(self) -> np.ndarray:
        """Affine from (column i, row j, slice k) indices to LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.pixel_spacing[1]
        aff[:3, 1] = self.col_dir * self.pixel_spacing[0]
        aff[:3, 2] = self.normal * self.slice_step
        aff[:3, 3] = self.origin
        return aff

    def ras_affine(self) -> np.ndarray:
        """The same grid's affine in NIfTI's RAS frame."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.lps_affine()


@dataclass(frozen=True)
class Identity:
    """Patient and study values a real export carries. The demo fills them with made-up values."""

    patient_name: str
    patient_id: str
    birth_date: str = "19700101"
    accession_number: str = ""
    institution_name: str = ""
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)


def write_ct_series(
    hu: np.ndarray,
    geometry: SeriesGeometry,
    identity: Identity,
    folder: str | Path,
    *,
    series_description: str = "CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    file_suffix: str = ".dcm",
) -> list[Path]:
    """Write ``hu`` (X=columns, Y=rows, Z=slices, in Hounsfield units) as one DICOM file per slice.

    Returns:
        The written files, in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.rint((hu - rescale_intercept) / rescale_slope)
    stored = np.clip(stored, -32768, 32767).astype(np.int16)
    paths = []
    for k in range(hu.shape[2]):
        ds = _slice_dataset(identity, geometry, k, series_description, rescale_slope, rescale_intercept)
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # DICOM pixel rows run along col_dir
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        path = folder / f"IM{k + 1:04d}{file_suffix}"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _new_instance(sop_class_uid: str) -> Dataset:
    """An empty instance of ``sop_class_uid`` with a new SOPInstanceUID and its file meta (explicit little endian)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    return ds


def _slice_dataset(
    identity: Identity, geometry: SeriesGeometry, k: int, description: str, slope: float, intercept: float
) -> Dataset:
    ds = _new_instance(CTImageStorage)
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.AccessionNumber = identity.accession_number
    ds.InstitutionName = identity.institution_name
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.Manufacturer = "medseg-demo"
    ds.KVP = 120
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    position = geometry.origin + k * geometry.slice_step * geometry.normal
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*geometry.row_dir, *geometry.col_dir)]
    ds.PixelSpacing = [f"{v:.6f}" for v in geometry.pixel_spacing]
    ds.SliceThickness = f"{abs(geometry.slice_step):.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "HU"
    return ds


def write_dx_image(
    picture: np.ndarray, pixel_spacing_mm: float, identity: Identity, path: str | Path, *, bits: int = 12
) -> Path:
    """Write ``picture`` (``(rows, columns)``, grey values 0-255) as a Digital X-Ray image For Presentation, as a
    chest radiography system exports it: no ImagePositionPatient or frame of reference, PatientOrientation
    ``L\\F`` (a PA chest), ImagerPixelSpacing and PixelSpacing, values scaled to ``bits`` stored bits."""
    ds = _new_instance(DigitalXRayImageStorageForPresentation)
    ds.PatientName, ds.PatientID = identity.patient_name, identity.patient_id
    ds.PatientBirthDate, ds.PatientSex = identity.birth_date, "O"
    ds.AccessionNumber, ds.InstitutionName = identity.accession_number, identity.institution_name
    ds.StudyInstanceUID, ds.SeriesInstanceUID = identity.study_uid, identity.series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "20260101", "120000", "1", ""
    ds.ContentDate, ds.ContentTime = "20260101", "120000"
    ds.Modality, ds.PresentationIntentType = "DX", "FOR PRESENTATION"
    ds.Manufacturer, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "medseg-demo", "CHEST PA", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.BodyPartExamined, ds.ViewPosition, ds.ImageLaterality = "CHEST", "PA", "U"
    ds.AnatomicRegionSequence, ds.AcquisitionContextSequence, ds.PositionerType = [], [], "NONE"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [f"{pixel_spacing_mm:g}"] * 2
    ds.DetectorType = "DIRECT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape, ds.LossyImageCompression, ds.BurnedInAnnotation = "IDENTITY", "00", "NO"
    ds.WindowCenter, ds.WindowWidth = str(2 ** (bits - 1)), str(2**bits)
    stored = np.rint(np.asarray(picture, np.float64) * ((2**bits - 1) / 255.0)).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
