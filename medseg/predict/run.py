"""`medseg predict`: a folder of new scans in (DICOM series in any layout, NIfTI files), per eligible series a
segmentation out as NIfTI on the series' original grid, as DICOM-SEG referencing the series, and a QC picture.

Series are found and chosen with ingest's rules (:func:`medseg.ingest.discover.discover`, ``rank_series`` with
``ingest.series``), but every eligible series is predicted, not only the one ingest would pick per study. Outputs,
named by a pseudonymised series id ``<subject_id>_<series key>`` (both keyed hashes, stable across runs):

* ``nifti/<series_id>.nii.gz``: the label on the source grid, voxel for voxel the DICOM slices as read (X =
  columns, Y = rows, Z = slices by position), with the source's RAS affine;
* ``dicom_seg/<series_id>.dcm``: the same label as a BINARY DICOM-SEG (DICOM input only), the one output that
  carries the patient's identity, because it must file back into the patient's record;
* ``qc/<series_id>.png``: a few axial slices with the contours;
* ``records/<series_id>.json``: written last; a series whose record says ``done`` for the same model and
  settings, and whose outputs exist, is skipped by a rerun (resume);
* ``summary.tsv``, ``summary.json``, ``failures.tsv`` and ``instances.tsv`` (each class's connected components,
  largest first, with their volumes) for the whole folder.

With ``name_after_input``, a NIfTI input's outputs are named after its file instead (nnU-Net's habit:
``case_017_0000.nii.gz`` -> ``nifti/case_017.nii.gz``); DICOM outputs stay pseudonymised.

A series' outputs are all or nothing (:mod:`medseg.predict.commit`): all are built under temporary names and
renamed into place together, the record last; a series that fails leaves only its record, saying why.

The model's contract (:mod:`medseg.contract`, from the checkpoint) is checked for each series: a modality the
model was not trained on is skipped (status ``skipped``, in ``failures.tsv``) unless ``allow_any_modality``; a
spacing or intensity far from the training data is flagged (``flags`` in the record and ``summary.tsv``, and in
red on the QC picture).

A series that fails is recorded with its reason and the rest go on. No identity value reaches a file name, a
log line or a table: texts that come from the source (descriptions, error messages) pass through ingest's
:class:`~medseg.ingest.pseudonym.Redactor`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg import contract as model_contract
from medseg import tracking
from medseg.config import Config
from medseg.errors import ConfigError, GeometryError, MedsegError, ModelLoadError, one_line_reason
from medseg.ingest.dicom import read_series
from medseg.ingest.discover import discover, rank_series
from medseg.ingest.pseudonym import Redactor, debug_traceback, load_or_create_key, pseudonym
from medseg.io import file_sha256, read_json, read_volume, to_canonical, write_json, write_tsv, write_volume
from medseg.metrics import instance_volumes
from medseg.predict.commit import remove_partials, staged
from medseg.predict.dicom_seg import build_segmentation, instance_segments, source_frames, write_segmentation
from medseg.predict.functional import class_volumes_ml, default_color, from_canonical
from medseg.qc import render_qc
from medseg.volume import Image, Label, check_image

log = logging.getLogger(__name__)

Track = Callable[[Iterable[Any], str, int], Iterable[Any]]
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ARTIFACT = "train/model.pt"
PLAN_COLUMNS = ["series_id", "subject_id", "source_format", "modality", "series_number", "series_description"]


def _no_track(items: Iterable[Any], _description: str, _total: int) -> Iterable[Any]:
    return items


@dataclass(frozen=True)
class SeriesJob:
    """One series to predict. ``files`` are source paths: identifying, never written out."""

    series_id: str
    subject_id: str
    source_format: str  # "dicom" or "nifti"
    modality: str
    series_number: int
    series_description: str  # redacted
    files: tuple[Path, ...]
    output_name: str = ""  # the outputs' file stem when not the series id (``name_after_input``)

    @property
    def stem(self) -> str:
        """The file name stem of the series' outputs and record."""
        return self.output_name or self.series_id

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in PLAN_COLUMNS}


