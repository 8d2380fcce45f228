"""Automatic post-processing: decide per class, from validation predictions and labels, whether keeping only the
largest connected component helps, and whether the CRF refinement of the probabilities helps (``decide_crf``, run
by the train stage, which holds the validation probabilities), and write the decisions down.

The rule is nnU-Net's: keep-largest is switched on for a class only when, on the validation cases, it raises
the mean foreground Dice AND no class's mean Dice drops. Each class is tried on top of the configured rules
(``postprocess`` section); the accepted classes are then applied together and checked once more, and a class
whose combination breaks the rule is dropped again (keep-largest of one class only touches that class's voxels,
so this is rare: it needs a hole of another class filled where the removed component was).

Dice per case and class uses the evaluate stage's convention: both empty NaN (left out of the mean), one empty 0.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medseg.config import CrfConfig
from medseg.metrics import overlap
from medseg.postprocess import crf
from medseg.postprocess.functional import ClassRule, apply_rules
from medseg.volume import Label

log = logging.getLogger(__name__)

RULE = (
    "keep the largest connected component of a class only if, on the validation cases, it raises the mean "
    "foreground Dice and lowers no class's mean Dice (nnU-Net's rule); Dice of a case where a class is empty in "
    "both prediction and label is left out"
)
TOLERANCE = 1e-9  # float noise in means is not a change
# The CRF moves every class's boundary by a voxel here and there, so on a handful of validation cases a class's mean
# Dice moves by 1e-4 either way as noise. nnU-Net's strict rule decides on every training case's cross-validation
# prediction; on medseg's 8 hippocampus validation cases it vetoed the CRF in 3 of 13 runs for class drops of
# 0.00006-0.00013, and in all 3 the CRF raised the 42 held-out cases' mean Dice by 0.0015-0.0018 (BENCHMARKS.md,
# session 17). A class must fall by more than this to veto it; the mean must still rise.
CRF_CLASS_TOLERANCE = 1e-3
CRF_RULE = (
    "refine the probabilities with the CRF only if, on the validation cases, it raises the mean foreground Dice and "
    f"lowers no class's mean Dice by more than {CRF_CLASS_TOLERANCE} (nnU-Net's rule for its post-processing, with "
    "a tolerance for the noise of a few cases)"
)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_foreground: int) -> np.ndarray:
    """Dice of classes 1..n_foreground of two label maps ``(X, Y, Z)``, each computed inside its bounding box."""
    pred_boxes = ndimage.find_objects(pred, max_label=n_foreground)
    ref_boxes = ndimage.find_objects(ref, max_label=n_foreground)
    out = np.full(n_foreground, np.nan)
    for c in range(1, n_foreground + 1):
        boxes = [b for b in (pred_boxes[c - 1], ref_boxes[c - 1]) if b is not None]
        if not boxes:
            continue
        box = tuple(slice(min(s.start for s in ax), max(s.stop for s in ax)) for ax in zip(*boxes, strict=True))
        out[c - 1] = overlap(pred[box] == c, ref[box] == c)[0]
    return out


def with_keep_largest(rules: Mapping[int, ClassRule], classes: Iterable[int]) -> dict[int, ClassRule]:
    """``rules`` with keep-largest (one component) switched on for ``classes``; an existing N >= 1 is kept."""
    chosen = set(classes)
    return {c: replace(r, keep_largest_n=r.keep_largest_n or 1) if c in chosen else r for c, r in rules.items()}


def candidate_dice(pred: Label, ref: Label, rules: Mapping[int, ClassRule]) -> np.ndarray:
    """Dice per class of one case under the configured rules (row 0) and with keep-largest added for class c
    (row c): shape ``(n + 1, n)``."""
    n = len(rules)
    rows = [dice_per_class(apply_rules(pred, rules).array[0], ref.array[0], n)]
    for c in range(1, n + 1):
        rows.append(dice_per_class(apply_rules(pred, with_keep_largest(rules, [c])).array[0], ref.array[0], n))
    return np.stack(rows)


def _means(dice: np.ndarray) -> np.ndarray:
    """Mean over cases (axis 0) ignoring NaN; NaN where a class has no defined case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for an all-NaN class
        return np.nanmean(dice, axis=0)


def _num(x: float) -> float | None:
    """A mean for JSON: None for NaN."""
    return None if np.isnan(x) else float(x)


def _accepts(before: np.ndarray, after: np.ndarray, class_tolerance: float = TOLERANCE) -> bool:
    """nnU-Net's rule on per-class means: mean foreground Dice up, no class down by more than ``class_tolerance``
    (NaN classes ignored)."""
    defined = ~np.isnan(before) & ~np.isnan(after)
    if not defined.any():
        return False
    improves = np.mean(after[defined]) > np.mean(before[defined]) + TOLERANCE
    return bool(improves and np.all(after[defined] >= before[defined] - class_tolerance))


def decide(candidates: Sequence[np.ndarray]) -> list[int]:
    """Classes (1-based) for which keep-largest passes the rule, from :func:`candidate_dice` of every case.

    >>> base_and_trials = np.array([[0.5, 0.8], [0.7, 0.8], [0.5, 0.7]])  # one case, two classes
    >>> decide([base_and_trials])
    [1]
    """
    stacked = np.stack(candidates)  # (cases, n + 1, n)
    before = _means(stacked[:, 0])
    return [c for c in range(1, stacked.shape[2] + 1) if _accepts(before, _means(stacked[:, c]))]


