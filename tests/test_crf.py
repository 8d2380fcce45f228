"""The CRF refinement (postprocess.crf): what it keeps, what it changes, and that infer applies it."""

from __future__ import annotations

import numpy as np
import torch

from medseg.config import CrfConfig
from medseg.postprocess.crf import refine


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    """A bright cube in a dark image; the network's foreground probability is a blurred, shifted guess."""
    image = torch.zeros(24, 24, 12)
    image[8:16, 8:16, 3:9] = 3.0
    fg = torch.zeros(24, 24, 12)
    fg[9:17, 8:16, 3:9] = 0.8  # one voxel too far along x
    fg[8, 8:16, 3:9] = 0.4  # unsure on the true edge
    probs = torch.stack([1 - fg, fg])
    return probs, image


def test_crf_moves_an_uncertain_boundary_onto_the_image_edge() -> None:
    probs, image = _case()
    refined = refine(probs, image, (1.0, 1.0, 1.0), CrfConfig(enabled=True, weight=4.0, iterations=5))
    assert refined.shape == probs.shape
    assert torch.allclose(refined.sum(0), torch.ones(24, 24, 12), atol=1e-5)
    truth = image > 1
    before = (probs.argmax(0).bool() == truth).float().mean()
    after = (refined.argmax(0).bool() == truth).float().mean()
    assert after > before  # the row at x = 8 (bright, unsure) joins; the row at x = 16 (dark) leaves
    assert bool(refined.argmax(0)[8, 10, 5]) and not bool(refined.argmax(0)[16, 10, 5])


def test_crf_leaves_probabilities_without_foreground_and_its_input_alone() -> None:
    probs = torch.stack([torch.ones(8, 8, 8), torch.zeros(8, 8, 8)])
    copy = probs.clone()
    out = refine(probs, torch.randn(8, 8, 8), (1.0, 1.0, 2.0), CrfConfig(enabled=True))
    assert torch.equal(out, copy) and torch.equal(probs, copy)
    assert np.isfinite(out.numpy()).all()
