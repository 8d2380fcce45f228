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
from medseg.errors import ImageReadError
from medseg.infer.functional import predict_probabilities, to_original_grid
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
    """Predict a canonical image; the label comes back on the image's own grid."""
    prepared = preprocess(image, trained.resample)
    probabilities = predict_probabilities(model, prepared, trained.train.patch_size_vox, config.infer, device)
    return to_original_grid(probabilities, image.affine, image.spatial_shape)


def run(config: Config, checkpoint: Path, image_path: Path, output_path: Path) -> Path:
    device = select_device(config.infer.device)
    model, trained = load_model(checkpoint, device)
    image = read_volume(image_path, Image)
    return write_volume(predict(model, trained, image, config, device), output_path)
