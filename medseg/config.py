"""Configuration: one pydantic model per stage, validated on load.

A YAML file in ``configs/`` is the single source of truth for a run. Unknown or mistyped keys fail with the
key's dotted name and the file. ``Config.digest()`` is the run's identity: a hash of the full resolved config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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
    kind: Literal["ct", "xray"] = Field(
        "ct", description="ct: CT/NIfTI volumes per patient folder; xray: 2D chest radiographs (PNG, nnU-Net 2D layout)"
    )
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
    exclude_derived: bool = Field(
        True, description="skip series whose ImageType is DERIVED (crops, reformats, maps): not acquisitions"
    )


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
    label_overlap: Literal["refuse", "last_wins"] = Field(
        "refuse",
        description="DICOM-SEG/RTSTRUCT segments that overlap: refuse the label, or let the higher segment win",
    )
    nifti_modality: str | None = Field(
        None,
        description="modality (CT, MR, ...) of NIfTI/NRRD inputs that do not say (MSD folders say it in dataset.json)",
    )
    max_image_mb: float = Field(
        4096.0,
        gt=0,
        description="largest image read (declared shape x bytes per voxel, MiB), checked from the headers before "
        "any pixel is allocated; ingest and predict refuse larger ones",
    )


Normalization = Literal["ct", "zscore", "window"]


class ResampleConfig(_Section):
    """Target grid and intensity normalisation. ``null`` keys come from the data plan (``results/plan/plan.json``)."""

    target_spacing_mm: Triple | None = Field(None, description="null: the plan's (nnU-Net's rule)")
    normalization: Normalization | None = Field(
        None,
        description="ct: clip to the training foreground's 0.5-99.5 percentiles, z-score with its mean and std "
        "(nnU-Net's CT scheme); zscore: per scan (MR); window: clip to ct_clip_hu, map to [-1, 1]; null: the plan's "
        "(ct for CT training data, zscore otherwise)",
    )
    intensity_clip: tuple[float, float] | None = Field(None, description="ct: null = the plan's foreground percentiles")
    intensity_mean: float | None = Field(None, description="ct: null = the plan's foreground mean")
    intensity_std: float | None = Field(None, gt=0, description="ct: null = the plan's foreground std")
    ct_clip_hu: tuple[float, float] = Field((-200.0, 300.0), description="window: the HU window mapped to [-1, 1]")
    label_interpolation: Literal["nearest", "onehot_linear"] = Field(
        "nearest", description="labels: nearest neighbour, or one-hot linear then argmax (smoother on coarse grids)"
    )

    @field_validator("target_spacing_mm")
    @classmethod
    def _positive(cls, value: Triple | None) -> Triple | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("every spacing must be positive")
        return value


class AugmentConfig(_Section):
    """Training augmentation. Spatial transforms move image and mask together.

    The values below are nnU-Net's recipe (``preset: nnunet``). ``preset: light`` (flips, rotation and scaling
    more often but milder, mild intensity changes, no blur or simulated low resolution) suits the few thousand
    iterations a CPU budget buys; ``auto`` picks nnunet on a GPU and light on a CPU. A key set in the config wins
    over the preset.
    """

    preset: Literal["auto", "nnunet", "light"] = "auto"
    flip_prob: float = Field(0.5, ge=0, le=1, description="mirroring, per axis")
    rotation_prob: float = Field(0.2, ge=0, le=1)
    rotation_deg: float = Field(30.0, ge=0, le=180, description="+/- range; 3D: every axis, 2D: in-plane")
    in_plane_only: bool = Field(
        False, description="3D: rotate about Z and scale X, Y only (nnU-Net's 'dummy 2D' for thick-slice data)"
    )
    scale_prob: float = Field(0.2, ge=0, le=1)
    scale_range: tuple[float, float] = (0.7, 1.4)
    label_interpolation: Literal["nearest", "linear"] = Field(
        "nearest",
        description="how rotation and scaling resample the mask: nearest neighbour, or linear (each class's "
        "one-hot interpolated, then the largest; nnU-Net's default), which keeps boundaries smooth but lost 0.004 "
        "Dice on the hippocampus benchmark (BENCHMARKS.md, session 18)",
    )
    elastic_prob: float = Field(0.0, ge=0, le=1, description="elastic deformation (3D only; off in nnU-Net)")
    noise_prob: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(0.1, ge=0)
    blur_prob: float = Field(0.2, ge=0, le=1)
    brightness_prob: float = Field(0.15, ge=0, le=1)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = Field(0.15, ge=0, le=1)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    low_resolution_prob: float = Field(0.25, ge=0, le=1)
    gamma_prob: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)


class ClicksConfig(_Section):
    """Click-guided training (DeepEdit-style, see :mod:`medseg.clicks`): the network also sees one guidance channel
    per class (Gaussian blobs at the clicks on that class; a background click says "not this") and the mask being
    corrected, so ``medseg refine`` can correct a mask from a few clicks. Changes the network's input channels."""

    enabled: bool = False
    auto_prob: float = Field(
        0.3, ge=0, le=1, description="share of training patches without clicks or a mask (the model stays automatic)"
    )
    max_clicks: int = Field(5, ge=1, le=50, description="simulated corrective clicks per patch: 1 to this many")
    sigma_vox: float = Field(2.0, gt=0, description="Gaussian width of a click's guidance blob, network-grid voxels")


