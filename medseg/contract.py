"""A model's contract: what its training data were, and how far a new scan may stray from them.

Training writes the contract into the checkpoint (:mod:`medseg.models`); predict checks each series against it.
The format (every key optional; an empty contract, as old checkpoints have, means no checks)::

    {
        "modalities": ["MR"],                   # DICOM Modality of the training cases; "unknown" where not stated
        "classes": ["tumour", "oedema"],
        "spacing_mm": {"min": [x, y, z], "max": [x, y, z], "median": [x, y, z]},  # RAS canonical axis order
        "intensity": {"scheme": "ct" | "zscore", "image_p01": [lo, hi], "image_p99": [lo, hi]},
    }

``image_p01`` / ``image_p99``: the range, over the training cases, of each case's whole-image 1st / 99th
intensity percentile, in raw units (HU for CT).

A series whose modality the model was not trained on is *skipped* (unless the caller allows any modality); a
spacing or intensity far from the training data is *flagged*: predicted, with short texts saying what is odd.
Flags hold numbers and modality names only, never identity values. Pure functions: nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNKNOWN_MODALITY = "unknown"
SPACING_FACTOR = 2.0  # a spacing more than this factor outside the training range on an axis is flagged
PERCENTILE_SAMPLE = 1_000_000  # the intensity percentiles are estimated on at most this many voxels
AXES = ("x", "y", "z")


@dataclass(frozen=True)
class ContractCheck:
    """The verdict on one series.

    Attributes:
        skip_reason: why the series must not be predicted, or None.
        flags: short texts, each one thing that is unlike the training data (empty when nothing is).
    """

    skip_reason: str | None = None
    flags: list[str] = field(default_factory=list)


def known_modalities(contract: Mapping[str, Any]) -> list[str]:
    """The contract's stated modalities, without ``unknown``.

    >>> known_modalities({"modalities": ["CT", "unknown"]})
    ['CT']
    """
    return [str(m) for m in contract.get("modalities") or [] if str(m) and str(m) != UNKNOWN_MODALITY]


def check_modality(contract: Mapping[str, Any], modality: str | None, allow_any: bool = False) -> ContractCheck:
    """Is ``modality`` one the model was trained on?

    Args:
        contract: the model's contract (may be empty: then nothing is checked).
        modality: the series' DICOM Modality; None or "" for inputs that do not say (NIfTI).
        allow_any: predict a foreign modality anyway (``--allow-any-modality``); it is then flagged.

    Returns:
        A skip reason for a modality the model was not trained on; flags for a modality that cannot be checked
        or was allowed through.

    >>> check_modality({"modalities": ["CT"]}, "MR").skip_reason
    'modality MR: the model was trained on CT only (use --allow-any-modality to predict anyway)'
    >>> check_modality({"modalities": ["CT"]}, "MR", allow_any=True).flags
    ['modality MR, trained on CT only']
    """
    known = known_modalities(contract)
    if not known:
        return ContractCheck()
    trained = "/".join(sorted(set(known)))
    if not modality:
        return ContractCheck(flags=[f"modality not stated by the input, trained on {trained}"])
    if modality in known:
        return ContractCheck()
    if UNKNOWN_MODALITY in (contract.get("modalities") or []):
        # Some training inputs did not state theirs: this modality may have been among them.
        return ContractCheck(flags=[f"modality {modality}, trained on {trained} and inputs of unstated modality"])
    if allow_any:
        return ContractCheck(flags=[f"modality {modality}, trained on {trained} only"])
    return ContractCheck(
        skip_reason=(
            f"modality {modality}: the model was trained on {trained} only (use --allow-any-modality to predict anyway)"
        )
    )


def check_spacing(contract: Mapping[str, Any], spacing_mm: Sequence[float]) -> list[str]:
    """Flags for axes whose spacing is more than :data:`SPACING_FACTOR` times outside the training range.

    Args:
        contract: the model's contract.
        spacing_mm: the series' voxel spacing in RAS canonical axis order (as the contract's).

    >>> check_spacing({"spacing_mm": {"min": [1, 1, 1], "max": [1, 1, 3]}}, [1.0, 1.0, 15.0])
    ['spacing z 15 mm, trained on 1-3 mm']
    """
    ranges = contract.get("spacing_mm") or {}
    if "min" not in ranges or "max" not in ranges:
        return []
    low, high = np.asarray(ranges["min"], dtype=float), np.asarray(ranges["max"], dtype=float)
    spacing = np.asarray(spacing_mm, dtype=float)
    if low.shape != (3,) or high.shape != (3,) or spacing.shape != (3,):
        return []
    flags = []
    for axis in range(3):
        if spacing[axis] > high[axis] * SPACING_FACTOR or spacing[axis] * SPACING_FACTOR < low[axis]:
            flags.append(f"spacing {AXES[axis]} {spacing[axis]:.3g} mm, trained on {low[axis]:.3g}-{high[axis]:.3g} mm")
    return flags


def image_percentiles(image_array: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentile of a whole image (estimated on an even subsample of a large one).

    >>> image_percentiles(np.arange(101.0))
    (1.0, 99.0)
    """
    values = np.asarray(image_array).ravel()
    if values.size > PERCENTILE_SAMPLE:
        values = values[:: values.size // PERCENTILE_SAMPLE + 1]
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if not values.size:
        return float("nan"), float("nan")
    p01, p99 = np.percentile(values, [1.0, 99.0])
    return float(p01), float(p99)


def _outside(value: float, bounds: Sequence[float]) -> bool:
    lo, hi = float(bounds[0]), float(bounds[1])
    margin = (hi - lo) / 2.0
    return not lo - margin <= value <= hi + margin


def check_intensity(contract: Mapping[str, Any], image_array: np.ndarray) -> list[str]:
    """Flags for an intensity distribution far from the training data's.

    For scheme ``ct`` (absolute units): the scan's 1st or 99th percentile outside the training range of that
    percentile widened by half its width on each side. For ``zscore`` (MR and other relative units, which the
    model normalises per image) only what no normalisation rescues: an image without finite or varying values.

    Args:
        contract: the model's contract.
        image_array: the series' voxels in raw units (HU for CT), any shape.
    """
    intensity = contract.get("intensity") or {}
    scheme = intensity.get("scheme")
    if not scheme:
        return []
    array = np.asarray(image_array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return ["intensities not finite (NaN or infinite voxels)"]
    p01, p99 = image_percentiles(array)
    if not p99 > p01:
        return [f"intensities constant ({p01:.4g})"] if np.isfinite(p01) else ["no voxels"]
    if scheme != "ct":
        return []
    flags = []
    for name, value in (("p01", p01), ("p99", p99)):
        bounds = intensity.get(f"image_{name}")
        if bounds is not None and len(bounds) == 2 and _outside(value, bounds):
            flags.append(f"intensity {name} {value:.4g}, trained on {float(bounds[0]):.4g} to {float(bounds[1]):.4g}")
    return flags


def check(
    contract: Mapping[str, Any],
    modality: str | None,
    spacing_mm: Sequence[float],
    image_array: np.ndarray,
    allow_any_modality: bool = False,
) -> ContractCheck:
    """Check one series against a model's contract (see the module docstring).

    Args:
        contract: the model's contract; empty: no checks.
        modality: DICOM Modality of the series; None or "" when the input does not say (NIfTI).
        spacing_mm: voxel spacing in RAS canonical axis order.
        image_array: the voxels in raw units.
        allow_any_modality: predict a modality the model was not trained on (flagged instead of skipped).

    Returns:
        The skip reason (modality) and the flags (modality, spacing, intensity). A skipped series' image is not
        checked further.

    >>> contract = {"modalities": ["CT"], "spacing_mm": {"min": [1, 1, 1], "max": [1, 1, 1]}}
    >>> check(contract, "CT", [1.0, 1.0, 5.0], np.zeros((2, 2, 2))).flags
    ['spacing z 5 mm, trained on 1-1 mm']
    """
    if not contract:
        return ContractCheck()
    verdict = check_modality(contract, modality, allow_any_modality)
    if verdict.skip_reason is not None:
        return verdict
    flags = [*verdict.flags, *check_spacing(contract, spacing_mm), *check_intensity(contract, image_array)]
    return ContractCheck(None, flags)
