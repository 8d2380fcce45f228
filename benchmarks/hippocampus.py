"""Hippocampus benchmark: medseg's defaults against a plain MONAI recipe, same data, same wall-clock budget.

    python benchmarks/hippocampus.py --train-dir ../shared/data/hippocampus [--test-dir DIR] --minutes 15

Trains on an MSD-layout folder (``imagesTr/``, ``labelsTr/``), scores an MSD-layout test folder (``imagesTs/``,
``labelsTs/``) with medseg's infer and evaluate functions, and leaves ``metrics.tsv`` (one row per recipe x case
x class) and ``summary.json`` in the working directory. Without ``--test-dir`` the fixed 20% of cases in
``HOLDOUT`` (every 5th case of the sorted 208-case training folder) is held out for testing.

Recipes, each given ``--minutes`` of training:
- ``medseg``: ``medseg.train`` with its library defaults: the data plan (on a CPU: MONAI's residual UNet 16-128
  and the light augmentation preset; on a GPU: DynUNet 32-256 with deep supervision and nnU-Net's augmentation),
  Dice+CE, AdamW with warm-up and cosine decay on the time budget, MR per-case z-score, 8 training cases validate
  and the final weights are kept (``train.keep_weights``); scored with the default ``infer`` config (``mirror:
  auto`` mirrors a one-window scan).
- ``monai``: a plain MONAI 3D UNet (16-128 channels), Dice+CE, Adam, flips and a light affine on whole volumes
  padded to 48x64x48, per-case z-score.

``--score-checkpoints A/model.pt B/model.pt ...`` trains nothing: it scores the listed checkpoints (one network each,
or their own fold ensembles) averaged as one ensemble (recipe ``checkpoints``), on the same held-out cases. With the
``model_final.pt`` of several seeds' runs it says what averaging models buys over a single run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medseg.config import Config, CrfConfig, validate_config
from medseg.device import select_device, split_cores, usable_cores
from medseg.evaluate.run import COLUMNS, score_patient, summarise
from medseg.infer.run import predict
from medseg.io import read_json, read_tsv, read_volume, write_json, write_tsv, write_volume
from medseg.models import Checkpoint, load_checkpoint, load_model, load_state, save_checkpoint
from medseg.plan.functional import case_fingerprint, fingerprint, make_plan, resolve_resample, resolve_train
from medseg.resample.functional import preprocess
from medseg.train.loop import fit
from medseg.volume import Image, Label

log = logging.getLogger("hippocampus")

CLASSES = ["anterior", "posterior"]
HOLDOUT = [
    "hippocampus_001",
    "hippocampus_014",
    "hippocampus_025",
    "hippocampus_037",
    "hippocampus_044",
    "hippocampus_051",
    "hippocampus_058",
    "hippocampus_068",
    "hippocampus_087",
    "hippocampus_092",
    "hippocampus_097",
    "hippocampus_105",
    "hippocampus_125",
    "hippocampus_136",
    "hippocampus_145",
    "hippocampus_152",
    "hippocampus_161",
    "hippocampus_169",
    "hippocampus_174",
    "hippocampus_184",
    "hippocampus_193",
    "hippocampus_205",
    "hippocampus_217",
    "hippocampus_223",
    "hippocampus_229",
    "hippocampus_234",
    "hippocampus_243",
    "hippocampus_260",
    "hippocampus_276",
    "hippocampus_287",
    "hippocampus_295",
    "hippocampus_303",
    "hippocampus_314",
    "hippocampus_320",
    "hippocampus_327",
    "hippocampus_336",
    "hippocampus_350",
    "hippocampus_358",
    "hippocampus_366",
    "hippocampus_375",
    "hippocampus_383",
    "hippocampus_390",
]
N_VAL = 8  # medseg validates on the last 8 training cases (sorted)


def msd_cases(folder: Path, images: str, labels: str) -> list[dict[str, Any]]:
    """``[{"case", "image", "label"}]`` of an MSD folder, sorted by case name."""
    cases = []
    for image in sorted((folder / images).glob("*.nii.gz")):
        if image.name.startswith("._"):
            continue
        case = image.name.removesuffix(".nii.gz").removesuffix("_0000")
        label = folder / labels / f"{case}.nii.gz"
        if label.exists():
            cases.append({"case": case, "image": image, "label": label})
    if not cases:
        raise SystemExit(f"no labelled cases in {folder}/{images} + {folder}/{labels}")
    return cases


def base_config(workdir: Path, minutes: float, overrides: list[str] = ()) -> dict[str, Any]:
    """The benchmark's config; ``overrides`` are ``section.key=YAML value`` strings (``--set``)."""
    config = {
        "dataset": "hippocampus",
        "classes": CLASSES,
        "resample": {"normalization": "zscore", "target_spacing_mm": [1.0, 1.0, 1.0]},
        "train": {
            "max_minutes": minutes,
            "epochs": 10_000,
            "iterations_per_epoch": 20,
            "val_every_epochs": 5,
            "device": "auto",
        },
        "tracking": {
            "uri": f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
            "artifact_dir": str((workdir / "mlartifacts").resolve()),
            "experiment": "hippocampus-benchmark",
        },
    }
    for item in overrides:
        dotted, _, value = item.partition("=")
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.safe_load(value)
    return config


