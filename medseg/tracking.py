"""Experiment tracking. The only module that imports mlflow.

Default backend: a SQLite database file (``sqlite:///results/mlflow.db``) with artifacts in a folder beside it;
``tracking.uri`` may name a server instead. One MLflow run per workflow invocation: ``train`` starts it and
writes its id to ``run.json``; later stages (``evaluate``) log into the same run by that id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig
from medseg.errors import MedsegError, TrackingError
from medseg.io import file_sha256

log = logging.getLogger(__name__)

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def _uri(config: TrackingConfig) -> str:
    uri = config.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path is relative to the working directory; make sure its folder exists.
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _experiment_id(config: TrackingConfig) -> str:
    mlflow.set_tracking_uri(_uri(config))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if "://" in str(config.artifact_dir):
        location = str(config.artifact_dir)  # e.g. s3://bucket/medseg
    elif not _is_server(config.uri):
        # a local store keeps artifacts in a local folder; a server keeps them where it was told
        # (--artifacts-destination, uploaded through it), so the cluster's nodes need no shared artifact folder
        config.artifact_dir.mkdir(parents=True, exist_ok=True)
        location = config.artifact_dir.resolve().as_uri()
    return mlflow.create_experiment(config.experiment, artifact_location=location)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit() -> str:
    """The commit of the code that runs, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def run(
    config: TrackingConfig, run_id: str | None = None, run_name: str | None = None, system_metrics: bool = False
) -> Iterator[str]:
    """Open (or re-open, by ``run_id``) an MLflow run; yields its id. Ends it as FAILED on an exception.

    ``system_metrics``: MLflow samples CPU, memory, disk and network (and NVIDIA GPUs, through nvidia-ml-py) every
    ``config.system_metrics_interval_s`` seconds into ``system/*`` metrics of the run.
    """
    experiment_id = _experiment_id(config)
    sample = system_metrics and config.system_metrics_interval_s is not None
    if sample:
        mlflow.system_metrics.set_system_metrics_sampling_interval(config.system_metrics_interval_s)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=run_name,
        log_system_metrics=sample or None,
    ) as r:
        yield r.info.run_id


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params(flatten(params))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def client(config: TrackingConfig) -> MlflowClient:
    """A client on the configured backend, for reading runs back (tests, reports)."""
    return MlflowClient(tracking_uri=_uri(config))


def download_artifact(
    config: TrackingConfig,
    destination: Path,
    *,
    run_id: str | None = None,
    artifact_path: str | None = None,
    artifact_uri: str | None = None,
) -> Path:
    """Download one artifact (a file or folder) of a run: by ``run_id`` and ``artifact_path``, or by a URI
    such as ``runs:/<run id>/train/model.pt``.

    Returns:
        The local path of the downloaded file or folder, below ``destination``.

    Raises:
        MedsegError: the run or the artifact does not exist, or the backend cannot be reached.
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri,
            run_id=run_id,
            artifact_path=artifact_path,
            dst_path=str(destination),
            tracking_uri=_uri(config),
        )
    except Exception as err:  # MlflowException, OSError and backend-specific errors alike
        what = artifact_uri or f"artifact {artifact_path} of run {run_id}"
        raise MedsegError(f"cannot download {what} from {config.uri}: {type(err).__name__}: {err}") from err
    return Path(local)


def log_pytorch_model(model: Any, input_example: Any, output_example: Any, name: str = "model") -> None:
    """Log a torch module as an MLflow pytorch model with its signature and input example.

    Requirements are pinned from the running versions, so MLflow does not spend a minute inferring them. Saved as
    ``torch.export``'s ``model.pt2`` (MLflow 3's default, named so that a change of default cannot bring back
    the pickle, which runs code when it is loaded).
    """
    import mlflow.pytorch
    import monai
    import torch
    from mlflow.models import infer_signature

    mlflow.pytorch.log_model(
        model,
        name=name,
        signature=infer_signature(input_example, output_example),
        input_example=input_example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"],
        serialization_format="pt2",
    )


# --- the model registry: the hand-off from a reviewed training run to batch inference -------------------------------

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
MODEL_SHA256_TAG = "model_sha256"


@dataclass(frozen=True)
class RegisteredModel:
    """One version of a registered model: where its ``model.pt`` comes from and what it must hash to."""

    name: str
    version: str
    run_id: str
    sha256: str

    @property
    def label(self) -> str:
        """How outputs name the model: ``<name> v<version>``."""
        return f"{self.name} v{self.version}"


def register_model(
    config: TrackingConfig, run_id: str, name: str, checkpoint: Path, tags: Mapping[str, str]
) -> RegisteredModel:
    """Register the run's ``train/`` artifacts (``model.pt``) as a new version of ``name``; the version is tagged
    with the checkpoint's SHA-256 (checked by :func:`resolve_registered`) and ``tags`` (metrics, manifest digest).
    """
    mlflow_client = client(config)
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(name, description="medseg segmentation model (model.pt in train/)")
    sha = file_sha256(checkpoint)
    version = mlflow_client.create_model_version(
        name, f"runs:/{run_id}/train", run_id=run_id, tags={MODEL_SHA256_TAG: sha, **tags}
    )
    log.info("registered the model as %s version %s", name, version.version)
    return RegisteredModel(name, str(version.version), run_id, sha)


def set_alias(config: TrackingConfig, name: str, version: str, alias: str) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` (moving the alias from any other version).

    Raises:
        MedsegError: no such model version, or the registry cannot be reached.
    """
    try:
        client(config).get_model_version(name, version)
        client(config).set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        raise MedsegError(f"cannot set alias {alias} on {name} version {version}: {err.message}") from err


