"""`medseg train`: plan from the data, then train on the manifest's train patients, validate on its val patients
(or on a fold of both with ``train.folds``), track everything in MLflow, resume after a crash.

Outputs in the train folder: ``plan.json`` (fingerprint, derived settings, the user's overrides), ``model.pt``
(best by validation Dice), ``last.pt`` (everything needed to resume), ``history.tsv``, ``config.yaml`` (resolved),
``folds.json`` (with ``train.folds``) and ``run.json`` (the MLflow run id later stages log into).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import tracking
from medseg.config import Config
from medseg.device import select_device
from medseg.errors import ManifestError
from medseg.io import read_volume, write_json
from medseg.manifest import Entry, manifest_digest, read_manifest, select
from medseg.resample.run import output_paths
from medseg.train.loop import fit
from medseg.train.plan import fingerprint, make_plan, overrides, resolve_train
from medseg.volume import Image, Label

log = logging.getLogger(__name__)


def _load(entries: list[Entry], resample_dir: Path) -> list[dict[str, Any]]:
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


def assign_folds(entries: list[Entry], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold, ``0 .. folds - 1``, by subject (all studies of a person in one fold), seeded."""
    subjects = sorted({e.subject_id for e in entries})
    order = np.random.default_rng(seed).permutation(len(subjects))
    fold_of = {subjects[i]: rank % folds for rank, i in enumerate(order)}
    return {e.patient_id: fold_of[e.subject_id] for e in entries}


def split_entries(config: Config, entries: list[Entry], output_dir: Path) -> tuple[list[Entry], list[Entry]]:
    """Training and validation patients: the manifest's split, or fold ``train.fold`` of ``train.folds`` over
    its train and val patients together (the assignment is written to ``folds.json``)."""
    cfg = config.train
    train, val = select(entries, "train"), select(entries, "val")
    if cfg.folds is None:
        return train, val
    pool = train + val
    if len({e.subject_id for e in pool}) < cfg.folds:
        raise ManifestError(f"train.folds {cfg.folds} needs at least that many subjects; the manifest has fewer")
    assignment = assign_folds(pool, cfg.folds, cfg.seed)
    write_json(
        output_dir / "folds.json", {"folds": cfg.folds, "fold": cfg.fold, "seed": cfg.seed, "fold_of": assignment}
    )
    return [e for e in pool if assignment[e.patient_id] != cfg.fold], [
        e for e in pool if assignment[e.patient_id] == cfg.fold
    ]


def plan_from_entries(config: Config, entries: list[Entry], device_type: str = "cpu") -> dict[str, Any]:
    """Fingerprint the canonical (not yet resampled) images and labels of ``entries`` and derive the plan."""
    chosen = entries[: config.plan.max_cases]
    cases = ((read_volume(e.image, Image), read_volume(e.label, Label)) for e in chosen if e.label is not None)
    plan = make_plan(fingerprint(cases, config.num_classes, seed=config.train.seed), config, device_type)
    planned = plan["resample"]["target_spacing_mm"]
    configured = config.resample.target_spacing_mm
    if not np.allclose(planned, configured, rtol=0.15):
        log.warning(
            "resample.target_spacing_mm is %s; the data plan suggests %s (median spacing of the training cases)",
            list(configured),
            [round(s, 3) for s in planned],
        )
    return plan


def resolve(config: Config, plan: dict[str, Any]) -> Config:
    """The config with the train keys left null filled from the plan; the plan records what the user set."""
    plan["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides(config.train).items()}
    return config.model_copy(update={"train": resolve_train(config.train, plan)})


def run_plan(config: Config, manifest_path: Path, output_path: Path) -> dict[str, Any]:
    """`medseg plan`: write the resolved plan of the manifest's training patients to ``output_path``."""
    entries = read_manifest(manifest_path)
    train, _ = split_entries(config, entries, output_path.parent)
    plan = plan_from_entries(config, train, select_device(config.train.device).type)
    resolved = resolve(config, plan)
    plan["resolved_train"] = resolved.train.model_dump(mode="json")
    write_json(output_path, plan)
    return plan


def identity(config: Config, manifest_path: Path | None) -> str:
    """What a resumable run is: the config plus the manifest's content."""
    data = {"config": config.digest(), "manifest": manifest_digest(manifest_path) if manifest_path else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run(config: Config, manifest_path: Path, resample_dir: Path, output_dir: Path, threads: int = 1) -> dict:
    """Plan, train (resuming from ``output_dir/last.pt`` if the same run was interrupted) and return a summary.

    Raises:
        ManifestError: no training patients, or a resampled file is missing.
        DeviceError: ``train.device: cuda`` without a CUDA device.
    """
    device = select_device(config.train.device)
    torch.set_num_threads(config.train.num_threads or threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = read_manifest(manifest_path)
    train_entries, val_entries = split_entries(config, entries, output_dir)
    if not train_entries:
        raise ManifestError(f"manifest {manifest_path} has no training patients")
    plan = plan_from_entries(config, train_entries, device.type)
    resolved = resolve(config, plan)
    plan["resolved_train"] = resolved.train.model_dump(mode="json")
    write_json(output_dir / "plan.json", plan)
    log.info(
        "plan: patch %s, batch %d, %s %s, target spacing %s mm",
        resolved.train.patch_size_vox,
        resolved.train.batch_size,
        resolved.train.network,
        resolved.train.channels,
        [round(s, 3) for s in plan["resample"]["target_spacing_mm"]],
    )
    train_items, val_items = _load(train_entries, resample_dir), _load(val_entries, resample_dir)
    artifacts = [(output_dir / "plan.json", "train"), (manifest_path, "manifest")]
    if (output_dir / "folds.json").exists() and config.train.folds:
        artifacts.append((output_dir / "folds.json", "train"))
    return fit(
        resolved,
        train_items,
        val_items,
        output_dir,
        device,
        identity=identity(config, manifest_path),
        params={**resolved.to_dict(), "plan": {k: plan[k] for k in ("resample", "fingerprint")}},
        tags={
            "config_digest": config.digest(),  # the user's config; the plan-resolved one is resolved_config_digest
            "resolved_config_digest": resolved.digest(),
            "manifest_sha256": manifest_digest(manifest_path),
            "git_commit": tracking.git_commit(),
        },
        artifacts=artifacts,
    )
