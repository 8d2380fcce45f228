"""Round trip of every hippocampus label: to a spacing and back onto its own grid; mean Dice to the original.

    .venv/bin/python benchmarks/resample_roundtrip.py

tests/resample/test_roundtrip.py checks every 8th label; this runs all 208 for the figures in BENCHMARKS.md.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from medseg.io import read_volume
from medseg.resample.functional import (
    label_to_grid_onehot,
    label_to_spacing_onehot,
    resample_to_grid,
    resample_to_spacing,
)
from medseg.volume import Label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    files = sorted((DATA / "hippocampus" / "labelsTr").glob("*.nii.gz"))
    labels = [read_volume(p, Label) for p in files]
    for method, spacing in itertools.product(("nearest", "onehot_linear"), ((0.7, 0.7, 0.7), (2.0, 2.0, 3.0))):
        per_case = []
        for label in labels:
            if method == "nearest":
                back = resample_to_grid(resample_to_spacing(label, spacing), label.affine, label.spatial_shape)
            else:
                there = label_to_spacing_onehot(label, spacing)
                back = label_to_grid_onehot(there, label.affine, label.spatial_shape)
            dice = []
            for c in (1, 2):
                a, b = label.array == c, back.array == c
                dice.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
            per_case.append(np.mean(dice))
        print(
            f"{len(labels)} labels, {spacing} mm and back ({method}): mean Dice {np.mean(per_case):.4f}, "
            f"min {np.min(per_case):.4f}"
        )


if __name__ == "__main__":
    main()
