"""`medseg plan`: fingerprint the ingested training cases, write the frozen plan every later stage follows.

``results/plan/plan.json`` holds the fingerprint, what the data alone suggest (``planned``), the keys the user's
config set (``overrides``: they win), the effective ``resample`` and ``train`` sections that resample, train and
infer run with, the model ``contract``, and the cross-validation folds when ``train.folds`` is set. MLflow gets the
effective sections as params, so what it records is what ran.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from medseg.config import Config, Recipe, ResampleConfig
from medseg.device import select_device
from medseg.errors import ConfigError, ManifestError
from medseg.io import read_json, read_volume, write_json
from medseg.manifest import Entry, read_manifest, select
from medseg.plan.functional import (
    case_fingerprint,
    contract,
    fingerprint,
    make_plan,
    overrides,
    resolve_resample,
    resolve_train,
)
from medseg.volume import Image, Label

log = logging.getLogger(__name__)

PLAN_VERSION = 1


class Plan(BaseModel):
    """The frozen, typed plan. ``resample`` and ``train`` have no ``null`` planned key left."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = PLAN_VERSION
    dataset: str
    classes: list[str]
    device_type: str
    fingerprint: dict[str, Any]
    planned: dict[str, Any]
    overrides: dict[str, Any]
    resample: ResampleConfig
    train: Recipe
    contract: dict[str, Any]
    folds: dict[str, int] | None = None

    def apply(self, config: Config) -> Config:
        """``config`` with the plan's effective ``resample`` and ``train`` sections (what the stages run)."""
        if list(config.classes) != list(self.classes):
            raise ConfigError(f"the plan was made for classes {self.classes}, the config names {config.classes}")
        return config.model_copy(update={"resample": self.resample, "train": self.train})


def load_plan(path: Path) -> Plan:
    """Read ``plan.json``.

    Raises:
        ConfigError: missing, or not a plan of this version.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"plan {path} does not exist: run `medseg plan` first")
    try:
        return Plan.model_validate(read_json(path))
    except ValueError as err:
        raise ConfigError(f"{path} is not a medseg plan ({err})") from err


def load_resample_section(path: Path) -> ResampleConfig:
    """The effective ``resample`` section of ``plan.json`` (all that resampling needs of the plan).

    Raises:
        ConfigError: missing, or holding no valid resample section.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"plan {path} does not exist: run `medseg plan` first")
    try:
        return ResampleConfig.model_validate(read_json(path)["resample"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} holds no valid resample section ({err})") from err


def assign_folds(entries: list[Entry], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold, ``0 .. folds - 1``, by subject (all studies of a person in one fold), seeded."""
    subjects = sorted({e.subject_id for e in entries})
    order = np.random.default_rng(seed).permutation(len(subjects))
    fold_of = {subjects[i]: rank % folds for rank, i in enumerate(order)}
    return {e.patient_id: fold_of[e.subject_id] for e in entries}


def training_pool(entries: list[Entry]) -> list[Entry]:
    """The cases a plan describes and folds split: the manifest's train and val patients (never test)."""
    return [e for e in select(entries, "train", "val") if e.label is not None]


def _case(entry: Entry, num_classes: int, seed: int) -> dict[str, Any]:
    assert entry.label is not None  # training_pool keeps labelled entries only
    image, label = read_volume(entry.image, Image), read_volume(entry.label, Label)
    return case_fingerprint(image, label, num_classes, seed)


def make(config: Config, entries: list[Entry], device_type: str, threads: int = 1) -> Plan:
    """Fingerprint ``entries`` (``threads`` cases at a time), plan, and apply the config's overrides."""
    pool = training_pool(entries)
    if not pool:
        raise ManifestError("the manifest has no labelled train or val patients to plan from")
    chosen = pool[: config.plan.max_cases]
    with ThreadPoolExecutor(max(1, threads)) as workers:  # reading and gunzip release the GIL
        cases = list(workers.map(lambda e: _case(e, config.num_classes, config.train.seed), chosen))
    fp = fingerprint(cases, config.num_classes, [e.modality for e in chosen])
    planned = make_plan(fp, config, device_type)
    resample = resolve_resample(config.resample, planned["resample"])
    train = resolve_train(config.train, planned["train"])
    folds = None
    if config.train.folds:
        if len({e.subject_id for e in pool}) < config.train.folds:
            raise ManifestError(f"train.folds {config.train.folds} needs at least that many subjects")
        folds = assign_folds(pool, config.train.folds, config.train.seed)
    assert resample.normalization is not None
    return Plan(
        dataset=config.dataset,
        classes=list(config.classes),
        device_type=device_type,
        fingerprint={k: v for k, v in fp.items() if k not in ("spacings_mm", "shapes_vox")},
        planned=planned,
        overrides=overrides(config),
        resample=resample,
        train=train,
        contract=contract(fp, list(config.classes), resample.normalization),
        folds=folds,
    )


def run(config: Config, manifest_path: Path, output_path: Path, threads: int = 1) -> Plan:
    """`medseg plan`: write the plan of the manifest's train and val patients to ``output_path``."""
    device_type = select_device(config.train.device).type
    plan = make(config, read_manifest(manifest_path), device_type, threads)
    write_json(output_path, plan.model_dump(mode="json"))
    t, r = plan.train, plan.resample
    log.info(
        "plan for %d case(s) on %s: spacing %s mm, %s normalisation, %s %s, patch %s, batch %d, %s epoch(s)%s",
        plan.fingerprint["n_cases"],
        device_type,
        [round(s, 3) for s in r.target_spacing_mm or ()],
        r.normalization,
        t.network,
        list(t.channels or ()),
        list(t.patch_size_vox or ()),
        t.batch_size,
        t.epochs,
        f" within {t.max_minutes} min" if t.max_minutes else "",
    )
    if plan.overrides:
        log.info("set in the config (they win over the plan): %s", plan.overrides)
    return plan
