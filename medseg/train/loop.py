"""The training loop on in-memory volumes: sampling, optimisation, validation, checkpoints, resume, budget.

``fit`` is what ``medseg train`` runs after loading the manifest, and what the benchmarks call directly.
It is resumable: ``last.pt`` is written atomically after every epoch with the optimiser, schedule, scaler, random
state, history and MLflow run id, and ``fit`` continues from it when it finds one made by the same config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medseg import tracking
from medseg.clicks import ClickSimulator, extra_channels, input_channels
from medseg.config import Config, InferConfig, Recipe, TrainConfig, recipe_of
from medseg.device import ThreadTuner
from medseg.distributed import SINGLE, Ranks
from medseg.errors import MedsegError
from medseg.io import atomic_path, read_json, write_json, write_text, write_tsv
from medseg.models import load_checkpoint, load_state, save_checkpoint
from medseg.networks import build_network
from medseg.plan.functional import UNBOUNDED_EPOCHS
from medseg.postprocess.decision import decide_crf
from medseg.sliding_window import predict_probabilities
from medseg.train.data import BatchLoader
from medseg.train.layout import convert_layers, narrow_channels_last
from medseg.train.losses import build_loss
from medseg.volume import Image

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3  # of last.pt: plain data only (loads with weights_only=True)


class Schedule:
    """Learning-rate factor from training progress: linear warm-up, then poly (exponent 0.9), cosine or constant.

    Progress is the larger of ``step / total_steps`` and ``elapsed / budget``, so under ``max_minutes`` the
    rate reaches its floor when the time is up, not at an epoch count the run will never reach (torch's
    schedulers only count steps). ``state_dict``/``load_state_dict`` make it resumable like a torch scheduler.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer, self.cfg = optimizer, cfg
        self.base_lr = cfg.learning_rate
        self.total_steps = (cfg.epochs or 1) * cfg.iterations_per_epoch
        self.step_count = 0
        self.elapsed_s = 0.0

    def progress(self) -> float:
        p = self.step_count / self.total_steps
        if self.cfg.max_minutes:
            p = max(p, self.elapsed_s / (60.0 * self.cfg.max_minutes))
        return min(p, 1.0)

    def factor(self) -> float:
        p, warm = self.progress(), self.cfg.warmup_fraction
        if warm > 0 and p < warm:
            return max(p / warm, 0.01)
        q = (p - warm) / (1 - warm) if warm < 1 else 1.0
        if self.cfg.schedule == "poly":
            return (1 - q) ** 0.9
        if self.cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * q))
        return 1.0

    def step(self, elapsed_s: float) -> None:
        self.step_count += 1
        self.elapsed_s = elapsed_s
        self.apply()

    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.factor()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.elapsed_s = int(state["step_count"]), float(state["elapsed_s"])
        self.apply()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW with the configured learning rate and weight decay."""
    params = model.parameters()
    # fused Adam(W): one kernel for all parameters, 2.5x faster on a CPU than the loop over tensors (1.7 vs 4.2 ms)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)


def configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Seed everything; deterministic algorithms when asked, else let cuDNN pick the fastest kernels."""
    set_determinism(seed=cfg.seed, use_deterministic_algorithms=cfg.deterministic or None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
        torch.backends.cudnn.allow_tf32 = not cfg.deterministic


def cpu_bf16_flags() -> list[str]:
    """This CPU's bfloat16 units as ``/proc/cpuinfo`` names them (``amx_bf16``, ``avx512_bf16``); none if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): then bf16 convolutions are faster."""
    return bool(cpu_bf16_flags())


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of training steps with ``amp``: float16 on CUDA, bfloat16 on a CPU that has it natively."""
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def compiles(cfg: Recipe, device: torch.device) -> bool:
    """Whether training steps run ``torch.compile``d: when ``train.compile`` says so (null: on a CPU, for runs long
    enough to repay the half minute it takes: ``max_minutes`` >= 10 or >= 3,000 iterations) and, on a CPU, a C++
    compiler is there."""
    long_run = (cfg.max_minutes or 0) >= 10 or (not cfg.max_minutes and cfg.epochs * cfg.iterations_per_epoch >= 3000)
    wanted = cfg.compile if cfg.compile is not None else device.type == "cpu" and long_run
    if wanted and device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        log.warning("train.compile: no C++ compiler on this machine, training uncompiled")
        return False
    return wanted


def memory_format(
    cfg: TrainConfig, device: torch.device, compiled: bool, autocast: torch.dtype | None = None
) -> torch.memory_format | None:
    """The channels-last layout of the network and its batches when ``train.channels_last`` says so (null: on a CPU
    when the steps are compiled and run in float32: there inductor's convolutions ran 12-20% faster per step on the
    hippocampus plan, while under bfloat16 autocast (``autocast``) they ran 1.45x slower and eager ones about the
    same; BENCHMARKS.md); None: torch's default (contiguous) layout. Not by default for a job of one thread: there
    torch 2.13's compiled float32 channels-last steps failed (:meth:`Trainer.forward` falls back when they do)."""
    if cfg.channels_last is not None:
        wanted = cfg.channels_last
    else:
        wanted = device.type == "cpu" and compiled and autocast is None and torch.get_num_threads() > 1
    if not wanted:
        return None
    return torch.channels_last_3d if cfg.spatial_dims == 3 else torch.channels_last


def _float(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return [o.float() for o in output] if isinstance(output, list | tuple) else output.float()


def validate(model: torch.nn.Module, items: list[dict[str, Any]], config: Config, device: torch.device) -> np.ndarray:
    """Mean Dice per foreground class over whole validation volumes (sliding windows, as at inference).

    Raises:
        ConfigError: the config's train section is not resolved by a plan.
    """
    # compute_dice per case, not DiceMetric: its aggregate all-gathers over DDP ranks, and only rank 0 validates
    scores = []
    n = config.num_classes
    infer = config.infer.model_copy(update={"mirror": False})  # as nnU-Net: no test-time mirroring in training
    for item in items:
        pred = torch.as_tensor(probabilities(model, item, config, device, infer).argmax(0))
        onehot_pred = torch.nn.functional.one_hot(pred.long(), n).movedim(-1, 0)[None]
        true = torch.as_tensor(np.asarray(item["label"][0])).long().clamp(0, n - 1)
        onehot_true = torch.nn.functional.one_hot(true, n).movedim(-1, 0)[None]
        scores.append(compute_dice(onehot_pred, onehot_true, include_background=False, ignore_empty=True)[0].numpy())
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class empty in every case: NaN, as DiceMetric gives
        return np.nanmean(np.stack(scores), axis=0)


def probabilities(
    model: torch.nn.Module, item: dict[str, Any], config: Config, device: torch.device, infer: InferConfig
) -> np.ndarray:
    """Softmax ``(C, X, Y, Z)`` of one preprocessed volume by sliding windows (a click-guided model is given empty
    guidance channels: it is judged as it predicts without clicks)."""
    image = np.asarray(item["image"], np.float32)
    extra = extra_channels(config.train, config.num_classes)
    if extra:
        image = np.concatenate([image, np.zeros((extra, *image.shape[1:]), np.float32)])
    spacing = config.resample.target_spacing_mm or (1.0, 1.0, 1.0)
    grid = Image(image, np.diag([*spacing, 1.0]))
    return predict_probabilities(model, grid, recipe_of(config.train).patch_size_vox, infer, device).array


def with_crf_decided(config: Config, enabled: bool) -> Config:
    """``config`` with ``postprocess.crf.enabled`` set to a decision (a checkpoint never records ``auto``)."""
    decided = config.postprocess.crf.model_copy(update={"enabled": enabled})
    return config.model_copy(update={"postprocess": config.postprocess.model_copy(update={"crf": decided})})


@dataclass
class Progress:
    """What a checkpoint carries besides the weights, so a resumed run continues where the last one stopped."""

    epoch: int = 0
    best: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    finished: bool = False
    narrow_channels_last: list[str] | None = None  # the layers a resumed run trains channels-last again


@dataclass(frozen=True)
class ModelInfo:
    """What ``model.pt`` carries besides the weights (see :mod:`medseg.models`)."""

    plan: dict[str, Any] = field(default_factory=dict)
    contract: dict[str, Any] = field(default_factory=dict)
    fold: int | None = None


def _save_model(
    path: Path, model: torch.nn.Module, config: Config, info: ModelInfo, epoch: int, val_dice: float
) -> None:
    member = {"state_dict": model.state_dict(), "fold": info.fold, "epoch": epoch, "val_dice": val_dice}
    save_checkpoint(path, config, [member], plan=info.plan, contract=info.contract)


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _save_last(
    path: Path,
    model: torch.nn.Module,
    config: Config,
    identity: str,
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    scaler: torch.amp.GradScaler,
    ema: AveragedModel | None = None,
) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "state_dict": model.state_dict(),
        "config": config.to_dict(),
        "identity": identity,
        "epoch": progress.epoch,
        "val_dice": progress.best,
        "progress": progress.__dict__,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": list(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume_state(output_dir: Path, identity: str) -> dict[str, Any] | None:
    """The ``last.pt`` of an earlier run of the same config (``identity``) in ``output_dir``, if any."""
    path = output_dir / "last.pt"
    if not path.exists():
        return None
    try:
        state = load_state(path)  # plain data only: a planted pickle is refused, never run
    except MedsegError as err:  # written atomically, so this is a foreign or damaged file
        log.warning("ignoring unusable %s (%s): starting afresh", path.name, err)
        return None
    if state.get("version") != CHECKPOINT_VERSION or state.get("identity") != identity:
        log.warning("%s was made by another config: starting afresh (it will be overwritten)", path)
        return None
    return state


def fit(
    config: Config,
    train_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    output_dir: Path,
    device: torch.device,
    identity: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    artifacts: list[tuple[Path, str]] | None = None,
    info: ModelInfo | None = None,
    workers: int = 0,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Train (or resume) and write ``model.pt`` (``train.keep_weights``), ``last.pt``, ``history.tsv``, ``run.json``.

    Args:
        config: a config whose ``train`` section the plan resolved (see :func:`medseg.plan.functional.resolve_train`).
        train_items: ``{"patient_id", "image" (1, X, Y, Z) float, "label" (1, X, Y, Z) int}`` preprocessed.
        val_items: the same for validation (may be empty: then the last model is the model).
        output_dir: the train folder.
        device: from :func:`medseg.device.select_device`.
        identity: hash of what defines the run (user config, manifest); ``last.pt`` resumes only a match.
        params: logged to MLflow as params on a fresh run (the resolved plan and config).
        tags: MLflow tags (git commit, manifest hash, ...).
        artifacts: ``(path, artifact folder)`` logged at the end.
        info: the plan, the contract and the fold, written into ``model.pt``.
        workers: processes drawing the training batches (0: this process); see :func:`medseg.device.split_cores`.
        ranks: this process's DDP rank (:func:`medseg.distributed.start`); rank 0 alone validates, writes and logs.

    Returns:
        ``{"run_id", "best_val_dice", "best_epoch", "epochs", "elapsed_s", "stopped"}``.

    Raises:
        ConfigError: the config's train section is not resolved by a plan.
    """
    trainer = Trainer(config, train_items, val_items, output_dir, device, identity, info or ModelInfo(), workers, ranks)
    try:
        return _fit(trainer, params, tags, artifacts)
    finally:
        trainer.loader.close()


def _fit(
    trainer: Trainer,
    params: dict[str, Any] | None,
    tags: dict[str, str] | None,
    artifacts: list[tuple[Path, str]] | None,
) -> dict[str, Any]:
    config, output_dir, device = trainer.config, trainer.output_dir, trainer.device
    trainer.restore()
    progress, main = trainer.progress, trainer.ranks.main
    if main:
        write_text(output_dir / "config.yaml", config.to_yaml())
    # one MLflow run, rank 0's; the other ranks log nothing
    with (
        tracking.run(
            config.tracking, run_id=progress.run_id, run_name=f"{config.dataset}-{config.digest()}", system_metrics=True
        )
        if main
        else contextlib.nullcontext(progress.run_id)
    ) as run_id:
        if main:
            write_json(output_dir / "run.json", {"run_id": run_id, "tracking_uri": config.tracking.uri})
            if progress.run_id is None:
                progress.run_id = run_id
                tracking.log_params(params or {"config": config.to_dict()})
            world = {"ddp_processes": str(trainer.ranks.world)} if trainer.ranks.active else {}
            layers = ",".join(progress.narrow_channels_last or []) or "none"  # medseg.train.layout's choice
            tracking.set_tags(
                {
                    "config_digest": config.digest(),
                    "device": str(device),
                    "narrow_channels_last": layers,
                    **world,
                    **(tags or {}),
                }
            )
        trainer.session_start = time.perf_counter() - progress.elapsed_s
        while not progress.finished:
            trainer.epoch(progress.epoch + 1)
        trainer.finish(artifacts or [])
    if trainer.ranks.active:
        log.info(
            "rank %d of %d trained to epoch %d; its last batches %s",
            trainer.ranks.rank,
            trainer.ranks.world,
            progress.epoch,
            trainer.batches_crc32,
        )
    return {
        "run_id": run_id,
        "best_val_dice": progress.best,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "elapsed_s": progress.elapsed_s,
        "stopped": trainer.stopped,
    }


class Trainer:
    """The steps of :func:`fit`: restore a checkpoint, train an epoch, validate and save, finish."""

    def __init__(
        self,
        config: Config,
        train_items: list[dict[str, Any]],
        val_items: list[dict[str, Any]],
        output_dir: Path,
        device: torch.device,
        identity: str,
        info: ModelInfo,
        workers: int = 0,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.config, self.cfg = config, recipe_of(config.train)
        # what model.pt records: postprocess.crf auto stays off until finish() decides it on the validation cases
        crf_auto = config.postprocess.crf.enabled == "auto"
        self.saved_config = with_crf_decided(config, False) if crf_auto else config
        self.val_items, self.output_dir, self.device = val_items, output_dir, device
        self.identity, self.info, self.ranks = identity, info, ranks
        configure_torch(self.cfg, device)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model = build_network(self.cfg, config.num_classes).to(device)
        compiled = compiles(self.cfg, device)
        self.amp_dtype = amp_dtype(self.cfg, device)
        self.memory_format = memory_format(self.cfg, device, compiled, self.amp_dtype)
        if self.memory_format is not None:  # before the optimiser and the EMA copy see the weights
            self.model = self.model.to(memory_format=self.memory_format)
        self.loss_fn = build_loss(self.cfg, config.num_classes).to(device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.schedule = Schedule(self.optimizer, self.cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        stepped = self.model
        if ranks.active:  # gradients averaged over the ranks; rank 0's initial weights broadcast to all
            stepped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.stepped, self.compiled = stepped, compiled
        self.step_model = torch.compile(stepped) if compiled else stepped  # shares the weights with self.model
        # torch's own EMA (swa_utils): validated and saved in place of the raw weights when train.ema_decay is set
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True)
            if self.cfg.ema_decay and ranks.main
            else None
        )
        # on a CPU, threads follow the measured step times (a busy machine); a deterministic run keeps its count, and
        # so do DDP ranks (each step waits for the slowest rank, so a rank's own step time says little)
        tune = device.type == "cpu" and not self.cfg.deterministic and not ranks.active
        self.tuner = ThreadTuner(torch.get_num_threads() if tune else 1)
        self.loader = BatchLoader(
            train_items, self.cfg, workers, pin_memory=device.type == "cuda", rank=ranks.rank, world=ranks.world
        )
        clicks = self.cfg.clicks
        self.clicks = ClickSimulator(clicks, config.num_classes, self.cfg.seed, ranks.rank) if clicks.enabled else None
        self.budget_s = 60.0 * self.cfg.max_minutes if self.cfg.max_minutes else math.inf
        keep = self.cfg.keep_weights or ("best" if self.cfg.early_stopping_patience else "final")
        self.keep_final = keep == "final"
        self.progress = Progress()
        self.stopped = ""
        self.batches_crc32 = ""
        self.session_start = time.perf_counter()

    def _narrow_layout(self) -> None:
        """Train the narrow convolutions channels-last where that pays (:mod:`medseg.train.layout`): on a CPU, when
        the whole network is not channels-last already; with ``train.channels_last_narrow`` null, not in
        deterministic runs (the choice rests on a timing). A resumed run takes its first session's choice, so that
        it computes as the uninterrupted run would have. Before the first (compiled) step."""
        wanted = self.cfg.channels_last_narrow
        if self.device.type != "cpu" or self.memory_format is not None or wanted is False:
            chosen: list[str] = []
        elif self.progress.narrow_channels_last is not None:
            chosen = convert_layers(self.model, self.progress.narrow_channels_last)
        elif wanted is None and self.cfg.deterministic:
            chosen = []
        else:
            inputs = input_channels(self.cfg, self.config.num_classes)
            shape = (self.cfg.batch_size, inputs, *self.cfg.patch_size_vox)
            chosen = narrow_channels_last(self.model, shape, self.amp_dtype, wanted)
        self.progress.narrow_channels_last = chosen

    def restore(self) -> None:
        """Continue from ``last.pt`` of the same run (weights, optimiser, schedule, scaler, random state, history)."""
        state = load_resume_state(self.output_dir, self.identity)
        if state is not None and state["progress"].get("finished") and not (self.output_dir / "model.pt").exists():
            # Snakemake removes a job's outputs before it runs the job again (--forcerun, or an input rewritten
            # upstream), but not last.pt: a finished run resumed would then have no model.pt to finish with
            log.info("%s is of a finished run whose model.pt is gone: training afresh", self.output_dir / "last.pt")
            state = None
        if state is None:
            self.schedule.apply()
            self._narrow_layout()
            return
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        python = state["rng"]["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.stopped = "finished" if self.progress.finished else ""
        self._narrow_layout()
        last = self.output_dir / "last.pt"
        log.info("resuming from %s after epoch %d (MLflow run %s)", last, self.progress.epoch, self.progress.run_id)

    def train_epoch(self, epoch: int) -> tuple[list[float], int, float]:
        """One epoch of ``iterations_per_epoch`` steps (fewer when the budget runs out): losses, samples, seconds."""
        cfg, device = self.cfg, self.device
        self.model.train()
        start, losses, samples, crc = time.perf_counter(), [], 0, 0
        last = start
        for step, batch in enumerate(self.loader.epoch(epoch)):
            # what was drawn, for the record (a resumed run draws the same): every mask, the first image (0.3 ms)
            for part in (batch["label"], batch["image"][0]):
                crc = zlib.crc32(memoryview(part.contiguous().numpy()).cast("B"), crc)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype))
            if self.clicks is not None:  # guidance channels from simulated clicks on the model's own prediction
                image = self.clicks(self.model, image, label, epoch, step, autocast)
            if self.memory_format == torch.channels_last_3d:  # 2D networks take [B, C, X, Y, 1] and squeeze it
                image = image.contiguous(memory_format=self.memory_format)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast:
                output = self.forward(image)
            loss = self.loss_fn(_float(output), label)  # the loss in float32, as nnU-Net computes it
            self.scaler.scale(loss).backward()
            if cfg.grad_clip_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            # DDP: every rank follows the slowest one's clock, so the learning rates and the budget agree
            elapsed = self.ranks.max(time.perf_counter() - self.session_start)
            self.schedule.step(elapsed)
            losses.append(loss.detach())  # no device sync per step: read once per epoch
            samples += image.shape[0]
            now = time.perf_counter()
            self.tuner.record(now - last)
            last = now
            if elapsed >= self.budget_s:
                break
        values = torch.stack(losses).float().cpu().tolist()
        self.batches_crc32 = f"{crc:08x}"
        return values, samples, time.perf_counter() - start

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The training step's forward pass, around a failure of torch's compiled channels-last steps.

        torch 2.13's inductor expects channels-last outputs from convolutions that oneDNN, in float32 with one
        thread, returns contiguous (``assert_size_stride`` fails: seen on a 2-core Xeon when the thread tuner probed
        one thread, which it also does on a busy machine; two threads ran; ``benchmarks/train_speed.py layout
        --float32 --threads 1``). So with one thread a channels-last network steps eagerly (0.177 s per float32
        step there, against 0.169 s compiled in the default layout and 0.207 s eager; ad hoc), and goes back to its
        compiled steps when the tuner goes back to more threads. A compiled channels-last step that fails anyway
        (another CPU, another count) is retried in the default layout, compiled again (half a minute), and the run
        trains on without the layout's 12-20%.
        """
        if self.compiled and self.memory_format is not None and torch.get_num_threads() == 1:
            return self.stepped(image)
        try:
            return self.step_model(image)
        except Exception as error:  # torch raises AssertionError here; anything the retry does not cure re-raises
            if not (self.compiled and self.memory_format is not None):
                raise
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning(
                "the compiled channels-last step failed at %d torch thread(s) (%s: %s); continuing in the default "
                "layout, compiled again",
                torch.get_num_threads(),
                type(error).__name__,
                first[:200],
            )
            self.memory_format = None
            for module in (self.model, None if self.ema is None else self.ema.module):
                if module is not None:
                    module.to(memory_format=torch.contiguous_format)
            self.step_model = torch.compile(self.stepped)
            return self.step_model(image.contiguous())

    @property
    def kept_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: the moving average when ``train.ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model

    def validate_and_save(self, epoch: int, row: dict[str, Any], last_epoch: bool) -> None:
        """Validate when due (every ``val_every_epochs`` and at the end); ``model.pt`` keeps the weights of the last
        validation (``train.keep_weights: final``; early stopping stops right after a validation, so these are the
        final weights) or of the best one.

        Why final by default: in 14 hippocampus runs of 15 minutes (BENCHMARKS.md) the final weights scored higher on
        the held-out cases than the best-validation ones 12 times, lower once (+0.0009 Dice on average): picking the
        best of ~100 noisy validations on a few cases selects noise. nnU-Net also predicts with its final checkpoint."""
        progress, path, model = self.progress, self.output_dir / "model.pt", self.kept_model
        if not self.ranks.main:
            return
        if not self.val_items:
            _save_model(path, model, self.saved_config, self.info, epoch, float("nan"))
            return
        if epoch % self.cfg.val_every_epochs != 0 and not last_epoch:
            return
        dice = validate(model, self.val_items, self.config, self.device)
        row["val_dice_mean"] = float(np.nanmean(dice))
        for name, value in zip(self.config.classes, dice, strict=True):
            row[f"val_dice_{name}"] = float(value)
        improved = row["val_dice_mean"] > progress.best
        if improved:
            progress.best, progress.best_epoch, progress.stale = row["val_dice_mean"], epoch, 0
        else:
            progress.stale += 1
        if improved or self.keep_final:
            _save_model(path, model, self.saved_config, self.info, epoch, row["val_dice_mean"])

    def epoch(self, epoch: int) -> None:
        """Train, validate, save, log and checkpoint one epoch; decide whether the run is finished."""
        cfg, progress = self.cfg, self.progress
        losses, samples, seconds = self.train_epoch(epoch)
        progress.epoch = epoch
        progress.elapsed_s = time.perf_counter() - self.session_start
        out_of_time = progress.elapsed_s >= self.budget_s
        last_epoch = epoch >= cfg.epochs or out_of_time
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "learning_rate": self.schedule.lr,
            "seconds_per_epoch": seconds,
            "samples_per_second": samples * self.ranks.world / seconds,  # all ranks' (rank 0's loss)
            "torch_threads": torch.get_num_threads(),
            "batches_crc32": self.batches_crc32,
            "elapsed_minutes": progress.elapsed_s / 60.0,
        }
        self.validate_and_save(epoch, row, last_epoch)
        early = cfg.early_stopping_patience is not None and progress.stale >= cfg.early_stopping_patience
        progress.history.append(row)
        progress.finished = self.ranks.decide(last_epoch or early)  # rank 0 validated: its decision holds
        self.stopped = "early stopping" if early else "time budget" if out_of_time else "epochs"
        if not self.ranks.main:
            return
        tracking.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "batches_crc32")}, step=epoch)
        _save_last(
            self.output_dir / "last.pt",
            self.model,
            self.config,
            self.identity,
            progress,
            self.optimizer,
            self.schedule,
            self.scaler,
            self.ema,
        )
        log.info(
            "epoch %d/%s loss %.4f lr %.2e%s (%.1f s, %.1f samples/s)",
            epoch,
            cfg.epochs if cfg.epochs < UNBOUNDED_EPOCHS else "-",
            row["train_loss"],
            row["learning_rate"],
            f" val Dice {row['val_dice_mean']:.3f}" if "val_dice_mean" in row else "",
            seconds,
            row["samples_per_second"],
        )

    def finish(self, artifacts: list[tuple[Path, str]]) -> None:
        """``history.tsv``, the stop reason, the artifacts and the MLflow pytorch model (rank 0)."""
        if not self.ranks.main:
            return
        out, history = self.output_dir, self.progress.history
        columns = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
        write_tsv(out / "history.tsv", history, columns)
        tracking.set_tags({"stopped_by": self.stopped})
        own = [(out / "model.pt", "train"), (out / "config.yaml", "train"), (out / "history.tsv", "train")]
        # a click-guided model is not tried: its output must follow the clicks, so auto stays off (saved_config)
        if self.config.postprocess.crf.enabled == "auto" and not self.cfg.clicks.enabled:
            self.decide_crf()
            own.append((out / "crf_decision.json", "train"))
        for path, folder in [*own, *artifacts]:
            tracking.log_artifact(path, folder)
        if self.cfg.log_model:
            channels = 1 + extra_channels(self.cfg, self.config.num_classes)
            _log_mlflow_model(out / "model.pt", self.cfg.patch_size_vox, channels)

    def decide_crf(self) -> None:
        """``postprocess.crf: auto``: the CRF is tried on the validation cases' probabilities from the kept weights,
        predicted as ``infer`` predicts (test-time mirroring included), and ``model.pt`` records whether it is on
        (``crf_decision.json`` and the MLflow run say why). Without validation cases it stays off."""
        path, record = self.output_dir / "model.pt", self.output_dir / "crf_decision.json"
        checkpoint = load_checkpoint(path)
        epoch = checkpoint.members[0].get("epoch")
        if record.exists():  # a finished run started again: decided already for these weights (model.pt unchanged)
            earlier, recorded = read_json(record), checkpoint.config.postprocess.crf.enabled
            if earlier.get("model_epoch") == epoch and earlier.get("enabled") == recorded:
                return
        model = checkpoint.network(self.device)
        spacing = self.config.resample.target_spacing_mm or (1.0, 1.0, 1.0)

        def cases() -> Any:
            for item in self.val_items:
                probs = probabilities(model, item, self.config, self.device, self.config.infer)
                yield probs, np.asarray(item["image"][0], np.float32), np.asarray(item["label"][0])

        decision = decide_crf(cases(), spacing, self.config.postprocess.crf, self.config.classes)
        decision["model_epoch"] = epoch
        write_json(record, decision)
        decided = with_crf_decided(checkpoint.config, decision["enabled"])
        save_checkpoint(path, decided, checkpoint.members, plan=checkpoint.plan, contract=checkpoint.contract)
        tracking.set_tags({"postprocess_crf": "on" if decision["enabled"] else "off"})
        if decision.get("mean_dice_before") is not None:
            before, after = decision["mean_dice_before"], decision["mean_dice_with_crf"]
            tracking.log_metrics({"crf_val_dice_before": before, "crf_val_dice_with": after})
        log.info(
            "postprocess.crf auto: %s on %d validation cases (mean Dice %s without, %s with)",
            "on" if decision["enabled"] else "off",
            decision["n_cases"],
            decision.get("mean_dice_before"),
            decision.get("mean_dice_with_crf"),
        )


def _log_mlflow_model(checkpoint: Path, patch_size_vox: tuple[int, int, int], channels: int = 1) -> None:
    """``model.pt`` (the kept weights) as an MLflow pytorch model, with a one-patch input example and its output."""
    model = load_checkpoint(checkpoint).network("cpu")
    example = np.zeros((1, channels, *patch_size_vox), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.as_tensor(example)).numpy()
    tracking.log_pytorch_model(model, example, output)
