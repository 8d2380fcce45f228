"""Sliding-window prediction and the way back to the original grid, shared by validation during training, by
`medseg infer` and by `medseg predict`.

Arrays follow the package convention: channel-first ``(C, X, Y, Z)`` with a 4x4 RAS affine.

Cost and memory (why this is not MONAI's ``sliding_window_inference`` defaults plus one resample):

- Windows go through the network in batches sized to the device (:func:`auto_batch_size`): on this project's
  CPUs a batch of 8 windows costs several times less per window than MONAI's default of 1.
- A window whose input is one constant value (air or lung clipped by the CT window, padding) gives the same
  output wherever it is: the network is a deterministic function of the window's content in eval mode
  (instance norm and eval-mode batch norm work per sample). Such windows are computed once per value and the
  result reused: exact, and in a CT a large share of the field of view is air.
- The class probabilities are mapped back to the original grid in slabs along the last axis
  (:func:`to_original_grid_bounded`): each slab resamples only the part of the probability map it needs and
  keeps only its argmax, so the full-size grid never holds more than the uint8 label plus one slab of floats.
  Resampling every channel onto a 512 x 512 x 600 grid at once needs several GB (channels, sampling grid,
  an int64 argmax); the slabbed path's peak is set by ``infer.resample_memory_mb``. When the two grids share
  their directions (always after ``Spacing``), the trilinear interpolation is done as three 1-D passes, about
  3 x faster than a 3-D sampling grid, with the same values.
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.config import InferConfig
from medseg.resample.functional import resample_to_grid, separable_linear
from medseg.volume import Image, Label

log = logging.getLogger(__name__)

CPU_BATCH = 8  # measured on the project's 2-core CPUs: per-window cost falls about 4x from 1 to 8 windows
MAX_BATCH = 64


class WindowPredictor:
    """The callable MONAI's sliding window runs on each batch of windows ``(B, 1, *roi)`` -> ``(B, C, *roi)``.

    Adds mirroring test-time augmentation (logits averaged over every combination of flips of ``mirror_axes``,
    as nnU-Net does) and reuses the output of constant windows (see the module docstring).
    """

    def __init__(self, model: torch.nn.Module, mirror_axes: Sequence[int] = ()) -> None:
        self.model = model
        self.flips = [
            tuple(a + 2 for a in combo)
            for n in range(len(mirror_axes) + 1)
            for combo in itertools.combinations(mirror_axes, n)
        ]
        self._constant: dict[tuple[float, tuple[int, ...]], torch.Tensor] = {}
        self.windows = 0
        self.reused = 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.model(x)  # self.flips[0] is the identity
        for dims in self.flips[1:]:
            total = total + torch.flip(self.model(torch.flip(x, dims)), dims)
        return total / len(self.flips)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        constant = (flat.amax(dim=1) == flat.amin(dim=1)).tolist()
        self.windows += len(constant)
        varying = [i for i, c in enumerate(constant) if not c]
        outputs: dict[int, torch.Tensor] = {}
        if varying:
            computed = self._forward(x[varying])
            outputs.update(zip(varying, computed, strict=True))
        for i, c in enumerate(constant):
            if not c:
                continue
            key = (float(flat[i, 0]), tuple(x.shape[1:]))
            if key not in self._constant:
                self._constant[key] = self._forward(x[i : i + 1])[0]
            else:
                self.reused += 1
            outputs[i] = self._constant[key]
        return torch.stack([outputs[i] for i in range(x.shape[0])])


def auto_batch_size(
    model: torch.nn.Module, patch_size: Sequence[int], device: torch.device, in_channels: int = 1
) -> int:
    """Windows per forward pass for ``device``.

    CPU: :data:`CPU_BATCH`. CUDA: one window is run to measure its peak memory, and the batch fills half of
    the memory that is free, at most :data:`MAX_BATCH`; measured once per model, patch size and device.
    """
    if device.type != "cuda":
        return CPU_BATCH
    key = (tuple(int(p) for p in patch_size), in_channels, str(device))
    known = _BATCH_SIZES.setdefault(model, {})
    if key not in known:
        known[key] = _measure_batch_size(model, patch_size, device, in_channels)
    return known[key]


# the measured batch per model, patch and device: measured once, not once per scan
_BATCH_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _measure_batch_size(model: torch.nn.Module, patch_size: Sequence[int], device: torch.device, channels: int) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model(torch.zeros((1, channels, *patch_size), device=device))
    per_window = max(torch.cuda.max_memory_allocated(device) - before, 1)
    free, _ = torch.cuda.mem_get_info(device)
    batch = int(np.clip(0.5 * free // per_window, 1, MAX_BATCH))
    log.info(
        "windows per batch on %s: %d (%.0f MB per window, %.0f MB free)",
        device,
        batch,
        per_window / 2**20,
        free / 2**20,
    )
    return batch


def window_count(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window cuts from a ``shape`` grid (its interval rule)."""
    count = 1
    for size, patch in zip(shape, patch_size, strict=True):
        interval = max(int(patch * (1 - overlap)), 1)
        count *= 1 if size <= patch else math.ceil((size - patch) / interval) + 1
    return count