@dataclass
class PredictResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    predicted: int = 0  # series predicted by this call (the rest were done before or failed)


def input_name(path: Path) -> str:
    """The output stem of a NIfTI input named after it: suffixes and nnU-Net's channel suffix dropped.

    >>> input_name(Path("imagesTs/case_017_0000.nii.gz"))
    'case_017'
    >>> input_name(Path("brain.nii"))
    'brain'
    """
    stem = re.sub(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd)$", "", path.name, flags=re.IGNORECASE)
    return re.sub(r"_\d{4}$", "", stem) or stem


def plan(
    config: Config, input_dir: Path, name_after_input: bool = False
) -> tuple[list[SeriesJob], list[dict[str, str]], Redactor]:
    """Every eligible series below ``input_dir``, sorted by series id, with the files that could not be used.

    Args:
        config: the live config (``ingest``).
        input_dir: the scans.
        name_after_input: name a NIfTI input's outputs after its file (:func:`input_name`); inputs whose names
            would clash are left out as failures.

    Raises:
        ConfigError: ``input_dir`` is not a folder.
    """
    if not input_dir.is_dir():
        # the path is not quoted: a folder named after the patient must not reach the log
        raise ConfigError("the input folder (--input) does not exist or is not a folder")
    key = load_or_create_key(config.ingest.pseudonym_key_file)
    found = discover(input_dir)
    redact = Redactor(found.identity_values)
    failures = [{"series_id": "", "source": redact(rel), "reason": redact(why)} for rel, why in found.failures]
    jobs: list[SeriesJob] = []
    for case in found.cases:
        subject = pseudonym(key, case.patient_key)
        if case.nifti_image is not None:
            rel = str(case.nifti_image.relative_to(input_dir))
            jobs.append(
                SeriesJob(
                    f"{subject}_{pseudonym(key, 'nifti:' + rel)[1:9]}", subject, "nifti", "", 0, "", (case.nifti_image,)
                )
            )
        eligible, _skipped = rank_series(case, config.ingest.series)
        for s in eligible:
            jobs.append(
                SeriesJob(
                    series_id=f"{subject}_{pseudonym(key, f'series:{s.study_uid}/{s.series_uid}')[1:9]}",
                    subject_id=subject,
                    source_format="dicom",
                    modality=s.modality,
                    series_number=s.series_number,
                    series_description=redact(s.description),
                    files=tuple(sorted(s.files)),
                )
            )
    if name_after_input:
        jobs, failures = _name_after_input(jobs, failures, input_dir, redact)
    jobs.sort(key=lambda j: j.series_id)
    return jobs, failures, redact


def _name_after_input(
    jobs: list[SeriesJob], failures: list[dict[str, str]], input_dir: Path, redact: Redactor
) -> tuple[list[SeriesJob], list[dict[str, str]]]:
    named: dict[str, list[SeriesJob]] = {}
    for job in jobs:
        if job.source_format == "nifti":
            named.setdefault(input_name(job.files[0]), []).append(job)
    # A named output must not take a pseudonymised one's name either.
    taken = {j.series_id for j in jobs if j.source_format != "nifti"}
    kept = [j for j in jobs if j.source_format != "nifti"]
    failures = list(failures)
    for name, group in named.items():
        if len(group) == 1 and name not in taken:
            kept.append(replace(group[0], output_name=name))
            continue
        for job in group:
            why = f"--name-after-input: another input is also named {name}; rename one or leave the option out"
            source = redact(str(job.files[0].relative_to(input_dir)))
            failures.append({"series_id": job.series_id, "source": source, "reason": why})
    return kept, failures


@dataclass(frozen=True)
class ModelSource:
    """The local checkpoint ``--model`` named, and the registry version it came from (if it came from one)."""

    path: Path
    registered: tracking.RegisteredModel | None = None