class TrainConfig(_Section):
    """Training. Keys left ``null`` are resolved from the data plan (``plan.json``); a value here overrides it."""

    network: Literal["auto", "dynunet", "unet", "segresnet", "deeplab", "swin_unetr", "unetr"] = Field(
        "auto",
        description="auto: the plan picks dynunet (nnU-Net's) on a GPU, MONAI's residual unet on a CPU (faster "
        "there); deeplab: atrous encoder + ASPP head; swin_unetr / unetr: MONAI's transformer encoders (the patch "
        "is rounded up to a multiple of 32 / 16)",
    )
    spatial_dims: Literal[2, 3] = Field(3, description="2: the network sees XY slices (patch Z must be 1)")
    channels: tuple[int, ...] | None = Field(None, description="features per level; null: from the plan")
    strides: tuple[int | tuple[int, ...], ...] | None = Field(
        None, description="down-sampling stride between levels (len(channels) - 1); null: from the plan"
    )
    kernel_sizes: tuple[int | tuple[int, ...], ...] | None = Field(
        None, description="dynunet convolution kernel per level (len(channels)); null: from the plan"
    )
    num_res_units: int = Field(2, ge=0, description="unet only")
    deep_supervision: bool = Field(True, description="dynunet only: losses on 2 coarser decoder outputs too")
    loss: Literal["dice_ce", "dice_bce", "focal", "ce"] = "dice_ce"
    dice_bce_alpha: float = Field(0.5, ge=0, le=1, description="dice_bce = alpha * Dice + (1 - alpha) * BCE")
    dice_background: bool = Field(True, description="dice_ce: background in the Dice term (nnU-Net leaves it out)")
    batch_dice: bool = Field(False, description="dice_ce: one Dice over the whole batch, not one per patch")
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, ge=0, le=1, description="focal: weight of foreground, 1-alpha bg")
    class_weights: tuple[float, ...] | None = Field(None, description="ce / dice_ce: CE weight per class incl. bg")
    ignore_index: int | None = Field(None, description="ce / focal: label value of unlabelled voxels")
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(3e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="sgd (Nesterov)")
    schedule: Literal["poly", "cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warm-up share of the run")
    grad_clip_norm: float | None = Field(12.0, gt=0)
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="validate and keep an exponential moving average of the weights (e.g. 0.999); null: off",
    )
    amp: bool = Field(
        True,
        description="mixed precision: float16 on CUDA, bfloat16 on a CPU with native bf16 (AMX / AVX512-BF16), "
        "float32 on other CPUs",
    )
    compile: bool | None = Field(
        None, description="torch.compile the network for training steps; null: on a CPU for runs of 10+ minutes"
    )
    channels_last: bool | None = Field(
        None,
        description="channels-last memory layout of the network and its input batches; null: on a CPU when compiled "
        "and training in float32 (12-20% faster there; under bfloat16 1.45x slower, BENCHMARKS.md)",
    )
    channels_last_narrow: bool | None = Field(
        None,
        description="on a CPU, run the 2D and 3D convolutions whose channel counts are not a multiple of 16 (e.g. the "
        "last 3 -> 3 of MONAI's UNet) on channels-last input; null: per layer where timing it both ways at the "
        "start of training says it pays (3-5x faster for that layer on an AMD Zen 4), never in deterministic runs",
    )
    deterministic: bool = Field(False, description="deterministic algorithms (slower); always seeded")
    epochs: int | None = Field(
        None, ge=1, description="null: unbounded when max_minutes is set, else the plan's budget"
    )
    iterations_per_epoch: int = Field(20, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="wall-clock budget; the LR schedule then runs on elapsed time, not epochs"
    )
    batch_size: int | None = Field(None, ge=1, description="null: from the plan")
    patch_size_vox: tuple[int, int, int] | None = Field(None, description="null: from the plan")
    samples_per_volume: int = Field(1, ge=1, description="patches cut from one volume per draw")
    foreground_fraction: float = Field(0.67, ge=0, le=1, description="share of patches centred on foreground")
    augment: AugmentConfig = AugmentConfig()
    clicks: ClicksConfig = ClicksConfig()
    val_every_epochs: int = Field(5, ge=1)
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without improvement"
    )
    keep_weights: Literal["best", "final"] | None = Field(
        None,
        description="the weights model.pt keeps: final (the end of training, as nnU-Net's checkpoint_final) or "
        "best (the best validation Dice's); null: final, or best when early_stopping_patience is set",
    )
    folds: int | None = Field(None, ge=2, description="k-fold cross-validation over train+val patients")
    fold: int = Field(0, ge=0, description="which fold validates when folds is set")
    log_model: bool = Field(True, description="log model.pt (the kept weights) to MLflow as an MLflow pytorch model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: Snakemake's threads")
    num_workers: int | None = Field(
        None, ge=0, description="processes drawing and augmenting batches (0: the training process); null: by cores"
    )
    processes: int | Literal["auto"] = Field(
        "auto",
        description="DDP training processes on this node (torchrun): auto = one per visible CUDA device; on a CPU "
        "a number > 1 runs gloo processes (for tests); the global batch is split over them",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.channels is not None and self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError("train.strides needs one entry fewer than train.channels")
        if self.channels is not None and self.kernel_sizes is not None and len(self.kernel_sizes) != len(self.channels):
            raise ValueError("train.kernel_sizes needs one entry per train.channels")
        if self.spatial_dims == 2 and self.patch_size_vox is not None and self.patch_size_vox[2] != 1:
            raise ValueError("train.spatial_dims 2 needs train.patch_size_vox [X, Y, 1]")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"train.fold must be below train.folds ({self.folds})")
        if self.ignore_index is not None and self.loss not in ("ce", "focal"):
            raise ValueError("train.ignore_index works with loss ce or focal only")
        return self


