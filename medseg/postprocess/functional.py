"""Connected-component clean-up of label maps, sizes in mm3, rules per class.

Every rule works class by class inside the class's bounding box (``scipy.ndimage.find_objects``, one pass for
all classes), so its cost follows the structure, not the scan; cropping is exact for all three rules because no
voxel of the class lies outside its box. Components are 26-connected (MONAI's ``connectivity=3``).

Order, as applied by :func:`apply_rules`: remove components below ``min_component_mm3`` (scipy; see
:func:`remove_small_components`), keep the ``keep_largest_n`` largest (MONAI ``KeepLargestConnectedComponent``), fill
holes (scipy; see :func:`fill_holes` for why not MONAI's ``FillHoles``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from medseg.config import PostprocessConfig
from medseg.errors import ConfigError
from medseg.volume import Label

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected components


@dataclass(frozen=True)
class ClassRule:
    """The clean-up of one class: 0 / False switch a step off."""

    min_component_mm3: float = 0.0
    keep_largest_n: int = 0
    fill_holes: bool = False


def class_rules(config: PostprocessConfig, classes: Sequence[str]) -> dict[int, ClassRule]:
    """Resolve the ``postprocess`` section into one rule per class index (1..N).

    Raises:
        ConfigError: ``per_class`` names a class that is not in ``classes``.
    """
    unknown = sorted(set(config.per_class) - set(classes))
    if unknown:
        raise ConfigError(f"postprocess.per_class names unknown class(es) {unknown}; the classes are {list(classes)}")
    rules = {}
    for index, name in enumerate(classes, start=1):
        override = config.per_class.get(name)
        values = {
            key: getattr(config, key) if override is None or getattr(override, key) is None else getattr(override, key)
            for key in ("min_component_mm3", "keep_largest_n", "fill_holes")
        }
        rules[index] = ClassRule(**values)
    return rules


def _per_class(label: Label, classes: Sequence[int], edit: Callable[[np.ndarray], np.ndarray]) -> Label:
    """Apply ``edit`` (boolean mask -> boolean mask, same shape) to each class inside its bounding box.

    Voxels the edit removes become background; voxels it adds take the class only where they were background.
    """
    out = label.array.copy()
    array = out[0]
    boxes = ndimage.find_objects(array, max_label=max(classes, default=0))
    for c in classes:
        box = boxes[c - 1] if c - 1 < len(boxes) else None
        if box is None:
            continue
        sub = array[box]  # a view: edits land in ``out``
        mask = sub == c
        # One voxel of background around the box: skimage leaves an array that is all one object untouched,
        # and hole filling needs an outside to start from.
        new = edit(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
        sub[mask & ~new] = 0
        sub[new & ~mask & (sub == 0)] = c
    return Label(out, label.affine.copy())


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    components, n = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def remove_small_components(label: Label, min_mm3: float | Mapping[int, float], num_classes: int) -> Label:
    """Set to background every component whose volume is below ``min_mm3`` (one value, or one per class index).

    Our own few lines (scipy's ``label`` and a size count) rather than MONAI's ``RemoveSmallObjects``: MONAI
    hands the size to scikit-image's deprecated ``min_size``, whose compatibility shim in scikit-image 0.26 also
    removes components exactly at the threshold, so the meaning would depend on the installed version.

    >>> lab = np.zeros((1, 8, 1, 1), np.uint8); lab[0, :5] = 1; lab[0, 7] = 1
    >>> remove_small_components(Label(lab, np.eye(4)), 2.0, 2).array[0, :, 0, 0].tolist()
    [1, 1, 1, 1, 1, 0, 0, 0]
    """
    sizes = min_mm3 if isinstance(min_mm3, Mapping) else dict.fromkeys(range(1, num_classes), min_mm3)
    voxel_mm3 = float(np.prod(label.spacing))
    result = label
    for c, size in sizes.items():
        if size > 0:
            result = _per_class(result, [c], lambda m, v=size / voxel_mm3: _drop_small(m, v - 1e-9))
    return result


def keep_largest_components(label: Label, n_by_class: Mapping[int, int]) -> Label:
    """Keep the ``n`` largest components of each class (``n`` 0: keep all).

    >>> lab = np.zeros((1, 9, 1, 1), np.uint8); lab[0, :3] = 1; lab[0, 4] = 1; lab[0, 6:8] = 1
    >>> keep_largest_components(Label(lab, np.eye(4)), {1: 2}).array[0, :, 0, 0].tolist()
    [1, 1, 1, 0, 0, 0, 1, 1, 0]
    """
    result = label
    for c, n in n_by_class.items():
        if n <= 0:
            continue
        keeper = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=3, num_components=n)
        result = _per_class(
            result, [c], lambda m, k=keeper: np.asarray(k(torch.as_tensor(m[None].astype(np.uint8)))[0]).astype(bool)
        )
    return result


def fill_holes(label: Label, classes: Sequence[int]) -> Label:
    """Fill background cavities enclosed by one class (6-connected background, as scipy defines a hole).

    Our own (scipy's ``binary_fill_holes`` in the class's box) rather than MONAI's ``FillHoles``: MONAI's fills
    every enclosed voxel, overwriting another class nested inside (a lesion inside an organ would vanish), and
    floods the whole scan by iterated dilation. Here only background voxels are filled.

    >>> lab = np.ones((1, 3, 3, 3), np.uint8); lab[0, 1, 1, 1] = 0
    >>> int(fill_holes(Label(lab, np.eye(4)), [1]).array.min())
    1
    """
    return _per_class(label, list(classes), ndimage.binary_fill_holes)


def apply_rules(label: Label, rules: Mapping[int, ClassRule]) -> Label:
    """Small components, then largest N, then holes, each with its per-class setting."""
    label = remove_small_components(label, {c: r.min_component_mm3 for c, r in rules.items()}, len(rules) + 1)
    label = keep_largest_components(label, {c: r.keep_largest_n for c, r in rules.items()})
    return fill_holes(label, [c for c, r in rules.items() if r.fill_holes])