def resolve_model(reference: str, config: Config, cache_dir: Path) -> ModelSource:
    """The local checkpoint named by ``--model``: a file, an MLflow run id (its ``train/model.pt``), a registry
    model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) or another MLflow URI.

    A registry model is downloaded once per version into ``cache_dir/<name>-v<version>/`` (atomically, so parallel
    per-series jobs may race), and its SHA-256 is checked against the version's tag at every use.

    Raises:
        ConfigError: ``reference`` is none of these, or the artifact holds no ``model.pt``.
        ModelLoadError: a registry model's bytes do not match its registered checksum.
        MedsegError: MLflow cannot deliver the artifact.
    """
    path = Path(reference)
    if path.is_file():
        return ModelSource(path)
    if reference.startswith("models:/"):
        return _registry_model(reference, config, cache_dir)
    destination = cache_dir / hashlib.sha256(reference.encode()).hexdigest()[:12]
    if RUN_ID.match(reference):
        local = tracking.download_artifact(config.tracking, destination, run_id=reference, artifact_path=MODEL_ARTIFACT)
    elif ":/" in reference:
        local = tracking.download_artifact(config.tracking, destination, artifact_uri=reference)
    else:
        raise ConfigError(
            f"--model {reference}: not a checkpoint file, an MLflow run id (32 hex digits) or a URI like runs:/<id>/..."
        )
    if local.is_dir():
        found = sorted(local.rglob("model.pt"))
        if not found:
            raise ConfigError(f"--model {reference}: the artifact folder holds no model.pt")
        local = found[0]
    return ModelSource(local)


def _registry_model(reference: str, config: Config, cache_dir: Path) -> ModelSource:
    registered = tracking.resolve_registered(config.tracking, reference)
    final = cache_dir / f"{registered.name}-v{registered.version}" / "model.pt"
    if not final.exists():
        staging = cache_dir / f".download-{os.getpid()}-{registered.name}-v{registered.version}"
        shutil.rmtree(staging, ignore_errors=True)
        local = tracking.download_artifact(
            config.tracking, staging, run_id=registered.run_id, artifact_path=MODEL_ARTIFACT
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, final)  # whole files only; a racing job's identical copy may win, which is fine
        shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded %s (models:/%s/%s)", registered.label, registered.name, registered.version)
    actual = file_sha256(final)
    if actual != registered.sha256:
        raise ModelLoadError(
            f"--model {reference}: the downloaded model.pt of {registered.label} has SHA-256 {actual[:12]}..., the "
            f"registry says {registered.sha256[:12]}...: refusing it (delete {final.parent} to download it again)"
        )
    log.info("model %s (%s), checksum verified", registered.label, reference)
    return ModelSource(final, registered)


def model_identity(checkpoint: Path, config: Config, sha256: str | None = None) -> str:
    """What a finished series was made with: the checkpoint's bytes (``sha256`` when already known) and the
    settings that shape the outputs (infer, the CRF refinement infer applies, predict)."""
    # Where the scans are and how the model was named do not change a series' outputs.
    predict = config.predict.model_dump(mode="json", exclude={"input_dir", "model"})
    settings = {
        "infer": config.infer.model_dump(mode="json"),
        "crf": config.postprocess.crf.model_dump(mode="json"),
        "predict": predict,
    }
    text = (sha256 or file_sha256(checkpoint)) + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def outputs(output_dir: Path, job: SeriesJob) -> dict[str, Path]:
    """The files of one series; ``dicom_seg`` only for DICOM input."""
    files = {
        "nifti": output_dir / "nifti" / f"{job.stem}.nii.gz",
        "qc": output_dir / "qc" / f"{job.stem}.png",
    }
    if job.source_format == "dicom":
        files["dicom_seg"] = output_dir / "dicom_seg" / f"{job.stem}.dcm"
    return files


OUTPUT_FOLDERS = ("nifti", "dicom_seg", "qc", "records")


def record_path(output_dir: Path, stem: str) -> Path:
    """The record of the series whose outputs are named ``stem`` (:attr:`SeriesJob.stem`)."""
    return output_dir / "records" / f"{stem}.json"