def registered_version(config: TrackingConfig, run_id: str, name: str) -> str:
    """The version of ``name`` registered from run ``run_id`` (the newest, if several).

    Raises:
        MedsegError: the run registered no version of ``name``.
    """
    versions = client(config).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise MedsegError(f"run {run_id} registered no version of model {name}")
    return str(max(int(v.version) for v in versions))


def resolve_registered(config: TrackingConfig, uri: str) -> RegisteredModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> the version it names now.

    Raises:
        MedsegError: a malformed URI, an unknown model, alias or version, or an unreachable registry.
    """
    match = REGISTRY_URI.match(uri)
    if match is None:
        raise MedsegError(f"--model {uri}: a registry model is models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = (
            client(config).get_model_version_by_alias(name, alias)
            if alias
            else client(config).get_model_version(name, version)
        )
    except MlflowException as err:
        raise MedsegError(f"--model {uri}: not found in the registry at {safe_uri(config.uri)}: {err.message}") from err
    sha = found.tags.get(MODEL_SHA256_TAG)
    if not sha or not found.run_id:
        raise MedsegError(f"--model {uri}: version {found.version} was not registered by medseg (no checksum tag)")
    return RegisteredModel(name, str(found.version), found.run_id, sha)


def has_dataset_input(config: TrackingConfig, run_id: str) -> bool:
    """Whether the run already has a dataset input (:func:`log_dataset`)."""
    return bool(client(config).get_run(run_id).inputs.dataset_inputs)


def log_dataset(manifest: Path, name: str, digest: str) -> None:
    """The data manifest as the run's MLflow dataset input (context ``training``): the dashboard's Datasets column."""
    import pandas as pd
    from mlflow.data import from_pandas

    frame = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways": a local file
        dataset = from_pandas(frame, source=str(manifest), name=name, digest=digest[:16])
    mlflow.log_input(dataset, context="training")


# --- reaching a tracking server ----------------------------------------------------------------------------------


def safe_uri(uri: str) -> str:
    """``uri`` without a password (for messages and logs)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(config: TrackingConfig, timeout_s: float = 10.0) -> None:
    """Fail fast when the tracking backend cannot be reached (a server down, a wrong URI, refused credentials),
    before a workflow spends hours on work it could not record. Local SQLite and file stores always pass.

    Raises:
        TrackingError: the backend did not answer a one-experiment search within ``timeout_s`` (no retries).
    """
    uri = config.uri
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # MlflowException, connection and database errors alike
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise TrackingError(
            f"cannot reach the MLflow tracking server tracking.uri={safe_uri(uri)}: {type(err).__name__}: "
            f"{safe_uri(first)}. Start it (see README, 'A team MLflow server'), or fix tracking.uri; credentials "
            "come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