Strides = tuple[int | tuple[int, ...], ...]


class Recipe(TrainConfig):
    """A train section the plan resolved (:func:`medseg.plan.functional.resolve_train`): the network, its levels,
    the patch, the batch and the budget are all set. Training takes a recipe, so nothing downstream is optional."""

    network: Literal["dynunet", "unet", "segresnet", "deeplab", "swin_unetr", "unetr"]
    channels: tuple[int, ...]
    strides: Strides
    kernel_sizes: Strides
    batch_size: int = Field(ge=1)
    patch_size_vox: tuple[int, int, int]
    epochs: int = Field(ge=1)


def recipe_of(train: TrainConfig) -> Recipe:
    """``train`` as a :class:`Recipe`.

    Raises:
        ConfigError: a planned key is still null (no plan was applied).
    """
    if isinstance(train, Recipe):
        return train
    try:
        return Recipe.model_validate(train.model_dump())
    except ValidationError as err:
        missing = sorted({str(e["loc"][0]) for e in err.errors()})
        raise ConfigError(f"train keys {missing} are not resolved: apply the plan (results/plan/plan.json)") from err


class PlanConfig(_Section):
    """How the data plan (``medseg plan``) turns the fingerprint into settings."""

    max_patch_voxels: int = Field(160_000, ge=4096, description="patch budget; nnU-Net's GPU patches are ~10x larger")
    max_batch_voxels: int = Field(
        400_000, ge=4096, description="batch_size * patch voxels stays below this (CPU-sized; raise it on a GPU)"
    )
    base_features: int | None = Field(
        None,
        ge=4,
        description="features of the first level; null: 32 on a GPU (nnU-Net), 16 on a CPU (8 for a dynunet there)",
    )
    max_features: int = Field(256, ge=8)
    min_feature_map_vox: int = Field(4, ge=2, description="stop down-sampling an axis below this size")
    max_cases: int = Field(200, ge=1, description="fingerprint at most this many training cases")