def train_medseg(
    train: list[dict], workdir: Path, minutes: float, overrides: list[str] = (), n_val: int = N_VAL
) -> Path:
    """medseg's defaults: plan from the training cases, then ``medseg.train.loop.fit``; returns ``model.pt``
    (the last ``n_val`` cases validate; with 0, every case trains; ``train.keep_weights`` says which weights)."""
    config = validate_config(base_config(workdir, minutes, overrides), "hippocampus benchmark")
    loaded = [(read_volume(c["image"], Image), read_volume(c["label"], Label)) for c in train]
    device = select_device(config.train.device)
    measured = [case_fingerprint(image, label, config.num_classes, seed=0) for image, label in loaded]
    planned = make_plan(fingerprint(measured, config.num_classes, ["MR"] * len(measured)), config, device.type)
    resample = resolve_resample(config.resample, planned["resample"])
    resolved = config.model_copy(update={"resample": resample, "train": resolve_train(config.train, planned["train"])})
    log.info("medseg plan: %s", json.dumps(planned["train"]))
    items = [
        {"patient_id": c["case"], "image": preprocess(img, resolved.resample).array, "label": lab.array}
        for c, (img, lab) in zip(train, loaded, strict=True)
    ]
    out = workdir / "medseg"
    write_json(out / "plan.json", planned)
    summary = fit(
        resolved,
        items[: len(items) - n_val],
        items[len(items) - n_val :],
        out,
        device,
        identity=f"hippocampus-{resolved.digest()}-{len(items)}",
        params=resolved.to_dict(),
        tags={"benchmark": "hippocampus"},
        workers=split_cores(usable_cores(), device.type)[1],  # as `medseg train` splits the cores
    )
    log.info("medseg training: %s", summary)
    return out / "model.pt"


def final_weights(checkpoint: Path) -> Path:
    """``model.pt``'s network with the final weights of the run (``last.pt``; its moving average when
    ``train.ema_decay`` is set) in place of the kept ones: ``model_final.pt`` beside it."""
    best = load_checkpoint(checkpoint)
    last = load_state(checkpoint.parent / "last.pt")
    weights = last["state_dict"]
    if last.get("ema"):  # torch's AveragedModel: the averaged network's weights under "module."
        weights = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    member = {**best.members[0], "state_dict": weights, "epoch": last["epoch"]}
    return save_checkpoint(checkpoint.parent / "model_final.pt", best.config, [member], best.plan, best.contract)


def checkpoint_ensemble(paths: list[Path], device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The networks of ``paths`` (every member of each) averaged as one :class:`medseg.models.Ensemble`, and the
    first's config.

    Raises:
        SystemExit: the checkpoints were trained with different preprocessing, patch or classes (their
            probabilities would not be comparable).
    """
    loaded = [load_checkpoint(p, device) for p in paths]
    first = loaded[0].config
    for path, c in zip(paths, loaded, strict=True):
        same = (c.config.resample, c.config.train.patch_size_vox, c.config.classes)
        if same != (first.resample, first.train.patch_size_vox, first.classes):
            raise SystemExit(f"{path}: trained with another resampling, patch or classes than {paths[0]}: not averaged")
    # every member of every checkpoint, as `medseg ensemble` bundles folds (without its same-recipe rule: seeds differ)
    members = [m for c in loaded for m in c.members]
    return Checkpoint(first, members).network(device), first


def train_monai(train: list[dict], workdir: Path, minutes: float) -> torch.nn.Module:
    """The plain MONAI recipe: whole volumes padded to 48x64x48, UNet 16-128, Dice+CE, Adam, light augmentation."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        RandAffined,
        RandFlipd,
        ResizeWithPadOrCropd,
    )

    keys = ("image", "label")
    transform = Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd(keys),
            NormalizeIntensityd("image"),
            ResizeWithPadOrCropd(keys, (48, 64, 48)),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandAffined(
                keys, prob=0.3, rotate_range=0.2, scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"
            ),
        ]
    )
    data = [{"image": str(c["image"]), "label": str(c["label"])} for c in train]
    loader = DataLoader(Dataset(data, transform), batch_size=2, shuffle=True, num_workers=0)
    device = select_device("auto")
    model = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="instance").to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * minutes:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                log.info("monai step %d loss %.4f (%.1f min)", step, float(loss), (time.perf_counter() - start) / 60)
            if time.perf_counter() - start >= 60 * minutes:
                break
    log.info("monai training: %d iterations in %.1f min", step, (time.perf_counter() - start) / 60)
    return model


