"""`medseg train`: the plan's recipe, trained on the manifest's train patients and validated on its val patients
(or, with ``train.folds``, on one fold of both: ``--fold``), tracked in MLflow, resumed after a crash.

Outputs in the model's folder: ``model.pt`` (the final weights, or the best validation's: ``train.keep_weights``;
carries the config, the plan and the model contract, see :mod:`medseg.models`), ``last.pt`` (everything needed to
resume), ``history.tsv``, ``config.yaml`` (resolved) and ``run.json`` (the MLflow run id later stages log into).
``medseg ensemble`` bundles the folds' models into one ``model.pt`` whose members infer and predict average.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medseg import distributed, tracking
from medseg.config import Config
from medseg.device import select_device, set_torch_threads, split_cores, usable_cores
from medseg.errors import ConfigError, ManifestError, MedsegError
from medseg.io import read_json, read_tsv, read_volume, write_json, write_tsv
from medseg.manifest import Entry, manifest_digest, read_manifest, select
from medseg.models import load_checkpoint, save_checkpoint
from medseg.plan.run import Plan, load_plan, training_pool
from medseg.plan.run import run as plan_stage
from medseg.postprocess.decision import pool_crf_decisions
from medseg.resample.run import output_paths
from medseg.train.loop import ModelInfo, fit, with_crf_decided
from medseg.volume import Image, Label

log = logging.getLogger(__name__)


def _load(entries: list[Entry], resample_dir: Path, threads: int = 2) -> list[dict[str, Any]]:
    def one(e: Entry) -> dict[str, Any]:
        paths = output_paths(resample_dir, e.patient_id)
        if not paths["label"].exists():
            raise ManifestError(f"{e.patient_id}: resampled label {paths['label']} missing: run `medseg resample`")
        return {
            "patient_id": e.patient_id,
            "image": read_volume(paths["image"], Image).array,
            "label": read_volume(paths["label"], Label).array,
        }

    with ThreadPoolExecutor(max(1, threads)) as workers:
        return list(workers.map(one, entries))


def split_entries(plan: Plan, entries: list[Entry], fold: int | None) -> tuple[list[Entry], list[Entry]]:
    """Training and validation patients: the manifest's split, or with the plan's folds (``train.folds``) the pool
    of train and val patients without fold ``fold``, validated on fold ``fold``."""
    if plan.folds is None:
        return select(entries, "train"), select(entries, "val")
    if fold is None:
        raise ConfigError("the plan has cross-validation folds: say which one to train (--fold)")
    pool = training_pool(entries)
    return [e for e in pool if plan.folds[e.patient_id] != fold], [e for e in pool if plan.folds[e.patient_id] == fold]


def identity(config: Config, manifest_path: Path | None, fold: int | None = None) -> str:
    """What a resumable run is: the resolved config, the fold and the manifest's content."""
    data = {
        "config": config.digest(),
        "fold": fold,
        "manifest": manifest_digest(manifest_path) if manifest_path else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run(
    config: Config,
    manifest_path: Path,
    resample_dir: Path,
    output_dir: Path,
    threads: int = 1,
    plan_path: Path | None = None,
    fold: int | None = None,
) -> dict[str, Any]:
    """Train on the plan's recipe (resuming from ``output_dir/last.pt`` if the same run was interrupted).

    Args:
        config: the user's config (the plan fills its null keys).
        manifest_path: the data manifest.
        resample_dir: the resample stage's folder.
        output_dir: this model's folder.
        threads: the cores this job may use (Snakemake's ``threads``): torch threads and batch-drawing workers
            (:func:`medseg.device.split_cores`; ``train.num_threads`` / ``num_workers`` override).
        plan_path: ``plan.json`` of ``medseg plan``; None: plan now into ``output_dir/plan.json`` (the
            resampled files must then have been made with the same config).
        fold: the fold to hold out, when the plan has folds (default: ``train.fold``).

    Raises:
        ManifestError: no training patients, or a resampled file is missing.
        DeviceError: ``train.device: cuda`` without a CUDA device.
        ConfigError: no usable plan, or a fold outside it.
    """
    ranks, device = distributed.start(select_device(config.train.device))
    cores = max(1, min(threads, usable_cores()) // ranks.world)  # the job's cores, shared by its DDP ranks
    torch_threads, workers = split_cores(cores, device.type, config.train.num_workers)
    set_torch_threads(config.train.num_threads or torch_threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    if plan_path is None:
        plan_path = output_dir / "plan.json"
        if ranks.main:
            plan_stage(config, manifest_path, plan_path, cores)
        ranks.barrier()
    plan = load_plan(plan_path)
    resolved = plan.apply(config)
    if fold is None and plan.folds is not None:
        fold = config.train.fold  # `medseg train` without --fold trains the config's fold (default 0)
    if fold is not None:
        if plan.folds is None or fold >= (resolved.train.folds or 0):
            raise ConfigError(f"--fold {fold}: the plan has {resolved.train.folds or 'no'} folds")
        resolved = resolved.model_copy(update={"train": resolved.train.model_copy(update={"fold": fold})})
    entries = read_manifest(manifest_path)
    train_entries, val_entries = split_entries(plan, entries, fold)
    if not train_entries:
        raise ManifestError(f"manifest {manifest_path} has no training patients")
    log.info(
        "recipe from %s: patch %s, batch %d, %s %s, spacing %s mm, %s normalisation%s",
        plan_path,
        resolved.train.patch_size_vox,
        resolved.train.batch_size,
        resolved.train.network,
        resolved.train.channels,
        list(resolved.resample.target_spacing_mm or ()),
        resolved.resample.normalization,
        f"; fold {fold}: {len(train_entries)} train, {len(val_entries)} validation" if fold is not None else "",
    )
    train_items, val_items = _load(train_entries, resample_dir, cores), _load(val_entries, resample_dir, cores)
    # MLflow params: the sections that ran (the plan's effective resample and train), the rest of the config,
    # and which keys the user set over the plan.
    params = {**resolved.to_dict(), "plan_overrides": plan.overrides or "none", "plan_fingerprint": plan.fingerprint}
    summary = fit(
        resolved,
        train_items,
        val_items,
        output_dir,
        device,
        identity=identity(resolved, manifest_path, fold),
        params=params,
        tags={
            "config_digest": config.digest(),  # the user's config; the plan-resolved one is resolved_config_digest
            "resolved_config_digest": resolved.digest(),
            "manifest_sha256": manifest_digest(manifest_path),
            "git_commit": tracking.git_commit(),
            **({"fold": str(fold)} if fold is not None else {}),
        },
        artifacts=[(plan_path, "plan"), (manifest_path, "manifest")],
        info=ModelInfo(plan=plan.model_dump(mode="json"), contract=plan.contract, fold=fold),
        workers=workers,
        ranks=ranks,
    )
    if ranks.main and fold is None:  # a fold's model is published as part of the ensemble
        publish(config, summary, output_dir / "model.pt", manifest_path)
    return summary


def model_name(config: Config) -> str:
    """The registered model's name: ``tracking.model_name`` or ``medseg-<dataset>``."""
    return config.tracking.model_name or f"medseg-{config.dataset}"


def publish(config: Config, summary: dict[str, Any], checkpoint: Path, manifest_path: Path | None) -> str | None:
    """After training (rank 0): the data manifest as the run's MLflow dataset input (once), and ``model.pt``
    registered as a new version of :func:`model_name` (once per run: a rerun of a finished training registers
    nothing new), tagged with the best validation Dice and the manifest digest. Returns the version, or None when
    ``tracking.register_model`` is off."""
    run_id = summary["run_id"]
    digest = manifest_digest(manifest_path) if manifest_path is not None else None
    if manifest_path is not None and digest is not None and not tracking.has_dataset_input(config.tracking, run_id):
        with tracking.run(config.tracking, run_id=run_id):
            tracking.log_dataset(manifest_path, f"{config.dataset}-manifest", digest)
    if not config.tracking.register_model:
        return None
    name = model_name(config)
    try:
        return tracking.registered_version(config.tracking, run_id, name)
    except MedsegError:
        pass  # not registered yet
    tags = {"best_val_dice": f"{summary['best_val_dice']:.4f}", "dataset": config.dataset}
    if digest is not None:
        tags["manifest_sha256"] = digest
    return tracking.register_model(config.tracking, run_id, name, checkpoint, tags).version


def ensemble(config: Config, fold_dirs: list[Path], output_dir: Path) -> Path:
    """`medseg ensemble`: the folds' ``model.pt`` as one checkpoint whose members infer and predict average.

    Writes ``model.pt``, ``history.tsv`` (every fold's rows, with a ``fold`` column) and ``run.json`` (a new MLflow
    run that holds the bundle and names the folds' runs) into ``output_dir``.

    Raises:
        ModelLoadError: a fold's model is missing or unreadable.
        ConfigError: the folds were trained with different recipes.
    """
    checkpoints = [load_checkpoint(d / "model.pt") for d in fold_dirs]
    first = checkpoints[0]

    def recipe(c: Config) -> Config:  # what must agree: all but the fold and each fold's own CRF decision
        return with_crf_decided(c.model_copy(update={"train": c.train.model_copy(update={"fold": 0})}), False)

    base = recipe(first.config)
    for c in checkpoints[1:]:
        if recipe(c.config).digest() != base.digest():
            raise ConfigError("the folds' models were trained with different configs: retrain them from one plan")
    records = [d / "crf_decision.json" for d in fold_dirs]
    if all(r.exists() for r in records):  # postprocess.crf auto: decided on every fold's validation cases together
        crf_on = pool_crf_decisions([read_json(r) for r in records], first.config.classes)
    else:  # folds trained with the CRF set on or off, or before the auto decision existed
        crf_on = all(c.config.postprocess.crf.enabled is True for c in checkpoints)
    members = [m for c in checkpoints for m in c.members]
    output_dir.mkdir(parents=True, exist_ok=True)
    bundled = with_crf_decided(first.config, crf_on)
    path = save_checkpoint(output_dir / "model.pt", bundled, members, plan=first.plan, contract=first.contract)
    rows = []
    for fold, d in enumerate(fold_dirs):
        rows += [{"fold": fold, **r} for r in read_tsv(d / "history.tsv")]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_tsv(output_dir / "history.tsv", rows, columns)
    fold_runs = [read_json(d / "run.json")["run_id"] for d in fold_dirs]
    with tracking.run(config.tracking, run_name=f"{config.dataset}-{base.digest()}-ensemble") as run_id:
        tracking.log_params({**with_crf_decided(base, crf_on).to_dict(), "ensemble_folds": len(fold_dirs)})
        tracking.set_tags(
            {
                "fold_runs": ",".join(fold_runs),
                "git_commit": tracking.git_commit(),
                "postprocess_crf": "on" if crf_on else "off",
            }
        )
        tracking.log_metrics(
            {f"fold{m['fold']}_val_dice": float(m["val_dice"]) for m in members if m.get("fold") is not None}, 0
        )
        tracking.log_artifact(path, "train")
        write_json(output_dir / "run.json", {"run_id": run_id, "tracking_uri": config.tracking.uri})
    mean_val = sum(float(m["val_dice"]) for m in members) / len(members)
    publish(config, {"run_id": run_id, "best_val_dice": mean_val}, path, None)
    log.info("ensemble of %d fold model(s) written to %s (MLflow run %s)", len(members), path, run_id)
    return path
