"""Sliding-window prediction, shared by validation during training and by `medseg infer`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.config import InferConfig
from medseg.resample.functional import resample_to_grid
from medseg.volume import Image, Label


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: Image,
    patch_size: Sequence[int],
    config: InferConfig,
    device: torch.device,
) -> Image:
    """Softmax probabilities ``(C, X, Y, Z)`` on the image's own (resampled, normalised) grid.

    Gaussian blending with 50% overlap by default (nnU-Net's choice; MONAI's defaults are 25% and constant).
    """
    model.eval()
    x = torch.as_tensor(image.array[None], dtype=torch.float32, device=device)
    logits = sliding_window_inference(
        x,
        roi_size=tuple(patch_size),
        sw_batch_size=config.sw_batch_size,
        predictor=model,
        overlap=config.overlap,
        mode=config.blend_mode,
        padding_mode="replicate",
    )
    probabilities = torch.softmax(logits, dim=1)[0]
    return Image(probabilities.float().cpu().numpy(), image.affine.copy())


def to_original_grid(probabilities: Image, affine: np.ndarray, shape: Sequence[int]) -> Label:
    """Resample probabilities (linear) onto the original grid, then take the argmax: smoother than resampling
    the argmax with nearest neighbour, and it cannot invent a label."""
    back = resample_to_grid(probabilities, affine, shape)
    return Label(back.array.argmax(axis=0)[None].astype(np.uint8), np.asarray(affine, dtype=np.float64))