def predict_monai(model: torch.nn.Module, image: Image) -> Label:
    from monai.inferers import sliding_window_inference

    x = image.array.astype(np.float32)
    x = (x - x.mean()) / (x.std() or 1.0)
    model.eval()
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.as_tensor(x[None]), (48, 64, 48), 1, model, overlap=0.5, mode="gaussian"
        )
    return Label(logits[0].argmax(0, keepdim=True).numpy().astype(np.uint8), image.affine.copy())


def score(recipe: str, predict_fn: Any, test: list[dict], workdir: Path, config: Config) -> list[dict]:
    rows = []
    for c in test:
        image = read_volume(c["image"], Image)
        path = write_volume(predict_fn(image), workdir / recipe / "predictions" / f"{c['case']}.nii.gz")
        rows.extend({"recipe": recipe, **r} for r in score_patient(config, c["case"], path, c["label"]))
    return rows


def log_to_run(train_dir: Path, config: Config, rows: list[dict], model: torch.nn.Module) -> None:
    """The test metrics, the network's size, the process's peak memory and the median seconds per epoch, into the
    training's MLflow run (what ``benchmarks/compare_networks.py`` tabulates)."""
    from infer import peak_rss_mb  # benchmarks/infer.py, beside this script (imported here: tests load this file)

    from medseg import tracking

    s = summarise(config, rows)
    mean = {
        m: float(np.nanmean([s["per_class"][c][m]["mean"] or np.nan for c in CLASSES]))
        for m in ("dice", "boundary_f1", "hd95_mm")
    }
    history = read_tsv(train_dir / "history.tsv")
    metrics = {
        "test_dice_mean": mean["dice"],
        "test_boundary_f1_mean": mean["boundary_f1"],
        "test_hd95_mm_mean": mean["hd95_mm"],
        "n_parameters": float(sum(p.numel() for p in model.parameters())),
        "peak_rss_mb": peak_rss_mb(),  # VmHWM: its own peak, also when compare_networks.py starts it
        "median_seconds_per_epoch": float(np.median([float(r["seconds_per_epoch"]) for r in history])),
        "epochs_trained": float(len(history)),
    }
    with tracking.run(config.tracking, run_id=read_json(train_dir / "run.json")["run_id"]):
        tracking.log_metrics(metrics)
    log.info("logged to the training run: %s", metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, default=None)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per recipe")
    parser.add_argument("--workdir", type=Path, default=Path("hippocampus_benchmark"))
    parser.add_argument("--recipes", default="medseg,monai")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="train the recipes side by side, one thread each, so that a shared machine's load hits both alike",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a medseg config key for the medseg recipe (YAML value), e.g. --set train.ema_decay=0.999",
    )
    parser.add_argument(
        "--val-cases",
        type=int,
        default=N_VAL,
        help="training cases that validate (the best checkpoint with train.keep_weights=best); 0: all train",
    )
    parser.add_argument(
        "--also-final",
        action="store_true",
        help="also score the run's final weights (last.pt) beside model.pt (recipe medseg-final; a paired comparison "
        "with --set train.keep_weights=best)",
    )
    parser.add_argument(
        "--score-train",
        type=int,
        default=0,
        metavar="K",
        help="also score the kept model on every K-th training case (recipe medseg-train): the generalisation gap",
    )
    parser.add_argument(
        "--crf", action="store_true", help="also score the medseg model with postprocess.crf on (recipe medseg+crf)"
    )
    parser.add_argument(
        "--score-checkpoints",
        type=Path,
        nargs="+",
        default=None,
        metavar="MODEL",
        help="train nothing: score these checkpoints averaged as one ensemble (recipe checkpoints)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cases = msd_cases(args.train_dir, "imagesTr", "labelsTr")
    if args.test_dir is None:
        missing = sorted(set(HOLDOUT) - {c["case"] for c in cases})
        if missing:
            log.warning("%d held-out cases are not in %s", len(missing), args.train_dir)
        train = [c for c in cases if c["case"] not in HOLDOUT]
        test = [c for c in cases if c["case"] in HOLDOUT]
    else:
        train, test = cases, msd_cases(args.test_dir, "imagesTs", "labelsTs")
    if args.score_checkpoints:
        log.info("%d test cases; scoring %d checkpoint(s), training nothing", len(test), len(args.score_checkpoints))
    else:
        log.info("%d training cases, %d test cases, %.1f minutes per recipe", len(train), len(test), args.minutes)
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = validate_config(base_config(args.workdir, args.minutes, args.set), "hippocampus benchmark")
    rows: list[dict] = []
    summaries: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch threads {args.threads}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": None if args.score_checkpoints else args.minutes,  # nothing trains when scoring checkpoints
        "n_train": len(train),
        "n_test": len(test),
        "overrides": args.set,
        "val_cases": args.val_cases,
    }
    recipes = args.recipes.split(",") if args.score_checkpoints is None else ["checkpoints"]
    helper = None
    if args.score_checkpoints:
        device = select_device("auto")
        model, trained = checkpoint_ensemble(args.score_checkpoints, device)
        summaries["checkpoint_paths"] = [str(p) for p in args.score_checkpoints]
        rows += score("checkpoints", lambda im: predict(model, trained, im, config, device), test, args.workdir, config)
    if args.parallel and "monai" in recipes and "medseg" in recipes:
        # the MONAI recipe in a child process with its own folder; its rows are merged below
        side = args.workdir / "monai_side"
        side.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--train-dir", str(args.train_dir.resolve())]
        command += ["--test-dir", str(args.test_dir.resolve())] if args.test_dir else []
        command += ["--minutes", str(args.minutes), "--recipes", "monai", "--threads", "1", "--workdir", "."]
        helper = subprocess.Popen(command, cwd=side)
        torch.set_num_threads(1)
        summaries["machine"] = summaries["machine"].replace(f"torch threads {args.threads}", "torch threads 1 each")
        recipes = ["medseg"]
    if "medseg" in recipes:
        checkpoint = train_medseg(train, args.workdir, args.minutes, args.set, args.val_cases)
        if (checkpoint.parent / "crf_decision.json").exists():  # postprocess.crf auto: what training decided
            summaries["crf_decision"] = read_json(checkpoint.parent / "crf_decision.json")
        device = select_device("auto")
        model, trained = load_model(checkpoint, device)
        rows += score("medseg", lambda im: predict(model, trained, im, config, device), test, args.workdir, config)
        log_to_run(checkpoint.parent, config, [r for r in rows if r["recipe"] == "medseg"], model)
        if args.also_final:  # the same run's final weights, scored on the same cases (a paired comparison)
            final, final_config = load_model(final_weights(checkpoint), device)
            rows += score(
                "medseg-final",
                lambda im: predict(final, final_config, im, config, device),
                test,
                args.workdir,
                config,
            )
            recipes = [*recipes, "medseg-final"]
        if args.score_train:  # Dice on cases it trained on, beside the held-out Dice: how much it overfits
            seen = train[: len(train) - args.val_cases][:: args.score_train]  # not the validation cases
            rows += score(
                "medseg-train", lambda im: predict(model, trained, im, config, device), seen, args.workdir, config
            )
            recipes = [*recipes, "medseg-train"]
        if args.crf:  # the same model once more, with the CRF refinement of its probabilities
            with_crf = config.model_copy(
                update={"postprocess": config.postprocess.model_copy(update={"crf": CrfConfig(enabled=True)})}
            )
            rows += score(
                "medseg+crf", lambda im: predict(model, trained, im, with_crf, device), test, args.workdir, config
            )
            recipes = [*recipes, "medseg+crf"]
    if "monai" in recipes:
        monai_model = train_monai(train, args.workdir, args.minutes)
        rows += score("monai", lambda im: predict_monai(monai_model, im), test, args.workdir, config)
    if helper is not None:
        if helper.wait() != 0:
            raise SystemExit("the MONAI recipe failed: see its log above")
        numeric = ("dice", "iou", "boundary_f1", "ref_volume_mm3", "pred_volume_mm3")
        for r in read_tsv(args.workdir / "monai_side" / "metrics.tsv"):
            rows.append({k: (float(v) if v else float("nan")) if k in numeric else v for k, v in r.items()})
        recipes = ["medseg", "monai"]
        summaries["parallel"] = "recipes trained side by side, one torch thread each"
    for recipe in recipes:
        s = summarise(config, [r for r in rows if r["recipe"] == recipe])
        summaries[recipe] = s
        per_class = {name: s["per_class"][name]["dice"]["mean"] for name in CLASSES}
        log.info("%s: mean Dice %.4f %s", recipe, s["mean_foreground_dice"], per_class)
    write_tsv("metrics.tsv", rows, ["recipe", *COLUMNS])
    write_json("summary.json", summaries)


if __name__ == "__main__":
    main()
