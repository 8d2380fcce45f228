"""`medseg infer`: one patient's canonical image in, its predicted label on the same (original) grid out.

The workflow gives each job a shard of patients (:func:`run_many`: the model is loaded once per shard).
Preprocessing and the network are rebuilt from the checkpoint's own config, so a model is always fed the way it
was trained, whatever the current config says; only the ``infer`` section (overlap, blending, device) is live.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medseg.clicks import Click, guidance, read_clicks, to_grid
from medseg.config import Config, CrfConfig
from medseg.device import select_device
from medseg.errors import ConfigError, GeometryError, MedsegError, ModelLoadError
from medseg.io import read_volume, write_json, write_volume
from medseg.manifest import Entry
from medseg.models import load_model
from medseg.postprocess import crf
from medseg.resample.functional import preprocess, resample_to_grid
from medseg.sliding_window import predict_probabilities, to_original_grid_bounded
from medseg.volume import Image, Label, describe_grid, same_grid

log = logging.getLogger(__name__)


def effective_crf(config: Config, trained: Config) -> CrfConfig:
    """The CRF that runs: the live config's when it says on or off; with ``auto``, the one the checkpoint records
    (decided on the validation cases at the end of training; a checkpoint from before that decision: off)."""
    if config.postprocess.crf.enabled != "auto":
        return config.postprocess.crf
    decided = trained.postprocess.crf
    return decided if decided.enabled is True else decided.model_copy(update={"enabled": False})


def predict(
    model: torch.nn.Module,
    trained: Config,
    image: Image,
    config: Config,
    device: torch.device,
    clicks: Sequence[Click] = (),
    prior: Label | None = None,
) -> Label:
    """Predict a canonical image; the label comes back on the image's own grid.

    Args:
        model: the network from :func:`load_model`, on ``device``.
        trained: the config it was trained with (preprocessing, patch size).
        image: the scan ``(1, X, Y, Z)`` on its original grid.
        config: the live config: its ``infer`` section, and ``postprocess.crf`` (CRF refinement of the
            probabilities before the argmax: on, off, or ``auto``, what training decided; :func:`effective_crf`).
        device: where the windows run.
        clicks: for a click-guided model (``train.clicks``), clicks on the image's grid (:mod:`medseg.clicks`);
            none: its automatic prediction.
        prior: for a click-guided model, the mask being corrected, on the image's grid (none: no mask).

    Returns:
        The uint8 label ``(1, X, Y, Z)`` with the image's affine. Memory beyond the input stays bounded: the
        network works on the resampled grid and the way back goes slab by slab.
    """
    patch = trained.train.patch_size_vox
    if patch is None:
        raise ConfigError("the checkpoint's config has no train.patch_size_vox: it was not written by `medseg train`")
    prepared = preprocess(image, trained.resample)
    network_input = prepared
    if trained.train.clicks.enabled:  # guidance and prior channels on the network's grid
        on_grid = to_grid(clicks, image.affine, prepared.affine, prepared.spatial_shape)
        moved = None if prior is None else resample_to_grid(prior, prepared.affine, prepared.spatial_shape).array[0]
        extra = guidance(prepared.spatial_shape, on_grid, trained.num_classes, trained.train.clicks, moved)
        network_input = Image(np.concatenate([prepared.array, extra]), prepared.affine)
    elif clicks or prior is not None:
        raise ConfigError("this model was not trained with clicks (train.clicks.enabled): it takes no clicks or mask")
    probabilities = predict_probabilities(model, network_input, patch, config.infer, device)
    del network_input
    crf_cfg = effective_crf(config, trained)
    if crf_cfg.enabled is True:
        refined = crf.refine(
            torch.as_tensor(probabilities.array),
            torch.as_tensor(prepared.array[0]),
            prepared.spacing,
            crf_cfg,
            inplace=True,  # the unrefined map is not needed again: no second copy of it
            device=device,  # slab by slab on the GPU when there is one
        )
        probabilities = Image(refined.numpy(), probabilities.affine)
    del prepared
    return to_original_grid_bounded(probabilities, image.affine, image.spatial_shape, config.infer.resample_memory_mb)


def run(config: Config, checkpoint: Path, image_path: Path, output_path: Path) -> Path:
    """Predict one image file into ``output_path``."""
    device = select_device(config.infer.device)
    model, trained = load_model(checkpoint, device)
    image = read_volume(image_path, Image)
    return write_volume(predict(model, trained, image, config, device), output_path)


def refine(
    config: Config, checkpoint: Path, image_path: Path, clicks_path: Path, output_path: Path, mask_path: Path | None
) -> Path:
    """`medseg refine`: a click-guided model (``train.clicks``) corrects ``mask_path`` (or segments from the clicks
    alone, without a mask) given the clicks in ``clicks_path`` (:func:`medseg.clicks.read_clicks`); the corrected
    mask goes to ``output_path`` on the image's grid.

    Raises:
        ModelLoadError: the model was not trained with clicks.
        GeometryError: the mask is not on the image's grid.
        ConfigError: a click is malformed or outside the image.
    """
    device = select_device(config.infer.device)
    model, trained = load_model(checkpoint, device)
    if not trained.train.clicks.enabled:
        raise ModelLoadError(
            f"{checkpoint.name} was not trained with clicks: train one with train.clicks.enabled: true to refine masks"
        )
    image = read_volume(image_path, Image)
    prior = None
    if mask_path is not None:
        prior = read_volume(mask_path, Label)
        if not same_grid(prior, image, config.ingest.label_tolerance_mm):
            raise GeometryError(
                f"{mask_path.name}: the mask is not on the grid of {image_path.name} (mask {describe_grid(prior)}; "
                f"image {describe_grid(image)}): give the mask predicted on this image"
            )
        if int(prior.array.max(initial=0)) >= trained.num_classes:
            raise GeometryError(
                f"{mask_path.name}: holds label {int(prior.array.max())}, the model knows "
                f"{trained.num_classes - 1} classes"
            )
    clicks = read_clicks(clicks_path, trained.classes, image.affine, image.spatial_shape)
    if not clicks and prior is not None:  # nothing to correct (the model never trained on a mask without clicks)
        log.info("no clicks: the mask is written unchanged")
        return write_volume(prior, output_path)
    log.info("refining with %d click(s)%s", len(clicks), " on the given mask" if prior is not None else "")
    return write_volume(predict(model, trained, image, config, device, clicks, prior), output_path)


def run_many(
    config: Config, checkpoint: Path, entries: Sequence[Entry], output_dir: Path, record: Path | None = None
) -> list[dict[str, str]]:
    """Predict the manifest ``entries`` into ``output_dir/<patient_id>.nii.gz`` with one model load (the
    workflow's shard of patients). A patient that fails is listed and the others go on.

    Args:
        record: if given, a JSON written last: the patients, the model's members and the failures.

    Returns:
        ``[{"patient_id", "reason"}]`` of the patients that failed.
    """
    device = select_device(config.infer.device)
    model, trained = load_model(checkpoint, device)
    members = len(getattr(model, "members", [model]))
    failures = []
    for entry in entries:
        try:
            image = read_volume(entry.image, Image)
            write_volume(predict(model, trained, image, config, device), output_dir / f"{entry.patient_id}.nii.gz")
        except (MedsegError, ValueError, OSError, RuntimeError) as err:
            log.error("patient %s: %s", entry.patient_id, err)
            failures.append({"patient_id": entry.patient_id, "reason": f"{type(err).__name__}: {err}"})
    log.info("%d patient(s) predicted with %d model(s) averaged", len(entries) - len(failures), members)
    if record is not None:
        write_json(
            record,
            {"patients": [e.patient_id for e in entries], "ensemble_members": members, "failures": failures},
        )
    return failures
