"""`medseg postprocess`: clean one predicted label; `medseg postprocess-decide`: decide keep-largest per class from
the validation predictions and write the decision to a JSON file that `medseg postprocess --decision` applies."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medseg.config import Config
from medseg.errors import ConfigError, GeometryError, ManifestError, MedsegError
from medseg.io import read_json, read_volume, write_json, write_volume
from medseg.manifest import read_manifest, select
from medseg.postprocess.decision import decide_keep_largest, with_keep_largest
from medseg.postprocess.functional import ClassRule, apply_rules, class_rules
from medseg.volume import Label, describe_grid, same_grid

log = logging.getLogger(__name__)


def rules_with_decision(config: Config, decision_path: Path | None) -> dict[int, ClassRule]:
    """The configured rules, plus keep-largest for the classes a decision file switched on.

    Raises:
        ConfigError: the decision is unreadable or names a class the config does not have.
    """
    rules = class_rules(config.postprocess, config.classes)
    if decision_path is None:
        return rules
    try:
        chosen = read_json(decision_path)["keep_largest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"post-processing decision {decision_path} is unreadable: {err}; rerun `medseg postprocess-decide`"
        ) from err
    unknown = sorted(set(chosen) - set(config.classes))
    if unknown:
        raise ConfigError(
            f"post-processing decision {decision_path} names unknown class(es) {unknown}; classes: {config.classes}"
        )
    return with_keep_largest(rules, [config.classes.index(name) + 1 for name in chosen])


def run(config: Config, prediction: Path, output_path: Path, decision_path: Path | None = None) -> Path:
    """Apply the per-class rules (and the keep-largest decision) to one label file."""
    label = read_volume(prediction, Label)
    return write_volume(apply_rules(label, rules_with_decision(config, decision_path)), output_path)


def run_many(
    config: Config,
    patient_ids: Sequence[str],
    input_dir: Path,
    output_dir: Path,
    decision_path: Path | None,
    threads: int,
) -> list[dict[str, str]]:
    """Clean ``input_dir/<patient_id>.nii.gz`` into ``output_dir`` for a shard of patients, ``threads`` at a time;
    a patient that fails is listed and the others go on. Returns ``[{"patient_id", "reason"}]`` of failures."""
    rules_with_decision(config, decision_path)  # a bad decision file fails the job once, before any patient

    def one(pid: str) -> dict[str, str] | None:
        try:
            run(config, input_dir / f"{pid}.nii.gz", output_dir / f"{pid}.nii.gz", decision_path)
        except MedsegError as err:
            log.error("patient %s: %s", pid, err)
            return {"patient_id": pid, "reason": str(err)}
        return None

    with ThreadPoolExecutor(max(1, threads)) as workers:  # scipy's labelling and gzip release the GIL
        return [r for r in workers.map(one, patient_ids) if r is not None]


def decide_run(
    config: Config,
    manifest_path: Path,
    predictions_dir: Path,
    output_path: Path,
    split: str | Sequence[str] = "val",
) -> dict[str, Any]:
    """Decide keep-largest per class from the ``split`` patients' predictions and labels; write the decision.

    ``split`` may name several splits (with cross-validation: the out-of-fold predictions of train and val).
    A case whose prediction is missing or on the wrong grid is skipped and listed under ``failures``.

    Raises:
        ManifestError: the manifest has no labelled patients in ``split``.
    """
    splits = [split] if isinstance(split, str) else list(split)
    entries = [e for e in select(read_manifest(manifest_path), *splits) if e.label is not None]
    if not entries:
        raise ManifestError(f"manifest {manifest_path} has no labelled {splits} patients to decide post-processing on")
    failures: list[dict[str, str]] = []

    def cases() -> Iterator[tuple[str, Label, Label]]:
        failures.clear()
        for entry in entries:
            try:
                pred = read_volume(predictions_dir / f"{entry.patient_id}.nii.gz", Label)
                ref = read_volume(entry.label, Label)  # type: ignore[arg-type]
                if not same_grid(pred, ref, config.ingest.label_tolerance_mm):
                    raise GeometryError(
                        f"{entry.patient_id}: prediction not on the label grid: "
                        f"{describe_grid(pred)} vs {describe_grid(ref)}"
                    )
            except MedsegError as err:
                log.error("%s: left out of the decision: %s", entry.patient_id, err)
                failures.append({"patient_id": entry.patient_id, "reason": str(err)})
                continue
            yield entry.patient_id, pred, ref

    decision = decide_keep_largest(cases, class_rules(config.postprocess, config.classes), config.classes)
    decision["split"] = "+".join(splits)
    decision["failures"] = failures
    decision["config_digest"] = config.section_digest("postprocess")
    write_json(output_path, decision)
    return decision
