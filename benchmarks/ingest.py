"""DICOM series -> NIfTI throughput: medseg's reader against SimpleITK's ImageSeriesReader on the same files.

Two series: the TotalSegmentator CT (20 slices 512x512, JPEG 2000 lossless, from ../shared/data) and a synthetic
uncompressed CT (60 slices 512x512) written to a temporary folder. Each reader runs ``--repeats`` times,
interleaved with the other so that a busy machine slows both alike; the median time counts.

``read`` is files -> array in memory (medseg: checked geometry, rescaled float32; SimpleITK: its own pixel type);
``to nifti`` adds writing a .nii.gz with each tool's own writer.

    .venv/bin/python benchmarks/ingest.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.ingest.dicom import read_series
from medseg.io import write_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def medseg_read(files: list[Path], out: Path | None) -> None:
    series = read_series(files)
    if out is not None:
        write_volume(series.image, out)


def sitk_read(files: list[Path], out: Path | None) -> None:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    image = reader.Execute()
    if out is not None:
        sitk.WriteImage(image, str(out))


def timed(fn: Callable[[list[Path], Path | None], None], files: list[Path], out: Path | None) -> float:
    start = time.perf_counter()
    fn(files, out)
    return time.perf_counter() - start


def compare(name: str, files: list[Path], repeats: int, workdir: Path) -> None:
    for mode in ("read", "to nifti"):
        times: dict[str, list[float]] = {"medseg": [], "simpleitk": []}
        for i in range(repeats + 1):  # the first round warms caches and imports, and is not counted
            for tool, fn in (("medseg", medseg_read), ("simpleitk", sitk_read)):
                out = workdir / f"{tool}.nii.gz" if mode == "to nifti" else None
                elapsed = timed(fn, files, out)
                if i:
                    times[tool].append(elapsed)
        med = {tool: statistics.median(t) for tool, t in times.items()}
        print(
            f"{name:<34} {mode:<9} medseg {len(files) / med['medseg']:7.1f} slices/s  "
            f"SimpleITK {len(files) / med['simpleitk']:7.1f} slices/s  "
            f"time ratio medseg/SimpleITK {med['medseg'] / med['simpleitk']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ct = sorted((DATA / "dicom" / "ct_totalsegmentator" / "example_ct_dicom").iterdir())
        compare("TotalSegmentator CT (JPEG 2000)", ct, args.repeats, workdir)
        hu = np.random.default_rng(0).normal(0, 300, size=(512, 512, 60))
        geometry = SeriesGeometry(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (0.8, 0.8), 2.5)
        synthetic = write_ct_series(hu, geometry, Identity("Bench^Mark", "bench"), workdir / "series")
        compare("synthetic CT (uncompressed)", synthetic, args.repeats, workdir)


if __name__ == "__main__":
    main()
