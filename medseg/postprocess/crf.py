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
MEMORY_MB = 512.0  # refine() works in slabs of about this much memory


def refine(
    probabilities: torch.Tensor,
    image: torch.Tensor,
    spacing_mm: Sequence[float],
    cfg: CrfConfig,
    *,
    memory_mb: float = MEMORY_MB,
    inplace: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Mean-field CRF refinement.

    Args:
        probabilities: softmax output ``(C, X, Y, Z)`` (background first).
        image: the normalised image ``(X, Y, Z)`` on the same grid (z-scored or CT-normalised, so intensity
            differences are in standard deviations).
        spacing_mm: the grid's voxel size, for the spatial kernels.
        cfg: the ``postprocess.crf`` section.
        memory_mb: the foreground's bounding box is refined in slabs whose maps take about this much (the
            process's peak grew by about twice that in ``benchmarks/crf.py``, whatever the box's size).
        inplace: write into ``probabilities`` instead of a copy (saves one copy of the map at inference).
        device: where the slabs are computed (default: the map's device). ``infer`` passes its device: on a GPU
            the map stays in host memory and only one slab at a time goes to the GPU.

    Returns:
        Refined probabilities, same shape: a copy (the input left alone), or ``probabilities`` itself if
        ``inplace``.

    The slabs give the result of one pass over the whole box: a voxel after ``iterations`` mean-field steps depends
    on the input within ``iterations * window_vox`` voxels, so each slab is computed with that many planes of
    context on either side (the box's own edges replicate as before) and only its core is kept. Bit for bit where
    the slabs' planes keep torch's vectorisation aligned (a plane of a multiple of 16 voxels); otherwise to float
    rounding (1e-7: a voxel in a vector's scalar tail rounds its exp differently).
    The working set is about 26 weight maps and a few probability maps over the box (for window 1), some 150-200
    bytes a voxel: 12.9 GB for a whole 512 x 512 x 300 box in one pass, 1.0 GB in the default slabs (at least one core
    plane and its context; ``benchmarks/crf.py``).
    """
    out = probabilities if inplace else probabilities.clone()
    foreground = (probabilities[1:] >= FOREGROUND_FLOOR).any(dim=0)
    if not bool(foreground.any()):
        return out
    r = cfg.window_vox
    box = []
    for axis, size in enumerate(foreground.shape):  # per-axis projections: nonzero() would list every voxel (int64)
        hit = torch.nonzero(foreground.any(dim=[a for a in range(3) if a != axis]))[:, 0]
        box.append(slice(max(int(hit[0]) - 2 * r, 0), min(int(hit[-1]) + 2 * r + 1, size)))
    del foreground
    offsets = [o for o in itertools.product(range(-r, r + 1), repeat=3) if any(o)]
    extent = [b.stop - b.start for b in box]
    axis = int(np.argmax(extent))  # slabs across the longest side: the least context recomputed
    plane = int(np.prod(extent)) // extent[axis]
    halo = r * cfg.iterations
    per_voxel = 4 * (len(offsets) + 6 * probabilities.shape[0] + 6)  # weights; q, unary, message, padded; image
    core = max(int(memory_mb * 2**20 / (per_voxel * plane)) - 2 * halo, 1)

    def along(lo: int, hi: int) -> tuple[slice, ...]:
        return (slice(None), *(slice(lo, hi) if a == axis else b for a, b in enumerate(box)))

    start, stop = box[axis].start, box[axis].stop
    context = None  # the original probabilities of the planes just below the next slab (written over by now)
    for a in range(start, stop, core):
        b, hi = min(a + core, stop), min(a + core + halo, stop)
        lo = a - (0 if context is None else context.shape[axis + 1])
        q = probabilities[along(a, hi)].to(device or probabilities.device, torch.float32)
        if context is not None:
            q = torch.cat([context, q], dim=axis + 1)
        refined = _mean_field(q, image[along(lo, hi)[1:]].to(q.device, torch.float32), offsets, spacing_mm, cfg)
        keep = min(halo, b - lo)
        context = q.narrow(axis + 1, b - keep - lo, keep).clone()
        out[along(a, b)] = refined.narrow(axis + 1, a - lo, b - a).to(out.device, out.dtype)
    return out


def _mean_field(
    q: torch.Tensor,
    intensity: torch.Tensor,
    offsets: list[tuple[int, ...]],
    spacing_mm: Sequence[float],
    cfg: CrfConfig,
) -> torch.Tensor:
    """The mean-field iterations on one block ``(C, X, Y, Z)``, its edges replicated."""
    r = cfg.window_vox
    unary = torch.log(q.clamp_min(1e-6))
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
    del padded_image
    # normalised so that a message is a weighted mean of the neighbours' probabilities (0..1) times cfg.weight: the
    # pairwise strength then does not grow with the window
    total = torch.zeros_like(intensity)
    for w in weights:  # summed in place: stacking them would hold a second copy of all the weights
        total += w
    total.clamp_min_(1e-12)
    for w in weights:
        w.mul_(cfg.weight).div_(total)
    del total
    for _ in range(cfg.iterations):
        padded = _pad(q, r)
        message = torch.zeros_like(q)
        for o, w in zip(offsets, weights, strict=True):
            message += w * _shifted(padded, o, r, q.shape[1:])
        del padded
        # Potts: a label's cost is the weight of the neighbours that disagree, i.e. total weight - message
        q = torch.softmax(unary + message, dim=0)
    return q


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Replicate-pad the three spatial axes of ``(C, X, Y, Z)`` by ``r``."""
    return torch.nn.functional.pad(x[None], (r, r, r, r, r, r), mode="replicate")[0]


def _shifted(padded: torch.Tensor, offset: tuple[int, ...], r: int, shape: Sequence[int]) -> torch.Tensor:
    """The view of a padded ``(..., X+2r, Y+2r, Z+2r)`` tensor at ``offset``: element ``i`` is the input at
    ``i + offset`` (replicated beyond the edge)."""
    sx, sy, sz = (r + o for o in offset)
    return padded[..., sx : sx + shape[-3], sy : sy + shape[-2], sz : sz + shape[-1]]