def decide_keep_largest(
    cases: Callable[[], Iterable[tuple[str, Label, Label]]],
    rules: Mapping[int, ClassRule],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Decide keep-largest per class on validation cases.

    Args:
        cases: called twice (decision, then check of the combination); yields ``(patient_id, prediction,
            label)`` one case at a time, so the validation set never has to fit in memory.
        rules: the configured per-class rules (from :func:`medseg.postprocess.functional.class_rules`).
        class_names: names of classes 1..N.

    Returns:
        The decision, JSON-able: per class whether keep-largest is applied and its mean Dice before and with it,
        the mean foreground Dice before and after the whole decision, the rule, and the case count.
    """
    ids, candidates = [], []
    for patient_id, pred, ref in cases():
        ids.append(patient_id)
        candidates.append(candidate_dice(pred, ref, rules))
    if not candidates:
        return {"rule": RULE, "n_cases": 0, "keep_largest": [], "classes": {}, "note": "no validation cases"}
    stacked = np.stack(candidates)
    before = _means(stacked[:, 0])
    chosen = decide(candidates)
    # Check the accepted classes together; drop the last one until the combination passes (rarely needed).
    while chosen:
        trial = with_keep_largest(rules, chosen)
        combined = _means(
            np.stack([dice_per_class(apply_rules(p, trial).array[0], r.array[0], len(rules)) for _, p, r in cases()])
        )
        if _accepts(before, combined):
            break
        log.info("keep-largest of classes %s together breaks the rule; dropping class %d", chosen, chosen[-1])
        chosen = chosen[:-1]
    after = combined if chosen else before

    return {
        "rule": RULE,
        "n_cases": len(ids),
        "keep_largest": [class_names[c - 1] for c in chosen],
        "classes": {
            name: {
                "keep_largest": c in chosen,
                "dice_before": _num(before[c - 1]),
                "dice_with_keep_largest": _num(_means(stacked[:, c])[c - 1]),
            }
            for c, name in enumerate(class_names, start=1)
        },
        "mean_dice_before": _num(np.nanmean(before)) if np.isfinite(before).any() else None,
        "mean_dice_after": _num(np.nanmean(after)) if np.isfinite(after).any() else None,
    }


def decide_crf(
    cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    spacing_mm: Sequence[float],
    cfg: CrfConfig,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Decide ``postprocess.crf: auto`` on validation cases: the CRF is switched on only where it passes
    nnU-Net's rule (mean foreground Dice up, no class's mean Dice down), a class's fall of up to
    ``CRF_CLASS_TOLERANCE`` forgiven as the noise of a few cases.

    Args:
        cases: ``(probabilities (C, X, Y, Z), normalised image (X, Y, Z), label (X, Y, Z))`` on the network's grid,
            one case at a time.
        spacing_mm: that grid's voxel size.
        cfg: the CRF's settings (``enabled`` is ignored: they are tried).
        class_names: names of classes 1..N.

    Returns:
        The decision, JSON-able: ``enabled``, the mean Dice per class without and with the CRF, the means over the
        classes, the rule, the case count and the settings tried.
    """
    n = len(class_names)
    trial = cfg.model_copy(update={"enabled": True})
    without, with_crf = [], []
    for probabilities, image, label in cases:
        refined = crf.refine(torch.as_tensor(probabilities), torch.as_tensor(image), spacing_mm, trial).numpy()
        without.append(dice_per_class(probabilities.argmax(0), label, n))
        with_crf.append(dice_per_class(refined.argmax(0), label, n))
    settings = trial.model_dump(mode="json", exclude={"enabled"})
    if not without:
        return {"rule": CRF_RULE, "n_cases": 0, "enabled": False, "settings": settings, "note": "no validation cases"}
    before, after = _means(np.stack(without)), _means(np.stack(with_crf))

    return {
        "rule": CRF_RULE,
        "n_cases": len(without),
        "enabled": _accepts(before, after, CRF_CLASS_TOLERANCE),
        "classes": {
            name: {"dice_before": _num(b), "dice_with_crf": _num(a)}
            for name, b, a in zip(class_names, before, after, strict=True)
        },
        "mean_dice_before": _num(np.nanmean(before)) if np.isfinite(before).any() else None,
        "mean_dice_with_crf": _num(np.nanmean(after)) if np.isfinite(after).any() else None,
        "settings": settings,
    }


def pool_crf_decisions(decisions: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> bool:
    """An ensemble's CRF from its folds' :func:`decide_crf` records: nnU-Net's rule on the class means pooled over
    every fold's validation cases (each fold's means weighted by its case count), as nnU-Net decides its
    post-processing on all folds' validation predictions together."""
    usable = [d for d in decisions if d.get("n_cases")]
    if not usable:
        return False

    def pooled(key: str) -> np.ndarray:
        means = np.array([[_nan(d["classes"][name][key]) for name in class_names] for d in usable])
        weights = np.array([d["n_cases"] for d in usable], dtype=float)[:, None] * ~np.isnan(means)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class without any defined case: NaN
            return np.nansum(means * weights, axis=0) / weights.sum(axis=0)

    return _accepts(pooled("dice_before"), pooled("dice_with_crf"), CRF_CLASS_TOLERANCE)


def _nan(x: float | None) -> float:
    return np.nan if x is None else float(x)