def mirroring(config: InferConfig, shape: Sequence[int], patch_size: Sequence[int], device: torch.device) -> bool:
    """Whether to mirror: ``config.mirror``, where ``auto`` means on a GPU always (nnU-Net's default) and on a
    CPU when the scan needs at most ``mirror_auto_max_windows`` windows (a hippocampus: 1 window, +0.5 points
    Dice for 8 x a fraction of a second; a CT: hundreds of windows, where 8 x would cost minutes)."""
    if config.mirror != "auto":
        return bool(config.mirror)
    if device.type == "cuda":
        return True
    return window_count(shape, patch_size, config.overlap) <= config.mirror_auto_max_windows


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: Image,
    patch_size: Sequence[int],
    config: InferConfig,
    device: torch.device,
) -> Image:
    """Softmax probabilities ``(C, X, Y, Z)`` on the image's own (resampled, normalised) grid.

    Gaussian blending with 50% overlap by default (nnU-Net's choice; MONAI's defaults are 25% and constant);
    mirroring as :func:`mirroring` decides. Windows run on ``device``; the stitched map stays on ``device`` too (it
    is on the coarse, resampled grid, so small) and comes back as float32 numpy.
    """
    model.eval()
    mirror = mirroring(config, image.spatial_shape, patch_size, device)
    predictor = WindowPredictor(model, config.mirror_axes if mirror else ())
    batch = config.sw_batch_size or auto_batch_size(model, patch_size, device, image.array.shape[0])
    x = torch.as_tensor(image.array[None], dtype=torch.float32)
    logits = sliding_window_inference(
        x,
        roi_size=tuple(patch_size),
        sw_batch_size=batch,
        predictor=predictor,
        overlap=config.overlap,
        mode=config.blend_mode,
        padding_mode="replicate",
        sw_device=device,
        device=device,
    )
    log.debug("%d windows, %d reused from a constant window", predictor.windows, predictor.reused)
    probabilities = torch.softmax(logits[0], dim=0)
    del logits
    return Image(probabilities.float().cpu().numpy(), image.affine.copy())


def to_original_grid(probabilities: Image, affine: np.ndarray, shape: Sequence[int]) -> Label:
    """Resample all probabilities (linear) onto the original grid at once, then take the argmax.

    The straightforward path: simple, but it holds every channel on the full grid (plus the sampling grid).
    Prefer :func:`to_original_grid_bounded`, which gives the same labels in bounded memory.
    """
    back = resample_to_grid(probabilities, affine, shape)
    return Label(back.array.argmax(axis=0)[None].astype(np.uint8), np.asarray(affine, dtype=np.float64))


def _source_box(
    src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> tuple[slice, ...]:
    """Voxels of the source grid that linear interpolation onto the destination grid can touch."""
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in dst_shape])), dtype=float)
    mapped = (np.linalg.inv(src_affine) @ dst_affine @ np.c_[corners, np.ones(len(corners))].T)[:3].T
    lo = np.floor(mapped.min(axis=0)).astype(int) - 1
    hi = np.ceil(mapped.max(axis=0)).astype(int) + 2
    return tuple(
        slice(int(np.clip(a, 0, s - 1)), int(np.clip(b, 1, s))) for a, b, s in zip(lo, hi, src_shape, strict=True)
    )