class JobsConfig(_Section):
    """How the workflow cuts per-case stages (resample, infer, postprocess) into jobs, and what each job asks a
    cluster executor for (Snakemake's ``mem_mb``, ``runtime`` and ``gpu`` resources; a profile's
    ``set-resources`` still wins)."""

    cases_per_job: int = Field(
        40,
        ge=1,
        description="cases one resample/infer/postprocess job handles (a pool inside); 1: a job per case (big CTs "
        "on a cluster)",
    )
    gpus: int = Field(1, ge=0, description="GPUs a train or infer job asks for (0: a CPU-only cluster)")
    mem_mb: dict[str, int] = Field(
        default_factory=dict, description="memory per job by rule name, over medseg's defaults (e.g. train: 64000)"
    )
    runtime_min: dict[str, int] = Field(
        default_factory=dict, description="wall-time limit (minutes) per job by rule name, over medseg's defaults"
    )


class InferConfig(_Section):
    """Sliding-window prediction and the way back to the scan's original grid."""

    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="window overlap (nnU-Net 0.5; MONAI's default 0.25)")
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int | None = Field(
        None, ge=1, description="windows per forward pass; null: sized to the device (CPU 8, CUDA from free memory)"
    )
    mirror: bool | Literal["auto"] = Field(
        "auto",
        description="mirroring test-time augmentation (average over the 2^n flips of mirror_axes); auto: on a GPU, "
        "and on a CPU for scans of at most mirror_auto_max_windows windows, where it costs little",
    )
    mirror_auto_max_windows: int = Field(8, ge=0, description="auto mirroring on a CPU: largest scan, in windows")
    mirror_axes: tuple[int, ...] = Field((0, 1, 2), description="array axes to flip; all 2^n combinations are used")
    resample_memory_mb: float = Field(
        128.0, gt=0, description="working memory of the resampling back to the original grid, done in slabs"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value) or any(a not in (0, 1, 2) for a in value):
            raise ValueError("mirror_axes must be distinct spatial axes among 0, 1, 2")
        return value


class ClassPostprocessConfig(_Section):
    """Overrides for one class; an unset key falls back to the ``postprocess`` section's value."""

    min_component_mm3: float | None = Field(None, ge=0.0)
    keep_largest_n: int | None = Field(None, ge=0)
    fill_holes: bool | None = None


