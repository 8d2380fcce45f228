"""Click-guided refinement: the offline, practical form of promptable segmentation (DeepEdit's recipe).

A model trained with ``train.clicks.enabled`` sees, besides the image, one *guidance* channel per class (background
included) and the *prior*: the mask being corrected, one channel per foreground class. A click is a voxel and a
class ("this is anterior", or "this is background": a negative click); its channel gets a Gaussian blob there.
MONAI's ``AddGuidanceSignalDeepEditd`` draws the blobs (one channel per label, normalised to a peak of 1), so a
click is encoded exactly as DeepEdit encodes it, in training and in ``medseg refine`` alike.

Training (:class:`ClickSimulator`) mixes three kinds of patches, as DeepEdit mixes its automatic and interactive
modes: a share ``auto_prob`` with no clicks and no prior (the model stays an automatic segmenter: refine with zero
clicks, or ``medseg infer`` on it, is its automatic prediction); otherwise the prior is the model's own automatic
prediction of the patch (one extra forward pass without gradients; a fifth of them an empty prior: segmenting from
clicks alone) and 1 to ``max_clicks`` corrective clicks are simulated on its errors (:func:`simulate_clicks`).
MONAI's own click simulation (``AddRandomGuidanceDeepEditd``) is not used: it draws from Python's global ``random``
and logs every call, so it cannot be replayed from a seed as medseg's batches are (a resumed run draws what the
uninterrupted run would have drawn); medseg's draws come from a generator seeded by (seed, epoch, step).

The click-placing rule is the one interactive segmentation is evaluated with (RITM's, the NoC protocol): the
next click goes to the interior-most voxel (largest distance to the region's border) of the largest error region,
labelled with the true class there. ``benchmarks/click_refinement.py`` plays that user on the held-out cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd
from scipy import ndimage

from medseg.config import ClicksConfig, TrainConfig
from medseg.errors import ConfigError

PRIOR_FREE_SHARE = 0.2  # of the guided training patches: an empty prior, the object found from clicks alone


@dataclass(frozen=True)
class Click:
    """A click on voxel ``voxel`` of a grid, saying "class ``label`` is here" (0: background, a negative click)."""

    label: int
    voxel: tuple[int, int, int]


def extra_channels(train: TrainConfig, num_classes: int) -> int:
    """Input channels beyond the image: ``num_classes`` guidance + ``num_classes - 1`` prior channels, or 0."""
    return 2 * num_classes - 1 if train.clicks.enabled else 0


def input_channels(train: TrainConfig, num_classes: int) -> int:
    """The network's input channels: the image, plus the guidance and prior channels of a click-trained model."""
    return 1 + extra_channels(train, num_classes)


def guidance(
    shape: Sequence[int], clicks: Sequence[Click], num_classes: int, config: ClicksConfig, prior: np.ndarray | None
) -> np.ndarray:
    """The channels a click-trained network takes after the image: ``(2 * num_classes - 1, *shape)`` float32.

    Args:
        shape: the spatial shape ``(X, Y, Z)`` of the grid the clicks are on.
        clicks: on that grid (points outside it are clamped to its edge, as MONAI does).
        num_classes: classes, background included.
        config: ``train.clicks`` (the blob width).
        prior: ``(X, Y, Z)`` class indices of the mask being corrected, or None (no mask: zeros).
    """
    shape = tuple(int(s) for s in shape)
    points: dict[str, list[list[int]]] = {str(k): [] for k in range(num_classes)}
    for click in clicks:
        points[str(click.label)].append([int(v) for v in click.voxel])
    signal = AddGuidanceSignalDeepEditd("image", sigma=config.sigma_vox, number_intensity_ch=1)(  # type: ignore[arg-type]
        {"image": np.zeros((1, *shape), np.float32), "guidance": points}
    )["image"]
    out = np.zeros((2 * num_classes - 1, *shape), np.float32)
    out[:num_classes] = np.asarray(signal)[1:]
    if prior is not None:
        for k in range(1, num_classes):
            out[num_classes + k - 1] = prior == k
    return out


