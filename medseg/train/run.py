"""`medseg train`: train on the manifest's train patients, validate on its val patients, track in MLflow.

Outputs in the train folder: ``model.pt`` (best by validation Dice), ``last.pt``, ``history.tsv``,
``config.yaml`` (resolved) and ``run.json`` (the MLflow run id later stages log into).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.utils import set_determinism

from medseg import tracking
from medseg.config import Config
from medseg.device import select_device
from medseg.errors import ManifestError
from medseg.infer.functional import predict_probabilities
from medseg.io import atomic_path, read_volume, write_json, write_text, write_tsv
from medseg.manifest import manifest_digest, read_manifest, select
from medseg.resample.run import output_paths
from medseg.train.losses import build_loss
from medseg.train.networks import build_network
from medseg.train.transforms import train_transforms
from medseg.volume import Image, Label

log = logging.getLogger(__name__)


def _load(entries: list, resample_dir: Path) -> list[dict[str, Any]]:
    items = []
    for e in entries:
        paths = output_paths(resample_dir, e.patient_id)
        if not paths["label"].exists():
            raise ManifestError(f"{e.patient_id}: resampled label {paths['label']} missing: run `medseg resample`")
        items.append(
            {
                "patient_id": e.patient_id,
                "image": read_volume(paths["image"], Image).array,
                "label": read_volume(paths["label"], Label).array,
            }
        )
    return items


def validate(
    model: torch.nn.Module, items: list[dict[str, Any]], config: Config, device: torch.device
) -> np.ndarray:
    """Mean Dice per foreground class over the validation volumes (whole volumes, sliding windows)."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    n = config.num_classes
    for item in items:
        probs = predict_probabilities(
            model, Image(item["image"], np.eye(4)), config.train.patch_size_vox, config.infer, device
        )
        pred = torch.as_tensor(probs.array.argmax(0))
        onehot_pred = torch.nn.functional.one_hot(pred.long(), n).movedim(-1, 0)[None]
        onehot_true = torch.nn.functional.one_hot(torch.as_tensor(item["label"][0]).long(), n).movedim(-1, 0)[None]
        metric(onehot_pred, onehot_true)
    return metric.aggregate().cpu().numpy()


def _save(path: Path, model: torch.nn.Module, config: Config, epoch: int, val_dice: float) -> None:
    checkpoint = {
        "state_dict": model.state_dict(),
        "config": config.to_dict(),
        "epoch": epoch,
        "val_dice": val_dice,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def run(config: Config, manifest_path: Path, resample_dir: Path, output_dir: Path, threads: int = 1) -> dict:
    """Train and return a summary: best validation Dice and the MLflow run id."""
    cfg = config.train
    set_determinism(seed=cfg.seed)
    torch.set_num_threads(cfg.num_threads or threads)
    device = select_device(cfg.device)
    entries = read_manifest(manifest_path)
    train_entries, val_entries = select(entries, "train"), select(entries, "val")
    if not train_entries:
        raise ManifestError(f"manifest {manifest_path} has no training patients")
    train_items, val_items = _load(train_entries, resample_dir), _load(val_entries, resample_dir)
    loader = DataLoader(
        Dataset(train_items, transform=train_transforms(cfg.patch_size_vox)),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=0,
    )
    model = build_network(cfg, config.num_classes).to(device)
    loss_fn = build_loss(cfg, config.num_classes)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.learning_rate, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / total_steps) ** 0.9)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "config.yaml", config.to_yaml())
    history: list[dict[str, Any]] = []
    best = -1.0
    batches = itertools.cycle(loader)
    with tracking.run(config.tracking, run_name=f"{config.dataset}-{config.digest()}") as run_id:
        write_json(output_dir / "run.json", {"run_id": run_id, "tracking_uri": config.tracking.uri})
        tracking.log_params(config.to_dict())
        tracking.set_tags(
            {
                "config_digest": config.digest(),
                "manifest_sha256": manifest_digest(manifest_path),
                "git_commit": tracking.git_commit(),
                "device": str(device),
            }
        )
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            start, losses, samples = time.perf_counter(), [], 0
            for _ in range(cfg.iterations_per_epoch):
                batch = next(batches)
                image, label = batch["image"].to(device), batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(image), label)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss))
                samples += image.shape[0]
            seconds = time.perf_counter() - start
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "learning_rate": scheduler.get_last_lr()[0],
                "seconds": seconds,
                "samples_per_second": samples / seconds,
            }
            if val_items and (epoch % cfg.val_every_epochs == 0 or epoch == cfg.epochs):
                dice = validate(model, val_items, config, device)
                row["val_dice_mean"] = float(np.nanmean(dice))
                for name, value in zip(config.classes, dice, strict=True):
                    row[f"val_dice_{name}"] = float(value)
                if row["val_dice_mean"] > best:
                    best = row["val_dice_mean"]
                    _save(output_dir / "model.pt", model, config, epoch, best)
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            history.append(row)
            log.info(
                "epoch %d/%d loss %.4f%s (%.1f s)",
                epoch,
                cfg.epochs,
                row["train_loss"],
                f" val Dice {row['val_dice_mean']:.3f}" if "val_dice_mean" in row else "",
                seconds,
            )
        _save(output_dir / "last.pt", model, config, cfg.epochs, best)
        if best < 0:  # no validation patients: the last model is the model
            _save(output_dir / "model.pt", model, config, cfg.epochs, float("nan"))
        columns = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
        write_tsv(output_dir / "history.tsv", history, columns)
        for name in ("model.pt", "config.yaml", "history.tsv"):
            tracking.log_artifact(output_dir / name, "train")
        tracking.log_artifact(manifest_path, "manifest")
    return {"run_id": run_id, "best_val_dice": best}
