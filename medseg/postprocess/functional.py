"""Connected-component clean-up on label maps, sizes in mm3 (MONAI's RemoveSmallObjects does the work)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RemoveSmallObjects

from medseg.volume import Label


def remove_small_components(label: Label, min_mm3: float, num_classes: int) -> Label:
    """Set to background every connected component (26-connected) smaller than ``min_mm3``, class by class.

    The label map is one-hot encoded first: MONAI's transform on a raw label map would treat all voxels of one
    class as a single object.

    >>> lab = np.zeros((1, 8, 1, 1), np.uint8); lab[0, :5] = 1; lab[0, 7] = 1
    >>> remove_small_components(Label(lab, np.eye(4)), 2.0, 2).array[0, :, 0, 0].tolist()
    [1, 1, 1, 1, 1, 0, 0, 0]
    """
    if min_mm3 <= 0:
        return label
    onehot = torch.nn.functional.one_hot(torch.as_tensor(label.array[0]).long(), num_classes).movedim(-1, 0)
    remover = RemoveSmallObjects(min_size=min_mm3, connectivity=3, by_measure=True, pixdim=label.spacing)
    kept = remover(onehot[1:].bool()).cpu().numpy().astype(bool)
    out = np.zeros_like(label.array)
    for c in range(kept.shape[0]):
        out[0][kept[c]] = c + 1
    return Label(out, label.affine.copy())
