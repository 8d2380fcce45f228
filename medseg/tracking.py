"""Experiment tracking. The only module that imports mlflow.

Default backend: a SQLite database file (``sqlite:///results/mlflow.db``) with artifacts in a folder beside it;
``tracking.uri`` may name a server instead. One MLflow run per workflow invocation: ``train`` starts it and
writes its id to ``run.json``; later stages (``evaluate``) log into the same run by that id.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig
from medseg.errors import MedsegError

log = logging.getLogger(__name__)

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def _uri(config: TrackingConfig) -> str:
    uri = config.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path is relative to the working directory; make sure its folder exists.
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _experiment_id(config: TrackingConfig) -> str:
    mlflow.set_tracking_uri(_uri(config))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if "://" not in str(config.artifact_dir):
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

    ``system_metrics``: MLflow samples CPU, memory, disk and network (and the GPUs, where nvidia-ml-py is
    installed) every ``config.system_metrics_interval_s`` seconds into ``system/*`` metrics of the run.
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

    Requirements are pinned from the running versions, so MLflow does not spend a minute inferring them.
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
    )