def _foreground_box(
    probabilities: np.ndarray, mapping: np.ndarray, shape: Sequence[int]
) -> list[tuple[int, int]] | None:
    """The original-grid box outside which the resampled argmax is background, or None when it is so everywhere.

    Exact, not a heuristic: a linearly interpolated voxel mixes its 8 neighbours on the network's grid with
    weights >= 0 that sum to 1. Where all of them have background as their argmax (``p_0 >= p_c`` for every
    class c), so does every mix of them, and a tie still goes to the lowest class, background. So only the
    original voxels whose neighbours reach the bounding box of non-background network voxels need resampling;
    on a CT that is the organs' region, a small part of the field of view.
    """
    foreground = np.argwhere(probabilities.argmax(axis=0) != 0)
    if foreground.size == 0:
        return None
    box = []
    for axis in range(3):
        size = probabilities.shape[axis + 1]
        u = np.clip(mapping[axis, axis] * np.arange(shape[axis]) + mapping[axis, 3], 0, size - 1)
        # a neighbour pair (floor(u), floor(u) + 1) with weight on a voxel in [fg_min, fg_max]
        need = np.flatnonzero((u > foreground[:, axis].min() - 1) & (u < foreground[:, axis].max() + 1))
        if need.size == 0:
            return None
        box.append((int(need[0]), int(need[-1]) + 1))
    return box


def _argmax_channels(values: torch.Tensor) -> np.ndarray:
    """Argmax over the first axis, as uint8. NumPy's: torch's ``argmax(dim=0)`` reduces across the strided
    channel axis about 10 x slower on CPU (measured)."""
    return values.numpy().argmax(axis=0).astype(np.uint8)


def to_original_grid_bounded(
    probabilities: Image, affine: np.ndarray, shape: Sequence[int], memory_mb: float = 128.0
) -> Label:
    """Resample probabilities onto the original grid slab by slab, keeping only each slab's argmax.

    Args:
        probabilities: ``(C, x, y, z)`` class probabilities on the network's grid.
        affine: the original grid's 4x4 RAS affine.
        shape: the original grid's spatial shape ``(X, Y, Z)``.
        memory_mb: working memory per slab (C float32 channels, the sampling grid and MONAI's temporaries;
            about ``4 * (C + 10)`` bytes per output voxel).

    Returns:
        The uint8 label ``(1, X, Y, Z)`` on the original grid; the same labels as :func:`to_original_grid`.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    # Measured with MONAI's SpatialResample: about 4 * (C + 10) bytes per output voxel (channels, homogeneous
    # sampling grid and its transformed copy, the argmax); the separable path needs less, the same bound serves.
    voxel_bytes = 4 * (probabilities.array.shape[0] + 10)
    out = np.zeros((1, *shape), dtype=np.uint8)
    mapping = np.linalg.inv(probabilities.affine) @ affine  # original voxel index -> network-grid index
    if np.allclose(mapping[:3, :3], np.diag(np.diag(mapping[:3, :3])), atol=1e-6):
        # The usual case (the network grid came from ``Spacing``, same directions): separable interpolation.
        box = _foreground_box(probabilities.array, mapping, shape)
        if box is None:  # background everywhere on the network's grid, so everywhere on the original grid
            return Label(out, affine)
        (x0, x1), (y0, y1), (zb0, zb1) = box
        slab = int(max(1, min(zb1 - zb0, memory_mb * 2**20 // (voxel_bytes * (x1 - x0) * (y1 - y0)))))
        source = torch.as_tensor(probabilities.array)
        for z0 in range(zb0, zb1, slab):
            z1 = min(zb1, z0 + slab)
            values = separable_linear(source, mapping, shape, z0, z1, ((x0, x1), (y0, y1)))
            out[0, x0:x1, y0:y1, z0:z1] = _argmax_channels(values)
        return Label(out, affine)
    slab = int(max(1, min(shape[2], memory_mb * 2**20 // (voxel_bytes * shape[0] * shape[1]))))
    for z0 in range(0, shape[2], slab):
        z1 = min(shape[2], z0 + slab)
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, z0]) + affine[:3, 3]
        slab_shape = (shape[0], shape[1], z1 - z0)
        box = _source_box(probabilities.affine, probabilities.spatial_shape, slab_affine, slab_shape)
        src_affine = probabilities.affine.copy()
        src_affine[:3, 3] = probabilities.affine[:3, :3] @ np.array([b.start for b in box], float) + src_affine[:3, 3]
        # A copy of just the box: MONAI converts its input anyway, and the box is small.
        part = Image(np.ascontiguousarray(probabilities.array[(slice(None), *box)]), src_affine)
        back = resample_to_grid(part, slab_affine, slab_shape)
        out[0, :, :, z0:z1] = back.array.argmax(axis=0)
    return Label(out, affine)