def finished_record(output_dir: Path, job: SeriesJob, model_id: str) -> dict[str, Any] | None:
    """The record of a series already done with the same model and settings, if all its outputs exist."""
    path = record_path(output_dir, job.stem)
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except ValueError:
        return None  # a record is written atomically; an unreadable one was edited by hand: redo the series
    if record.get("status") != "done" or record.get("model_id") != model_id:
        return None
    if not all(p.exists() for p in outputs(output_dir, job).values()):
        return None
    return record


class ContractRefusedError(MedsegError):
    """A series the model must not predict (its contract refuses it): recorded as ``skipped``, not ``failed``."""


def predict_series(
    job: SeriesJob,
    predictor: Callable[[Image], Any],
    classes: Sequence[str],
    config: Config,
    output_dir: Path,
    contract: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    allow_any_modality: bool = False,
    model_label: str | None = None,
) -> dict[str, Any]:
    """Predict one series and write its outputs, all or nothing; returns the non-identifying facts for the summary.

    Every output is built under a temporary name and renamed into place only when all are built, the record (when
    given) last. On any error no output of the series is left, not even one of an earlier run.

    Args:
        job: the series.
        predictor: canonical :class:`Image` -> :class:`Label` on the same grid (the model, already loaded).
        classes: the model's foreground class names.
        config: the live config (``predict``, ``ingest.slice_tolerance_mm``).
        output_dir: the output folder.
        contract: the model's contract (:mod:`medseg.contract`); None or empty: no checks.
        record: the series' record to commit with the outputs (it gets the facts and status ``done``).
        allow_any_modality: predict a modality the contract does not name (flagged instead of skipped).
        model_label: the registry version (``<name> v<version>``), written into the DICOM-SEG.

    Returns:
        ``empty``, ``volume_ml`` per class, ``flags`` (contract), ``seconds`` and the ``outputs`` relative to
        ``output_dir``.

    Raises:
        ContractRefusedError: the contract refuses the series' modality (nothing is read or written; outputs of an
            earlier run are removed).
        MedsegError: the series cannot be read, its geometry is refused, or an output cannot be built.
    """
    start = time.perf_counter()
    contract = contract or {}
    modality = job.modality if job.source_format == "dicom" else None
    files = outputs(output_dir, job)
    try:
        early = model_contract.check_modality(contract, modality, allow_any_modality)
        if early.skip_reason is not None:
            raise ContractRefusedError(early.skip_reason)
        return _predict_and_commit(
            job, predictor, classes, config, output_dir, contract, record, allow_any_modality, files, start, model_label
        )
    except Exception:
        for path in files.values():
            path.unlink(missing_ok=True)  # an earlier run's outputs must not pass for this run's
        if record is not None:
            record_path(output_dir, job.stem).unlink(missing_ok=True)
        raise


