"""`medseg infer`: one patient's canonical image in, its predicted label on the same (original) grid out.

Preprocessing and the network are rebuilt from the checkpoint's own config, so a model is always fed the way it
was trained, whatever the current config says; only the ``infer`` section (overlap, blending, device) is live.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medseg.config import Config, validate_config
from medseg.device import select_device
from medseg.errors import ConfigError, ImageReadError
from medseg.infer.functional import predict_probabilities, to_original_grid_bounded
from medseg.io import read_volume, write_volume
from medseg.resample.functional import preprocess
from medseg.train.networks import build_network
from medseg.volume import Image, Label

log = logging.getLogger(__name__)


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """Rebuild the trained network and the config it was trained with."""
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
    except (OSError, RuntimeError) as err:
        raise ImageReadError(f"cannot load checkpoint {checkpoint}: {err}") from err
    trained = validate_config(state["config"], source=f"{checkpoint} (embedded config)")
    model = build_network(trained.train, trained.num_classes).to(device)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, trained


def predict(model: torch.nn.Module, trained: Config, image: Image, config: Config, device: torch.device) -> Label:
    """Predict a canonical image; the label comes back on the image's own grid.

    Args:
        model: the network from :func:`load_model`, on ``device``.
        trained: the config it was trained with (preprocessing, patch size).
        image: the scan ``(1, X, Y, Z)`` on its original grid.
        config: the live config; only its ``infer`` section is used.
        device: where the windows run.

    Returns:
        The uint8 label ``(1, X, Y, Z)`` with the image's affine. Memory beyond the input stays bounded: the
        network works on the resampled grid and the way back goes slab by slab.
    """
    patch = trained.train.patch_size_vox
    if patch is None:
        raise ConfigError("the checkpoint's config has no train.patch_size_vox: it was not written by `medseg train`")
    prepared = preprocess(image, trained.resample)
    probabilities = predict_probabilities(model, prepared, patch, config.infer, device)
    del prepared
    return to_original_grid_bounded(probabilities, image.affine, image.spatial_shape, config.infer.resample_memory_mb)


def run(config: Config, checkpoint: Path, image_path: Path, output_path: Path) -> Path:
    device = select_device(config.infer.device)
    model, trained = load_model(checkpoint, device)
    image = read_volume(image_path, Image)
    return write_volume(predict(model, trained, image, config, device), output_path)
