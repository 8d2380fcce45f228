"""Training batches, drawn and augmented in DataLoader worker processes, reproducibly.

Batch ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: its cases and every augmentation's random draw
come from ``numpy.random.default_rng([seed, e, i])``. So the batches do not depend on how many workers draw them
or which finishes first, and a run resumed at an epoch boundary draws exactly what the uninterrupted run would have
drawn (``tests/train/test_data.py``).

The preprocessed volumes are padded to the patch once and moved into shared memory once (four torch tensors, one
per kind, with ``share_memory_``: forked or spawned workers read the same pages, no copy per worker). Each volume
keeps a seeded sample of at most 10,000 foreground and 10,000 background voxel positions (nnU-Net keeps such class
locations too), so that a crop does not scan the whole label for its centre at every draw.

Workers are torch's ``DataLoader`` with ``persistent_workers`` (they live for the whole run), ``batch_size=None``
(a dataset item is a whole batch, so one worker's batch needs no collation) and pinned memory on CUDA; MONAI's
``ThreadDataLoader`` was not used because its threads share the GIL with the training step, which is what the
in-process drawing this replaces suffered from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import SpatialPadd
from torch.utils.data import DataLoader, Dataset, Sampler

from medseg.config import Recipe
from medseg.train.transforms import KEYS, reseed, train_transforms

MAX_LOCATIONS = 10_000  # foreground and background voxel positions kept per volume for crop centres


def _locations(label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of (a sample of) the foreground and background voxels of ``label`` (1, X, Y, Z)."""
    flat = label.reshape(-1)
    out = []
    for positions in (np.flatnonzero(flat > 0), np.flatnonzero(flat == 0)):
        if positions.size > MAX_LOCATIONS:
            positions = np.sort(rng.choice(positions, MAX_LOCATIONS, replace=False))
        out.append(positions)
    return out[0], out[1]


class PatchBatches(Dataset):
    """Item ``(epoch, i)``: batch ``i`` of ``epoch``, ``{"image": (B, 1, *patch) float32, "label": (B, 1, *patch)}``.

    Args:
        items: ``{"image": (1, X, Y, Z) float, "label": (1, X, Y, Z) int}`` preprocessed volumes.
        cfg: the recipe (patch, batch, augmentation, samples per volume, foreground share, seed).
    """

    def __init__(self, items: list[dict[str, Any]], cfg: Recipe) -> None:
        self.cfg = cfg
        pad = SpatialPadd(KEYS, spatial_size=cfg.patch_size_vox, mode="edge")  # as train_transforms would pad
        rng = np.random.default_rng([cfg.seed, 2**31])
        parts: dict[str, list[np.ndarray]] = {"image": [], "label": [], "fg": [], "bg": []}
        self.index: list[dict[str, tuple[int, int, tuple[int, ...]]]] = []  # per volume: key -> (start, stop, shape)
        ends = dict.fromkeys(parts, 0)
        for item in items:
            padded = pad({"image": np.asarray(item["image"], np.float32), "label": np.asarray(item["label"])})
            label = np.asarray(padded["label"]).astype(np.int16)
            fg, bg = _locations(label, rng)
            arrays = {"image": np.asarray(padded["image"], np.float32), "label": label, "fg": fg, "bg": bg}
            entry = {}
            for key, array in arrays.items():
                parts[key].append(array.reshape(-1))
                entry[key] = (ends[key], ends[key] + array.size, array.shape)
                ends[key] += array.size
            self.index.append(entry)
        # one shared-memory block per kind (4 in all, not 4 per case: each block holds a file descriptor), read by
        # every worker without a copy
        self.blocks = {
            k: torch.from_numpy(np.concatenate(v) if v else np.zeros(0)).share_memory_() for k, v in parts.items()
        }
        self.transform = train_transforms(
            cfg.augment,
            cfg.patch_size_vox,
            cfg.spatial_dims,
            cfg.samples_per_volume,
            cfg.foreground_fraction,
            locations=True,
        )
        self.transform.set_random_state(seed=cfg.seed)  # every random transform gets its own state, re-seeded per batch

    def volume(self, i: int) -> dict[str, np.ndarray]:
        """Volume ``i`` as numpy views into the shared blocks (``image``, ``label``, ``fg``, ``bg``)."""
        out = {}
        for key, (start, stop, shape) in self.index[i].items():
            out[key] = self.blocks[key][start:stop].numpy().reshape(shape)
        return out

    def __len__(self) -> int:
        return 2**62  # indexed by (epoch, i), never by position

    def __getitem__(self, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = index
        rng = np.random.default_rng([self.cfg.seed, epoch, i])
        reseed(self.transform, int(rng.integers(2**31)))  # = MONAI's set_random_state(seed=...), 1.5 ms faster
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata bookkeeping costs a third of an affine's time
        try:
            patches: list[dict[str, Any]] = []
            while len(patches) < self.cfg.batch_size:
                out = self.transform(self.volume(int(rng.integers(len(self.index)))))
                patches.extend(out if isinstance(out, list) else [out])
        finally:
            set_track_meta(tracking)
        patches = patches[: self.cfg.batch_size]
        return {
            "image": torch.stack([torch.as_tensor(p["image"], dtype=torch.float32) for p in patches]),
            "label": torch.stack([torch.as_tensor(p["label"]) for p in patches]),
        }


class EpochIndices(Sampler):
    """Yields ``(epoch, 0) ... (epoch, iterations - 1)`` for the epoch set last (:meth:`set_epoch`); with ``world``
    training processes, rank ``r`` draws part ``i * world + r`` of global step ``i`` (no two ranks the same)."""

    def __init__(self, iterations: int, rank: int = 0, world: int = 1) -> None:
        self.iterations, self.epoch, self.rank, self.world = iterations, 1, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i * self.world + self.rank) for i in range(self.iterations)])

    def __len__(self) -> int:
        return self.iterations


class BatchLoader:
    """The batches of each epoch, drawn by ``workers`` processes (0: in this process).

    ``for batch in loader.epoch(e)`` yields the ``iterations_per_epoch`` batches of epoch ``e`` in order; stopping
    early (a time budget) is allowed. :meth:`close` stops the workers. With ``world`` DDP processes each rank draws
    ``batch_size // world`` patches per step (its share of the global batch, as nnU-Net splits it over GPUs).
    """

    def __init__(
        self,
        items: list[dict[str, Any]],
        cfg: Recipe,
        workers: int,
        pin_memory: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if world > 1:
            cfg = cfg.model_copy(update={"batch_size": max(1, cfg.batch_size // world)})
        self.dataset = PatchBatches(items, cfg)
        self.indices = EpochIndices(cfg.iterations_per_epoch, rank, world)
        self.workers = workers
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=self.indices,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global torch RNG alone (resume)
        )

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        self.indices.set_epoch(epoch)
        return iter(self.loader)

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