def _predict_and_commit(
    job: SeriesJob,
    predictor: Callable[[Image], Any],
    classes: Sequence[str],
    config: Config,
    output_dir: Path,
    contract: dict[str, Any],
    record: dict[str, Any] | None,
    allow_any_modality: bool,
    files: dict[str, Path],
    start: float,
    model_label: str | None,
) -> dict[str, Any]:
    frames = None
    window = None
    if job.source_format == "dicom":
        series = read_series(job.files, config.ingest.slice_tolerance_mm, max_image_mb=config.ingest.max_image_mb)
        source, facts = series.image, series.facts
        window = config.predict.qc_ct_window_hu if facts.get("modality") == "CT" else None
        frames, frames_affine = source_frames(job.files, config.ingest.slice_tolerance_mm)
        if not np.allclose(frames_affine, source.affine, atol=1e-4):
            raise GeometryError("the series' frames order differently on a second read; refusing to guess")
    else:
        source = read_volume(job.files[0], Image, config.ingest.max_image_mb)
    # Several channels, NaN/Inf voxels or an unusable affine: refused with the reason, never an empty prediction.
    check_image(source, "the series" if job.source_format == "dicom" else job.files[0].name)
    canonical = to_canonical(source)
    modality = job.modality if job.source_format == "dicom" else None
    verdict = model_contract.check(contract, modality, canonical.spacing, source.array, allow_any_modality)
    if verdict.skip_reason is not None:  # the early check passed, so this is not expected; never predict it anyway
        raise ContractRefusedError(verdict.skip_reason)
    label_canonical = predictor(canonical)
    label = from_canonical(label_canonical, source.affine, source.spatial_shape)
    colors = [
        (config.predict.segments[c].color_rgb if c in config.predict.segments else None) or default_color(i)
        for i, c in enumerate(classes, start=1)
    ]
    # each class's connected components once: the DICOM-SEG's per-instance segments and the volumes below
    predict_config, instances = config.predict, None
    if frames is not None and predict_config.seg_instances:
        instances = instance_segments(label.array[0], len(classes))
        if instances is None:  # more components than segment numbers: one segment per class
            predict_config = predict_config.model_copy(update={"seg_instances": False})
    with staged() as stage:
        write_volume(label, stage.path(files["nifti"]))
        if frames is not None:
            try:
                seg = build_segmentation(label, frames, classes, predict_config, model_label, instances)
            except (ValueError, AttributeError, TypeError) as err:  # highdicom's checks of the source datasets
                raise MedsegError(f"cannot build a DICOM-SEG for this series: {type(err).__name__}: {err}") from err
            write_segmentation(seg, stage.path(files["dicom_seg"]))
        render_qc(
            canonical,
            label_canonical,
            classes,
            colors,
            stage.path(files["qc"]),
            config.predict.qc_slices,
            title=job.stem,
            window=window,
            flags=verdict.flags,
        )
        volumes = class_volumes_ml(label, len(classes))
        result = {
            "empty": not bool(label.array.any()),
            "volume_ml": dict(zip(classes, volumes, strict=True)),
            # each class's connected components (lesion 1, 2, ... largest first) and their volumes
            "instances_ml": instances_ml(label, classes, instances),
            "flags": list(verdict.flags),
            "seconds": round(time.perf_counter() - start, 2),
            "outputs": {k: str(p.relative_to(output_dir)) for k, p in files.items()},
        }
        if record is not None:
            write_json(stage.path(record_path(output_dir, job.stem)), {**record, **result, "status": "done"})
    return result


def instances_ml(
    label: Label, classes: Sequence[str], instances: tuple[np.ndarray, list[tuple[int, int]]] | None = None
) -> dict[str, list[float]]:
    """Each class's connected components' volumes (ml, largest first), from ``instances``
    (:func:`medseg.predict.dicom_seg.instance_segments` of ``label``) where given, else computed class by class."""
    if instances is None:
        return {
            c: [round(v / 1000.0, 4) for v in instance_volumes(label.array[0] == i, label.spacing)]
            for i, c in enumerate(classes, start=1)
        }
    renumbered, pairs = instances
    voxel_mm3 = float(np.prod(label.spacing))
    sizes = np.bincount(renumbered.ravel(), minlength=len(pairs) + 1)[1:]
    out: dict[str, list[float]] = {c: [] for c in classes}
    for (class_index, _), size in zip(pairs, sizes, strict=True):  # class by class, largest first
        out[classes[class_index - 1]].append(round(float(size) * voxel_mm3 / 1000.0, 4))
    return out


def job_source(job: SeriesJob, root: Path) -> str:
    """The input a series was read from, relative to ``root``: its file, or the folder holding its slices
    (identifying: redact it before it is written)."""
    folders = {str(f.parent) for f in job.files}
    where = job.files[0] if job.source_format != "dicom" or len(job.files) == 1 else Path(os.path.commonpath(folders))
    return str(where.relative_to(root)) if where.is_relative_to(root) else ""


