"""The separable image resampling gives MONAI ``Spacing``'s grid and values, in bounded slabs."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Spacing

from medseg.resample import functional
from medseg.resample.functional import _meta, resample_to_spacing
from medseg.volume import Image

AFFINES = {
    "axis-aligned": np.diag([0.8, 0.8, 1.0, 1.0]),
    "flipped x, shifted": np.array([[-0.7, 0, 0, 5.0], [0, 0.9, 0, -3.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("spacing", [(1.6, 1.6, 2.5), (0.5, 0.7, 1.0), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_image_resampling_matches_monai_spacing(name: str, spacing: tuple, dtype: type, monkeypatch) -> None:
    monkeypatch.setattr(functional, "SLAB_MB", 0.01)  # many slabs: their seams must not show
    rng = np.random.default_rng(0)
    image = Image((rng.normal(size=(1, 33, 47, 21)) * 300).astype(dtype), AFFINES[name])
    expected = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(_meta(image))
    result = resample_to_spacing(image, spacing)
    assert result.array.shape == tuple(expected.shape) and result.array.dtype == np.float32
    np.testing.assert_allclose(result.affine, np.asarray(expected.affine), atol=1e-9)
    np.testing.assert_allclose(result.array, expected.numpy(), atol=1e-3)  # values of a few hundred
    assert image.array.dtype == dtype  # the input is untouched
