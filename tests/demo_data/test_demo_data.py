from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK example uses)

from medseg.config import validate_config
from medseg.demo_data.run import run
from medseg.ingest.dicom import read_series
from medseg.io import read_volume, to_canonical
from medseg.volume import Label, same_grid

TINY = {"demo_data": {"n_patients": 5, "n_dicom": 3, "spacing_mm": [1.6, 1.6, 2.5], "shape_vox": [48, 48, 20]}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "raw"
    run(validate_config(TINY), out)
    return out


def test_layout_mixes_dicom_and_nifti(cohort: Path) -> None:
    folders = sorted(p.name for p in cohort.iterdir())
    assert len(folders) == 5
    assert sum((cohort / f / "dicom").is_dir() for f in folders) == 3
    assert sum((cohort / f / "image.nii.gz").exists() for f in folders) == 2
    assert all((cohort / f / "label.nii.gz").exists() for f in folders)


def test_deterministic_from_seed(cohort: Path, tmp_path: Path) -> None:
    again = tmp_path / "raw"
    run(validate_config(TINY), again)
    for name in ("DEMO0003/image.nii.gz", "DEMO0001/label.nii.gz"):
        assert np.array_equal(nib.load(cohort / name).get_fdata(), nib.load(again / name).get_fdata())
    a = pydicom.dcmread(cohort / "DEMO0000/dicom/IM0005.dcm").pixel_array
    b = pydicom.dcmread(again / "DEMO0000/dicom/IM0005.dcm").pixel_array
    assert np.array_equal(a, b)


def test_dicom_is_ct_in_hounsfield_units_with_consistent_geometry(cohort: Path) -> None:
    ds = pydicom.dcmread(cohort / "DEMO0000/dicom/IM0001.dcm")
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024
    files = sorted((cohort / "DEMO0000/dicom").iterdir())
    series = read_series(files)
    image, facts = series.image, series.facts
    assert facts["source_spacing_mm"] == pytest.approx([1.6, 1.6, 2.5])
    assert -1100 < image.array.min() < -900  # air
    assert 100 < image.array.max() < 400  # contrast-enhanced organs
    # SimpleITK reads the same series onto the same physical grid (it works in LPS, we in RAS).
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    ref = reader.Execute()
    assert np.allclose(np.diag([-1, -1, 1]) @ np.array(ref.GetOrigin()), image.affine[:3, 3], atol=1e-3)


@pytest.mark.parametrize("patient", ["DEMO0001", "DEMO0002"])
def test_oblique_and_flipped_series_match_their_labels(cohort: Path, patient: str) -> None:
    files = sorted((cohort / patient / "dicom").iterdir())
    image = read_series(files).image
    label = read_volume(cohort / patient / "label.nii.gz", Label)
    assert same_grid(to_canonical(image), to_canonical(label), 1e-3)
    iop = np.array(pydicom.dcmread(files[0]).ImageOrientationPatient, float)
    assert not np.allclose(iop, [1, 0, 0, 0, 1, 0])  # not the plain axial orientation
    # The organs sit where the CT says: label 2 is brighter than label 1, both brighter than tissue.
    hu = image.array[0]
    assert np.mean(hu[label.array[0] == 2]) > np.mean(hu[label.array[0] == 1]) > 80