class CrfConfig(_Section):
    """Mean-field CRF refinement of the probabilities with the image (medseg.postprocess.crf), inside ``infer``
    before the argmax (the probabilities exist only there).

    The defaults are an appearance-only kernel on the 26 neighbours with a sharp intensity term, chosen on the
    validation cases of four hippocampus models (BENCHMARKS.md, session 14): it moves the network's boundary onto
    nearby intensity edges (MONAI's UNet has no full-resolution features; its logits are upsampled from half
    resolution)."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="auto: decided at the end of training on the validation cases by nnU-Net's rule (on only if the "
        "mean foreground Dice rises and no class's falls by more than 0.001), recorded in model.pt and "
        "train/crf_decision.json; true / false: always / never",
    )
    iterations: int = Field(5, ge=1)
    window_vox: int = Field(1, ge=1, le=4, description="neighbours within this many voxels per axis exchange messages")
    weight: float = Field(1.0, gt=0, description="pairwise strength against the network's log-probabilities")
    spatial_sigma_mm: float = Field(1.5, gt=0, description="appearance kernel: spatial scale")
    intensity_sigma: float = Field(0.25, gt=0, description="appearance kernel: intensity scale (normalised units)")
    smoothness_sigma_mm: float = Field(1.5, gt=0, description="smoothness kernel: spatial scale")
    smoothness_share: float = Field(0.0, ge=0, le=1, description="share of the smoothness kernel in the pairwise term")


class PostprocessConfig(_Section):
    """Connected-component clean-up, applied in this order: small components, largest N, holes; and the optional
    CRF refinement of the probabilities (applied by ``infer``)."""

    min_component_mm3: float = Field(50.0, ge=0.0, description="components smaller than this become background")
    keep_largest_n: int = Field(0, ge=0, description="keep the N largest components of a class; 0 keeps all")
    fill_holes: bool = Field(False, description="fill cavities enclosed by one class")
    per_class: dict[str, ClassPostprocessConfig] = Field(
        default_factory=dict, description="overrides by class name, e.g. {organ_b: {keep_largest_n: 1}}"
    )
    auto_keep_largest: bool = Field(
        True,
        description="workflow: decide keep-largest per class from the validation patients' predictions (nnU-Net's "
        "rule: only where the mean Dice improves and no class gets worse); the decision is postprocess/decision.json",
    )
    crf: CrfConfig = CrfConfig()


class EvaluateConfig(_Section):
    boundary_tolerance_mm: float = Field(2.0, gt=0.0, description="tolerance of boundary F1")
    surface_dice_tolerance_mm: float = Field(2.0, gt=0.0, description="tolerance of normalised surface Dice")
    hausdorff_percentile: float = Field(95.0, gt=0.0, le=100.0, description="95 gives HD95")
    instance_iou_threshold: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="lesion-wise detection: a reference instance (connected component) is found, a predicted one "
        "true, when an instance of the other side overlaps it with at least this IoU",
    )


class CodeConfig(_Section):
    """A coded concept (DICOM: CodeValue, CodingSchemeDesignator, CodeMeaning), e.g. a SNOMED CT term."""

    value: str
    scheme: str = "SCT"
    meaning: str


TISSUE_CODE = CodeConfig(value="85756007", scheme="SCT", meaning="Tissue")


class SegmentConfig(_Section):
    """How one class appears as a segment of the DICOM-SEG and in the QC pictures."""

    label: str | None = Field(None, description="segment name shown in viewers; default: the class name")
    color_rgb: tuple[int, int, int] | None = Field(None, description="0-255 RGB; default: from a fixed palette")
    category: CodeConfig = Field(TISSUE_CODE, description="DICOM SegmentedPropertyCategoryCodeSequence")
    type: CodeConfig = Field(TISSUE_CODE, description="DICOM SegmentedPropertyTypeCodeSequence")

    @field_validator("color_rgb")
    @classmethod
    def _rgb_range(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(not 0 <= v <= 255 for v in value):
            raise ValueError("every colour component must be within 0-255")
        return value


class PredictConfig(_Section):
    """`medseg predict`: a folder of new scans in; NIfTI, DICOM-SEG and a QC picture per series out."""

    input_dir: Path | None = Field(None, description="folder of new scans for the workflow's predict_all target")
    model: str | None = Field(
        None,
        description="checkpoint, MLflow run id, runs:/ URI or models:/<name>@<alias> for predict_all; default: the "
        "workflow's model",
    )
    segments: dict[str, SegmentConfig] = Field(
        {}, description="per class name: segment label, colour and codes; a class left out gets defaults"
    )
    qc_slices: int = Field(5, ge=1, le=12, description="slices shown in each QC picture")
    qc_ct_window_hu: tuple[float, float] = Field(
        (-160.0, 240.0), description="grey window of CT QC pictures (soft tissue, W400 L40); others: percentiles"
    )
    seg_series_number: int = Field(9900, ge=1, description="SeriesNumber of the DICOM-SEG objects written")
    seg_series_description: str = Field("medseg segmentation", max_length=64)
    manufacturer: str = Field("medseg", description="written as the DICOM-SEG's Manufacturer")
    seg_instances: bool = Field(
        False,
        description="one DICOM-SEG segment per instance (connected component: 'lesion 1', 'lesion 2', ... largest "
        "first, each with a TrackingID) instead of one per class",
    )


class ReportConfig(_Section):
    """`medseg report`: one self-contained HTML page per run."""

    worst_patients: int = Field(3, ge=0, description="how many of the worst patients get QC pictures")
    worst_metric: str = Field("dice", description="metrics.tsv column that ranks patients (mean over classes)")
    metrics: list[str] | None = Field(None, description="metrics.tsv columns to plot; default: every numeric one")


class TrackingConfig(_Section):
    uri: str = Field(
        "sqlite:///results/mlflow.db",
        description="MLflow tracking URI: a SQLite file or a server (http://host:5000); never credentials: a "
        "server's come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
    )
    artifact_dir: Path = Field(
        Path("results/mlartifacts"),
        description="artifact root for a new experiment with a local store (a server uses its own, unless this is "
        "a URI such as s3://...)",
    )
    experiment: str = "medseg"
    system_metrics_interval_s: float | None = Field(
        10.0,
        gt=0,
        description="training runs sample CPU, memory, disk (GPU through nvidia-ml-py) as system/* metrics "
        "every this many seconds (MLflow's system metrics); null: off",
    )
    register_model: bool = Field(
        True, description="a finished training (or fold ensemble) registers its model.pt as a new model version"
    )
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="registered model name; null: medseg-<dataset>"
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        try:
            password = urlsplit(uri).password
        except ValueError:  # e.g. an invalid port: let MLflow say what is wrong with it
            password = None
        if password is not None:
            raise ValueError(
                "tracking.uri must not hold a password (user:password@host): a config is committed and logged; "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment instead (a database "
                "URI such as postgresql://user@host/db takes its password from PGPASSWORD)"
            )
        return uri


class Config(_Section):
    """The whole resolved configuration of a medseg run."""

    dataset: str = Field("demo", pattern=r"^[A-Za-z0-9_-]+$")
    classes: list[str] = Field(["organ_a", "organ_b"], min_length=1, description="foreground names, label 1..N")
    paths: PathsConfig = PathsConfig()
    demo_data: DemoDataConfig = DemoDataConfig()
    ingest: IngestConfig = IngestConfig()
    resample: ResampleConfig = ResampleConfig()
    plan: PlanConfig = PlanConfig()
    jobs: JobsConfig = JobsConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    predict: PredictConfig = PredictConfig()
    report: ReportConfig = ReportConfig()
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
            elif key == "tracking.uri":  # may hold a password: never echoed
                problems.append(f"key '{key}': {e['msg']}")
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
