"""Configuration: one pydantic model per stage, validated on load.

A YAML file in ``configs/`` is the single source of truth for a run. Unknown or mistyped keys fail with the
key's dotted name and the file. ``Config.digest()`` is the run's identity: a hash of the full resolved config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError

Triple = tuple[float, float, float]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    """Where inputs and outputs live, relative to the working directory."""

    raw_dir: Path = Path("data/demo_raw")
    results_dir: Path = Path("results")
    manifests_dir: Path = Path("data_manifests")


class DemoDataConfig(_Section):
    """The synthetic demo cohort that `medseg demo-data` writes into ``paths.raw_dir``."""

    enabled: bool = True
    n_patients: int = Field(14, ge=4)
    n_dicom: int = Field(8, ge=0, description="how many patients are written as DICOM series")
    seed: int = 7
    spacing_mm: Triple = (0.8, 0.8, 2.5)
    shape_vox: tuple[int, int, int] = (96, 96, 28)


class SplitConfig(_Section):
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 so that some patients train")
        return self


class SeriesRuleConfig(_Section):
    """Which DICOM series of a study becomes the patient's image; every other series is recorded as skipped."""

    modalities: list[str] = ["CT", "MR"]
    description_include: str | None = Field(None, description="regex a SeriesDescription must match")
    description_exclude: str | None = Field(None, description="regex a SeriesDescription must not match")
    min_slices: int = Field(3, ge=1)


class IngestConfig(_Section):
    split: SplitConfig = SplitConfig()
    series: SeriesRuleConfig = SeriesRuleConfig()
    pseudonym_key_file: Path = Field(
        Path("secrets/pseudonym.key"),
        description="secret key of the keyed hash that makes patient ids; created on first use if missing",
    )
    id_map_file: Path | None = Field(None, description="if set, the pseudonym -> source id map is written here")
    slice_tolerance_mm: float = Field(0.05, gt=0, description="allowed deviation of slice steps")
    label_tolerance_mm: float = Field(0.01, gt=0, description="allowed grid mismatch of a label and its image")


class ResampleConfig(_Section):
    target_spacing_mm: Triple = (1.6, 1.6, 2.5)
    normalization: Literal["ct", "zscore"] = "ct"
    ct_clip_hu: tuple[float, float] = (-200.0, 300.0)

    @field_validator("target_spacing_mm")
    @classmethod
    def _positive(cls, value: Triple) -> Triple:
        if any(v <= 0 for v in value):
            raise ValueError("every spacing must be positive")
        return value


class TrainConfig(_Section):
    network: Literal["unet"] = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    loss: Literal["dice_ce", "dice_bce", "focal"] = "dice_ce"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(40, ge=1)
    iterations_per_epoch: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)
    patch_size_vox: tuple[int, int, int] = (48, 48, 24)
    val_every_epochs: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: Snakemake's threads")

    @model_validator(mode="after")
    def _strides_match_channels(self) -> TrainConfig:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("train.strides needs one entry fewer than train.channels")
        return self


class InferConfig(_Section):
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PostprocessConfig(_Section):
    min_component_mm3: float = Field(50.0, ge=0.0)


class EvaluateConfig(_Section):
    boundary_tolerance_mm: float = Field(2.0, gt=0.0)


class TrackingConfig(_Section):
    uri: str = Field("sqlite:///results/mlflow.db", description="MLflow tracking URI: a SQLite file or a server")
    artifact_dir: Path = Field(Path("results/mlartifacts"), description="artifact root for a new experiment")
    experiment: str = "medseg"


class Config(_Section):
    """The whole resolved configuration of a medseg run."""

    dataset: str = Field("demo", pattern=r"^[A-Za-z0-9_-]+$")
    classes: list[str] = Field(["organ_a", "organ_b"], min_length=1, description="foreground names, label 1..N")
    paths: PathsConfig = PathsConfig()
    demo_data: DemoDataConfig = DemoDataConfig()
    ingest: IngestConfig = IngestConfig()
    resample: ResampleConfig = ResampleConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def num_classes(self) -> int:
        """Number of output channels, background included."""
        return len(self.classes) + 1

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short stable hash of the resolved config: the run's identity."""
        return _digest(self.to_dict())

    def section_digest(self, section: str) -> str:
        """Hash of one stage's section (and the keys every stage shares), for Snakemake rerun triggers."""
        data = self.to_dict()
        return _digest({"section": data[section], "dataset": data["dataset"], "classes": data["classes"]})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def validate_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a config mapping.

    Args:
        data: the parsed YAML (or Snakemake's ``config`` dict).
        source: where it came from, for the error message.

    Returns:
        The validated, fully resolved config.

    Raises:
        ConfigError: naming every bad key (dotted) and the source.
    """
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top level>"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid config {source}: " + "; ".join(problems)) from err


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file.

    >>> cfg = load_config("configs/default.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return validate_config(data or {}, source=str(path))