def summary_rows(records: Sequence[dict[str, Any]], classes: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per series for ``summary.tsv`` and its columns."""
    volume_columns = [f"volume_ml_{c}" for c in classes]
    count_columns = [f"n_instances_{c}" for c in classes]
    columns = [*PLAN_COLUMNS, "status", "empty", *volume_columns, *count_columns, "seconds", "nifti", "dicom_seg"]
    columns += ["qc", "flags"]
    columns.append("reason")
    rows = []
    for r in records:
        row = {c: r.get(c) for c in [*PLAN_COLUMNS, "status", "seconds", "reason"]}
        row["empty"] = "" if r.get("empty") is None else str(bool(r["empty"])).lower()
        row["flags"] = "; ".join(r.get("flags") or [])
        row.update({f"volume_ml_{c}": r.get("volume_ml", {}).get(c) for c in classes})
        found = r.get("instances_ml")
        row.update({f"n_instances_{c}": len(found.get(c, [])) if found is not None else None for c in classes})
        row.update({k: r.get("outputs", {}).get(k, "") for k in ("nifti", "dicom_seg", "qc")})
        rows.append(row)
    return rows, columns


def write_series_list(config: Config, input_dir: Path, output_dir: Path) -> list[SeriesJob]:
    """Write ``series.tsv``: the eligible series (no identity values), for the workflow's one-job-per-series."""
    jobs, _failures, _redact = plan(config, input_dir)
    write_tsv(output_dir / "series.tsv", [j.row() for j in jobs], PLAN_COLUMNS)
    return jobs


def run(
    config: Config,
    model: str,
    input_dir: Path,
    output_dir: Path,
    series_ids: Sequence[str] | None = None,
    track: Track = _no_track,
    allow_any_modality: bool = False,
    name_after_input: bool = False,
) -> PredictResult:
    """Predict every eligible series below ``input_dir`` (or only ``series_ids``), resuming finished ones.

    Args:
        config: the live config.
        model: checkpoint path, MLflow run id, ``models:/<name>@<alias>`` or ``runs:/`` URI (see
            :func:`resolve_model`); a registry model's name and version go into every record and DICOM-SEG.
        input_dir: the scans.
        output_dir: where outputs go (see the module docstring).
        series_ids: only these series (the workflow's per-series jobs); the summary files are then not written.
        track: a progress wrapper ``(items, description, total) -> items``.
        allow_any_modality: predict series of a modality the model's contract does not name (they are flagged);
            by default they are skipped.
        name_after_input: name a NIfTI input's outputs after its file (see :func:`input_name`).

    Returns:
        Every series' record (done before, done now, skipped, failed) and the failures (skips included).

    Raises:
        ConfigError: a bad input folder, model reference, unknown series id, or segment names not in the model.
    """
    from medseg.device import select_device  # torch-heavy imports: only when a model is really used
    from medseg.infer.run import predict
    from medseg.models import load_checkpoint

    jobs, failures, redact = plan(config, input_dir, name_after_input=name_after_input)
    if series_ids is not None:
        unknown = sorted(set(series_ids) - {j.series_id for j in jobs})
        if unknown:
            raise ConfigError(f"series {', '.join(unknown)} not found below the input folder (see series.tsv)")
        jobs = [j for j in jobs if j.series_id in set(series_ids)]
    # Temporaries of a killed earlier run; a per-series job only clears its own series' (others may be running).
    folders = [output_dir, *(output_dir / f for f in OUTPUT_FOLDERS)]
    remove_partials(folders, None if series_ids is None else [j.stem for j in jobs])
    source = resolve_model(model, config, output_dir / ".model")
    checkpoint, registered = source.path, source.registered
    model_id = model_identity(checkpoint, config, registered.sha256 if registered else None)
    provenance = {"model_name": registered.name, "model_version": registered.version} if registered else {}
    state: dict[str, Any] = {}

    def predictor(image: Image) -> Any:
        return predict(state["model"], state["trained"], image, config, state["device"])

    result = PredictResult(failures=list(failures))
    records: dict[str, dict[str, Any]] = {}
    pending = []
    for job in jobs:
        done = finished_record(output_dir, job, model_id)
        if done is None:
            pending.append(job)
        else:
            records[job.series_id] = {**done, "status": "done"}
    log.info("%d series found, %d already done, %d to predict", len(jobs), len(jobs) - len(pending), len(pending))
    classes: list[str] = []
    contract: dict[str, Any] = {}
    if pending:
        state["device"] = select_device(config.infer.device)
        loaded = load_checkpoint(checkpoint, state["device"])
        state["model"], state["trained"] = loaded.network(state["device"]), loaded.config
        contract = loaded.contract
        if not contract:
            log.info("the model carries no contract (an older checkpoint): series are not checked against it")
        classes = list(state["trained"].classes)
        unknown_segments = sorted(set(config.predict.segments) - set(classes))
        if unknown_segments:
            raise ConfigError(f"predict.segments names {unknown_segments}, which are not the model's classes {classes}")
    for job in track(pending, "predict", len(pending)):
        record: dict[str, Any] = {**job.row(), "model_id": model_id, **provenance}
        try:
            facts = predict_series(
                job,
                predictor,
                classes,
                config,
                output_dir,
                contract,
                record,
                allow_any_modality=allow_any_modality,
                model_label=registered.label if registered else None,
            )
            record.update(facts, status="done")  # the record itself was committed with the outputs
            result.predicted += 1
            flagged = f" (flags: {'; '.join(facts['flags'])})" if facts["flags"] else ""
            log.info("series %s predicted%s%s", job.series_id, " (empty)" if record["empty"] else "", flagged)
        except ContractRefusedError as err:
            reason = redact(str(err))
            record.update(status="skipped", reason=reason)
            result.failures.append({"series_id": job.series_id, "source": "", "reason": reason})
            log.warning("series %s skipped: %s", job.series_id, reason)
        except Exception as err:  # the boundary of one series: any error fails it alone, the batch goes on
            debug_traceback(log, f"series {job.series_id}", redact)
            reason = redact(one_line_reason(err, str(input_dir)))
            record.update(status="failed", reason=reason)
            source = redact(job_source(job, input_dir))
            result.failures.append({"series_id": job.series_id, "source": source, "reason": reason})
            log.error("series %s failed: %s", job.series_id, reason)
        if record["status"] != "done":
            write_json(record_path(output_dir, job.stem), record)
        records[job.series_id] = {**record, "status": "predicted" if record["status"] == "done" else record["status"]}
    result.records = [records[j.series_id] for j in jobs]
    if series_ids is None:
        _write_summary(result, classes or _classes_of(result.records), output_dir)
    return result


def _classes_of(records: Sequence[dict[str, Any]]) -> list[str]:
    for r in records:
        if r.get("volume_ml"):
            return list(r["volume_ml"])
    return []


def _write_summary(result: PredictResult, classes: Sequence[str], output_dir: Path) -> None:
    rows, columns = summary_rows(result.records, classes)
    write_tsv(output_dir / "summary.tsv", rows, columns)
    instance_rows = [
        {"series_id": r["series_id"], "class": c, "instance": k, "volume_ml": v}
        for r in result.records
        for c, volumes in (r.get("instances_ml") or {}).items()
        for k, v in enumerate(volumes, start=1)
    ]
    write_tsv(output_dir / "instances.tsv", instance_rows, ["series_id", "class", "instance", "volume_ml"])
    write_tsv(output_dir / "failures.tsv", result.failures, ["series_id", "source", "reason"])
    ok = [r for r in result.records if r["status"] in ("done", "predicted")]
    write_json(
        output_dir / "summary.json",
        {
            "n_series": len(result.records),
            "n_predicted_now": result.predicted,
            "n_done_before": sum(1 for r in result.records if r["status"] == "done"),
            "n_failed": sum(1 for r in result.records if r["status"] == "failed"),
            "n_skipped": sum(1 for r in result.records if r["status"] == "skipped"),
            "n_flagged": sum(1 for r in ok if r.get("flags")),
            "n_empty": sum(1 for r in ok if r.get("empty")),
            "empty_series": [r["series_id"] for r in ok if r.get("empty")],
            "n_unusable_files": sum(1 for f in result.failures if not f["series_id"]),
            "classes": list(classes),
        },
    )
