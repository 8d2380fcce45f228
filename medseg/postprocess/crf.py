"""CRF refinement of softmax probabilities with the image's intensities (``postprocess.crf``; off by default).

A fully connected CRF (Kraehenbuehl & Koltun 2011) with Potts compatibility, solved by mean-field iterations, with
the message passing restricted to a local window (Teichmann & Cipolla's ConvCRF, 2018). Each iteration, every voxel
collects its neighbours' label probabilities weighted by an appearance kernel (close in space *and* intensity) and
a smoothness kernel (close in space), and its label distribution moves towards what they agree on.

Why not MONAI's ``monai.networks.blocks.CRF``: it filters with a permutohedral lattice implemented in MONAI's C++
extension (``monai._C``), which the PyPI wheel does not ship (it needs MONAI built from source with
``BUILD_MONAI=1``); calling it raises ``OptionalImportError``. The local window is exact within its radius and
runs in plain torch on a CPU or a GPU; work is limited to the bounding box of the voxels where some foreground class
is possible, since a CRF cannot create a structure where the network saw none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from medseg.config import CrfConfig

FOREGROUND_FLOOR = 0.05  # voxels where every foreground class is below this are left as they are


def refine(
    probabilities: torch.Tensor, image: torch.Tensor, spacing_mm: Sequence[float], cfg: CrfConfig
) -> torch.Tensor:
    """Mean-field CRF refinement.

    Args:
        probabilities: softmax output ``(C, X, Y, Z)`` (background first).
        image: the normalised image ``(X, Y, Z)`` on the same grid (z-scored or CT-normalised, so intensity
            differences are in standard deviations).
        spacing_mm: the grid's voxel size, for the spatial kernels.
        cfg: the ``postprocess.crf`` section.

    Returns:
        Refined probabilities, same shape (a copy; the input is left alone).
    """
    out = probabilities.clone()
    foreground = probabilities[1:].amax(dim=0) >= FOREGROUND_FLOOR
    if not bool(foreground.any()):
        return out
    r = cfg.window_vox
    box = tuple(
        slice(max(int(idx.min()) - 2 * r, 0), min(int(idx.max()) + 2 * r + 1, size))
        for idx, size in zip(torch.nonzero(foreground, as_tuple=True), foreground.shape, strict=True)
    )
    q = probabilities[(slice(None), *box)].float()
    intensity = image[box].float()
    unary = torch.log(q.clamp_min(1e-6))
    offsets = [o for o in itertools.product(range(-r, r + 1), repeat=3) if any(o)]
    spacing = np.asarray(spacing_mm, dtype=float)
    padded_image = _pad(intensity[None], r)[0]
    weights = []
    for o in offsets:
        d2 = float(np.sum((np.asarray(o) * spacing) ** 2))
        diff = _shifted(padded_image, o, r, intensity.shape) - intensity
        appearance = float(np.exp(-d2 / (2 * cfg.spatial_sigma_mm**2))) * torch.exp(
            -(diff**2) / (2 * cfg.intensity_sigma**2)
        )
        smooth = float(np.exp(-d2 / (2 * cfg.smoothness_sigma_mm**2)))
        weights.append((1 - cfg.smoothness_share) * appearance + cfg.smoothness_share * smooth)
    # normalised so that a message is a weighted mean of the neighbours' probabilities (0..1) times cfg.weight: the
    # pairwise strength then does not grow with the window
    total = torch.stack(weights).sum(dim=0).clamp_min(1e-12)
    weights = [cfg.weight * w / total for w in weights]
    for _ in range(cfg.iterations):
        padded = _pad(q, r)
        message = torch.zeros_like(q)
        for o, w in zip(offsets, weights, strict=True):
            message += w * _shifted(padded, o, r, q.shape[1:])
        # Potts: a label's cost is the weight of the neighbours that disagree, i.e. total weight - message
        q = torch.softmax(unary + message, dim=0)
    out[(slice(None), *box)] = q.to(out.dtype)
    return out


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Replicate-pad the three spatial axes of ``(C, X, Y, Z)`` by ``r``."""
    return torch.nn.functional.pad(x[None], (r, r, r, r, r, r), mode="replicate")[0]


def _shifted(padded: torch.Tensor, offset: tuple[int, ...], r: int, shape: Sequence[int]) -> torch.Tensor:
    """The view of a padded ``(..., X+2r, Y+2r, Z+2r)`` tensor at ``offset``: element ``i`` is the input at
    ``i + offset`` (replicated beyond the edge)."""
    sx, sy, sz = (r + o for o in offset)
    return padded[..., sx : sx + shape[-3], sy : sy + shape[-2], sz : sz + shape[-1]]
