"""`medseg demo-data`: write the demo cohort as a hospital would hand it over.

Layout written under the output folder, one folder per patient (named by a made-up patient ID, as many PACS
exports do, so that ingest has identity to pseudonymise)::

    DEMO0003/dicom/IM0001.dcm ...   a CT series (some patients; one oblique, one flipped, one without .dcm)
    DEMO0003/label.nii.gz           its mask on the same grid
    DEMO0011/image.nii.gz           a NIfTI image (other patients; some not in RAS order)
    DEMO0011/label.nii.gz

With ``demo_data.kind: xray``: synthetic chest radiographs as an nnU-Net 2D dataset (see
:mod:`medseg.demo_data.xray`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from medseg.config import Config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.demo_data.phantom import random_phantom, render
from medseg.demo_data.xray import write_dataset
from medseg.io import write_volume
from medseg.volume import Image, Label

log = logging.getLogger(__name__)


def patient_geometry(index: int, n_dicom: int, config: Config, rng: np.random.Generator) -> SeriesGeometry:
    """The grid of demo patient ``index``: axial for most, one oblique, one flipped, one NIfTI mirrored."""
    demo = config.demo_data
    row_dir, col_dir, step = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), demo.spacing_mm[2]
    if index == 1:  # oblique: rotated 20 degrees about the patient axis
        a = np.deg2rad(20.0)
        row_dir, col_dir = np.array([np.cos(a), np.sin(a), 0]), np.array([-np.sin(a), np.cos(a), 0])
    elif index == 2:  # flipped left-right, slices stored head to feet
        row_dir, step = np.array([-1.0, 0, 0]), -step
        col_dir = np.array([0, 1.0, 0])
    elif index == n_dicom + 1:  # a NIfTI stored mirrored front to back
        col_dir = np.array([0, -1.0, 0])
    geometry = SeriesGeometry(np.zeros(3), row_dir, col_dir, (demo.spacing_mm[0], demo.spacing_mm[1]), step)
    centre_offset = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-4, 4)])
    half = (np.array(demo.shape_vox) - 1) / 2.0
    origin = centre_offset - geometry.lps_affine()[:3, :3] @ half
    return SeriesGeometry(origin, row_dir, col_dir, geometry.pixel_spacing, step)


def run(config: Config, output_dir: Path) -> list[Path]:
    """Write the demo cohort into ``output_dir`` (replacing it). Returns the patient folders."""
    demo = config.demo_data
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if demo.kind == "xray":  # the 2D cohort: an nnU-Net 2D dataset of PNG radiographs
        write_dataset(config, staging)
        shutil.rmtree(output_dir, ignore_errors=True)
        staging.rename(output_dir)
        return [output_dir]
    folders = []
    n_dicom = min(demo.n_dicom, demo.n_patients)
    for index in range(demo.n_patients):
        rng = np.random.default_rng([demo.seed, index])
        phantom = random_phantom(rng)
        geometry = patient_geometry(index, n_dicom, config, rng)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in demo.shape_vox], indexing="ij"), axis=-1)
        lps = geometry.lps_affine()
        points = grid @ lps[:3, :3].T + lps[:3, 3]
        voxel_mm = (geometry.pixel_spacing[1], geometry.pixel_spacing[0], abs(geometry.slice_step))
        hu, label = render(phantom, points, voxel_mm, rng)
        patient_id = f"DEMO{index:04d}"
        folder = staging / patient_id
        if index < n_dicom:
            identity = Identity(
                patient_name=f"Mustermann{index:02d}^Erika",
                patient_id=patient_id,
                accession_number=f"ACC{index:06d}",
                institution_name="medseg demo hospital",
            )
            write_ct_series(
                hu,
                geometry,
                identity,
                folder / "dicom",
                series_description="demo abdomen",
                rescale_slope=0.5 if index == 3 else 1.0,
                file_suffix="" if index == 4 else ".dcm",
            )
        else:
            write_volume(Image(hu[None], geometry.ras_affine()), folder / "image.nii.gz")
        write_volume(Label(label[None], geometry.ras_affine()), folder / "label.nii.gz")
        folders.append(output_dir / patient_id)
        log.info("demo patient %d/%d written", index + 1, demo.n_patients)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    return folders