def _interior_point(region: np.ndarray, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """The voxel of ``region`` farthest from its border; with ``rng``, one drawn from its inner half (a user does
    not hit the exact centre)."""
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    # padded with background, except along a flat axis (a 2D image's Z): there every voxel would touch the padding
    pads = [(0, 0) if size == 1 else (1, 1) for size in region.shape]
    inner = np.pad(region[box], pads)
    distance = ndimage.distance_transform_cdt(inner, metric="chessboard")  # as MONAI DeepEdit; faster than EDT
    if rng is None:
        index = np.unravel_index(int(np.argmax(distance)), distance.shape)
    else:
        candidates = np.argwhere(distance >= 0.5 * distance.max())
        index = tuple(candidates[int(rng.integers(len(candidates)))])
    return tuple(  # type: ignore[return-value]
        int(i) - pad[0] + int(s.start) for i, pad, s in zip(index, pads, box, strict=True)
    )


def simulate_clicks(
    truth: np.ndarray, mask: np.ndarray, n: int, num_classes: int, rng: np.random.Generator | None = None
) -> list[Click]:
    """Up to ``n`` corrective clicks on ``mask`` against ``truth`` (both ``(X, Y, Z)`` class indices).

    Each click goes to the interior-most voxel of the largest error region (a connected region of one true class
    that the mask calls something else), labelled with that true class; the region then counts as corrected and
    the next click goes to the largest one left. Fewer than ``n`` when the mask becomes right. With ``rng``, the
    region is drawn among the errors with probability proportional to size and the point from its inner half
    (training); without, the rule is deterministic (evaluation).
    """
    current = np.array(mask, copy=True)
    clicks: list[Click] = []
    for _ in range(n):
        regions: list[tuple[int, int, np.ndarray, int]] = []  # (size, class, components, component number)
        for k in range(num_classes):
            missed = (truth == k) & (current != k)
            if not missed.any():
                continue
            components, _ = ndimage.label(missed)
            sizes = np.bincount(components.ravel())[1:]
            for j in np.argsort(sizes)[::-1][:3]:  # the three largest per class are candidates enough
                regions.append((int(sizes[j]), k, components, int(j) + 1))
        if not regions:
            break
        if rng is None:
            _, k, components, j = max(regions, key=lambda r: r[0])
        else:
            weights = np.array([r[0] for r in regions], float)
            _, k, components, j = regions[int(rng.choice(len(regions), p=weights / weights.sum()))]
        region = components == j
        clicks.append(Click(k, _interior_point(region, rng)))
        current[region] = k
    return clicks


class ClickSimulator:
    """Turns a training batch ``(B, 1, *patch)`` into the click-guided input ``(B, 2C, *patch)`` (see the module
    docstring). Its draws come from ``numpy.random.default_rng([seed, epoch, step, rank])``: replayable."""

    def __init__(self, config: ClicksConfig, num_classes: int, seed: int, rank: int = 0) -> None:
        self.config, self.num_classes, self.seed, self.rank = config, num_classes, seed, rank

    def __call__(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        label: torch.Tensor,
        epoch: int,
        step: int,
        autocast: Any = None,
    ) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch, step, self.rank, 7])
        batch, shape = image.shape[0], tuple(image.shape[2:])
        extra = np.zeros((batch, 2 * self.num_classes - 1, *shape), np.float32)
        guided = rng.random(batch) >= self.config.auto_prob
        if guided.any():
            blank = torch.zeros((batch, 2 * self.num_classes - 1, *shape), dtype=image.dtype, device=image.device)
            was_training = model.training
            model.eval()  # the prediction a user would be correcting (no deep-supervision heads)
            with torch.no_grad(), autocast or torch.autocast(image.device.type, enabled=False):
                logits = model(torch.cat([image, blank], dim=1))
            automatic = logits.float().cpu().numpy().argmax(axis=1)  # numpy's: torch's is ~10x slower on a CPU
            model.train(was_training)
            truth = label[:, 0].cpu().numpy()
            for b in np.flatnonzero(guided):
                prior = np.zeros_like(automatic[b]) if rng.random() < PRIOR_FREE_SHARE else automatic[b]
                n = int(rng.integers(1, self.config.max_clicks + 1))
                clicks = simulate_clicks(truth[b], prior, n, self.num_classes, rng)
                extra[b] = guidance(shape, clicks, self.num_classes, self.config, prior)
        return torch.cat([image, torch.as_tensor(extra).to(image.device, non_blocking=True)], dim=1)


def read_clicks(path: Path, classes: Sequence[str], affine: np.ndarray, shape: Sequence[int]) -> list[Click]:
    """The clicks of a ``clicks.json`` on the grid of the image they were placed on.

    The file: ``{"clicks": [{"class": "anterior", "voxel": [i, j, k]}, {"class": "background", "ras_mm": [x, y,
    z]}]}`` (or the bare list). ``class`` is a class name, ``background``, or a class index; a point is a voxel
    index of the image (as a viewer shows it) or a RAS position in mm (as 3D Slicer's markups give it).

    Raises:
        ConfigError: unreadable JSON, an unknown class, a point missing or outside the image; the message names
            the file and the click.
    """
    names = ["background", *classes]
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{Path(path).name}: not a readable clicks JSON ({type(err).__name__}: {err})") from err
    entries = data.get("clicks") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f'{Path(path).name}: expected {{"clicks": [...]}} or a list of clicks')
    clicks = []
    inverse = np.linalg.inv(np.asarray(affine, float))
    for i, entry in enumerate(entries):
        where = f"{Path(path).name}, click {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object with class and voxel (or ras_mm)")
        name = entry.get("class", entry.get("label"))
        if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(names):
            label = name
        elif isinstance(name, str) and name in names:
            label = names.index(name)
        else:
            raise ConfigError(f"{where}: class {name!r} is not one of {names} (or their index)")
        if "voxel" not in entry and "ras_mm" not in entry:
            raise ConfigError(f"{where}: needs voxel [i, j, k] or ras_mm [x, y, z]")
        try:
            point = np.asarray(entry["voxel"] if "voxel" in entry else entry["ras_mm"], dtype=float)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: a point needs three finite numbers ({err})") from err
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise ConfigError(f"{where}: a point needs three finite numbers")
        if "voxel" not in entry:
            point = (inverse @ np.append(point, 1.0))[:3]
        voxel = tuple(int(v) for v in np.rint(point))
        if any(v < 0 or v >= s for v, s in zip(voxel, shape, strict=True)):
            raise ConfigError(f"{where}: voxel {list(voxel)} is outside the image (shape {list(shape)})")
        clicks.append(Click(label, voxel))  # type: ignore[arg-type]
    return clicks


def to_grid(
    clicks: Sequence[Click], source_affine: np.ndarray, target_affine: np.ndarray, shape: Sequence[int]
) -> list[Click]:
    """The clicks moved from one grid (the original image's) onto another (the network's), nearest voxel."""
    mapping = np.linalg.inv(np.asarray(target_affine, float)) @ np.asarray(source_affine, float)
    moved = []
    for click in clicks:
        point = np.rint((mapping @ np.append(np.asarray(click.voxel, float), 1.0))[:3]).astype(int)
        point = np.clip(point, 0, np.asarray(shape) - 1)
        moved.append(Click(click.label, tuple(int(v) for v in point)))  # type: ignore[arg-type]
    return moved
