"""Training speed on a CPU (or CUDA): the measurements behind medseg's defaults.

    python benchmarks/train_speed.py levers [--busy] [--threads 2] [--epochs 5]
    python benchmarks/train_speed.py loader [--worker-counts 0 1 2] [--epochs 5]
    python benchmarks/train_speed.py networks [--threads 2] [--iterations 3] [--device cpu|cuda]
    python benchmarks/train_speed.py layout [--threads 2] [--iterations 30] [--batch 4] [--float32]
    python benchmarks/train_speed.py precision [--threads 2] [--iterations 30] [--batch 4]
    python benchmarks/train_speed.py widths [--threads 2] [--iterations 20] [--batch 4]
    python benchmarks/train_speed.py narrow [--threads 2] [--iterations 30] [--batch 4] [--float32] [--repeat 3]

``levers``: samples per second of medseg's training loop (``Trainer.train_epoch``: drawing, augmentation,
forward, backward, AdamW) on the hippocampus plan (``../shared/data/hippocampus``, the cases
``benchmarks/hippocampus.py`` trains on), one lever added at a time, each setting in a fresh process after a warm-up
epoch; with ``--busy``, each is measured again beside a 2-thread torch matrix-multiply loop started in its own
session (``setsid``), as a job in another terminal would be. Ratios are against the first row, measured in the same
run.

``loader``: samples per second of the batch loader alone (drawing and augmentation, no network) per worker count,
with the GPU plan's augmentation (nnU-Net's) and the CPU plan's: the data feed a GPU would get per worker.

``networks``: seconds per iteration (forward, backward, AdamW step; batch 2) of the networks medseg can build, the
measurement behind the plan's choice of network and width per device. On CUDA the iterations run under autocast
(float16), as ``medseg train`` does with ``amp: true``.

``layout``: milliseconds per training step (forward, backward, fused AdamW; batch 4, the hippocampus patch) of the
compiled UNet 16-128 in the contiguous and the channels-last 3D layout, both in one process, their steps alternated
(so that a shared machine's drift hits both alike), under the autocast ``medseg train`` would use on this CPU
(``--float32``: float32 steps, as a CPU without bf16 trains). ``layout --float32 --threads 1`` fails on the
session-15 Xeon (torch 2.13 inductor's ``assert_size_stride``), which ``medseg train`` now survives.

``precision``: the same step time in bfloat16 autocast against float32 (contiguous and channels-last), alternated
likewise: whether this CPU's bf16 pays (``amp`` trains in bf16 on any CPU with AMX or AVX512-BF16).

``widths``: the same step time for the plan's CPU UNet (16-128) against wider ones (24-192, 32-256) and a deeper one
(3 residual units per level), alternated likewise: what a larger network costs in samples per minute.

``narrow``: convolutions whose channel counts are off oneDNN's 16-channel block, forward and backward at the
hippocampus patch in the default and the channels-last layout (``medseg.train.layout.step_ms``, the timing medseg
itself makes at the start of training), then the compiled UNet 16-128's step time as it was, with the layers that
timing picks converted (medseg's default), and with the last transposed convolution converted as well: each
network in its own process, ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DynUNet, UNet

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hippocampus.py beside this file


def dynunet(features: list[int]) -> torch.nn.Module:
    levels = len(features)
    return DynUNet(
        3,
        1,
        3,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=features,
        norm_name=("instance", {"affine": True}),
        deep_supervision=True,
        deep_supr_num=2,
    )


def unet(features: list[int]) -> torch.nn.Module:
    return UNet(3, 1, 3, features, [2] * (len(features) - 1), num_res_units=2, norm="instance")


def seconds_per_iteration(net: torch.nn.Module, shape: tuple[int, ...], iterations: int, device: str) -> float:
    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters())
    x = torch.randn(*shape, device=device)
    amp = device == "cuda"
    for i in range(iterations + 1):  # the first iteration warms up allocators (and cuDNN) and is not timed
        if i == 1:
            if amp:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            loss = net(x).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if amp:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def networks(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    cases = [
        ("UNet 16-128, demo patch 48x48x24", unet([16, 32, 64, 128]), (2, 1, 48, 48, 24)),
        ("DynUNet 16-128, demo patch 48x48x24", dynunet([16, 32, 64, 128]), (2, 1, 48, 48, 24)),
        ("UNet 16-128, 48x64x48 (MONAI hippocampus recipe)", unet([16, 32, 64, 128]), (2, 1, 48, 64, 48)),
        ("UNet 16-128, 40x56x40 (hippocampus plan, CPU)", unet([16, 32, 64, 128]), (2, 1, 40, 56, 40)),
        ("DynUNet 8-64, 40x56x40", dynunet([8, 16, 32, 64]), (2, 1, 40, 56, 40)),
        ("DynUNet 16-128, 40x56x40", dynunet([16, 32, 64, 128]), (2, 1, 40, 56, 40)),
        ("DynUNet 32-256, 40x56x40 (hippocampus plan, GPU)", dynunet([32, 64, 128, 256]), (2, 1, 40, 56, 40)),
    ]
    for name, net, shape in cases:
        print(f"{name}: {seconds_per_iteration(net, shape, args.iterations, args.device):.3f} s/iteration", flush=True)


# ---- levers: the training loop's samples/s on the hippocampus plan ----------------------------------------------

HOG = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).clamp_(-1, 1)\n"
)


def with_monai_affines(transform: Any) -> Any:
    """``transform`` (a training ``Compose``) with medseg's one-resampling rotation and scaling replaced by what
    medseg used before session 11: MONAI's ``RandAffined`` twice, rotation then scaling, the same ranges."""
    from monai.transforms import Compose, RandAffined

    from medseg.train.transforms import KEYS, RandRotateScaled

    out = []
    for t in transform.transforms:
        if isinstance(t, RandRotateScaled):
            for prob, key, ranges in (
                (t.rotation_prob, "rotate_range", t.rotate_range),
                (t.scale_prob, "scale_range", t.scale_range),
            ):
                if prob > 0:
                    out.append(
                        RandAffined(
                            KEYS, prob=prob, mode=("bilinear", "nearest"), padding_mode="zeros", **{key: ranges}
                        )
                    )
        else:
            out.append(t)
    return Compose(out)


class LegacyLoader:
    """The batch drawing of medseg before the data pipeline (commit 3dfd396): in the training process, one patch
    after another, each padded and searched for foreground afresh, with MONAI's metadata tracking on, rotated and
    scaled by MONAI's ``RandAffined`` (one for each)."""

    def __init__(self, items: list[dict], cfg: Any) -> None:
        from medseg.train.transforms import train_transforms

        self.items, self.cfg = items, cfg
        self.transform = with_monai_affines(
            train_transforms(
                cfg.augment, cfg.patch_size_vox, cfg.spatial_dims, cfg.samples_per_volume, cfg.foreground_fraction
            )
        )

    def epoch(self, epoch: int) -> Any:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        for _ in range(self.cfg.iterations_per_epoch):
            patches: list[dict] = []
            while len(patches) < self.cfg.batch_size:
                item = self.items[int(rng.integers(len(self.items)))]
                out = self.transform({"image": item["image"], "label": item["label"]})
                patches.extend(out if isinstance(out, list) else [out])
            yield {
                "image": torch.stack([torch.as_tensor(np.asarray(p["image"]), dtype=torch.float32) for p in patches]),
                "label": torch.stack([torch.as_tensor(np.asarray(p["label"])) for p in patches]),
            }

    def close(self) -> None:
        pass


def hippocampus_items(train_dir: Path, cache: Path) -> tuple[Any, list[dict]]:
    """The hippocampus plan (as ``benchmarks/hippocampus.py`` makes it) and its preprocessed training cases."""
    import pickle

    from medseg.config import validate_config

    if cache.exists():
        with open(cache, "rb") as f:
            resolved, items = pickle.load(f)  # our own cache file, written just below by this script
        # validated again: a config pickled by an older medseg lacks the keys added since
        return validate_config(resolved.to_dict(), "train_speed cache"), items
    from hippocampus import HOLDOUT, base_config, msd_cases

    from medseg.io import read_volume
    from medseg.plan.functional import case_fingerprint, fingerprint, make_plan, resolve_resample, resolve_train
    from medseg.resample.functional import preprocess
    from medseg.volume import Image, Label

    config = validate_config(base_config(cache.parent, 15), "train_speed")
    cases = [c for c in msd_cases(train_dir, "imagesTr", "labelsTr") if c["case"] not in HOLDOUT]
    loaded = [(read_volume(c["image"], Image), read_volume(c["label"], Label)) for c in cases]
    measured = [case_fingerprint(image, label, config.num_classes, seed=0) for image, label in loaded]
    planned = make_plan(fingerprint(measured, config.num_classes, ["MR"] * len(measured)), config, "cpu")
    resample = resolve_resample(config.resample, planned["resample"])
    resolved = config.model_copy(update={"resample": resample, "train": resolve_train(config.train, planned["train"])})
    items = [
        {"patient_id": c["case"], "image": preprocess(image, resolved.resample).array, "label": label.array}
        for c, (image, label) in zip(cases, loaded, strict=True)
    ]
    with open(cache, "wb") as f:
        pickle.dump((resolved, items), f)
    return resolved, items


def lever_samples_per_second(args: argparse.Namespace) -> None:
    """One lever setting, in this process: samples/s of ``Trainer.train_epoch`` over ``--epochs`` epochs."""
    from medseg.device import ThreadTuner, set_torch_threads
    from medseg.train.loop import ModelInfo, Schedule, Trainer

    set_torch_threads(args.threads)
    resolved, items = hippocampus_items(args.train_dir, args.cache)
    update = {"amp": args.amp, "compile": args.compile, "max_minutes": None, "batch_size": args.batch}
    update["channels_last"] = args.channels_last  # None: medseg's rule (compiled float32 CPU steps)
    update["channels_last_narrow"] = args.narrow_channels_last  # None: medseg's rule (timed per layer)
    keep_none = ("max_minutes", "channels_last", "channels_last_narrow")
    train = resolved.train.model_copy(update={k: v for k, v in update.items() if v is not None or k in keep_none})
    config = resolved.model_copy(update={"train": train})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, items, [], Path(out), torch.device("cpu"), "speed", ModelInfo(), args.workers)
        trainer.restore()  # as `medseg train` does: a fresh run here (the narrow layers' layout is chosen in it)
        if args.legacy:
            trainer.loader.close()
            trainer.loader = LegacyLoader(items, trainer.cfg)
        elif args.monai_affine:  # before the first epoch, so worker processes get it too
            trainer.loader.dataset.transform = with_monai_affines(trainer.loader.dataset.transform)
        if args.unfused:
            trainer.optimizer = torch.optim.AdamW(
                trainer.model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
            )
            trainer.schedule = Schedule(trainer.optimizer, trainer.cfg)
        if args.fixed_threads:
            trainer.tuner = ThreadTuner(1)  # a tuner with nothing to choose leaves the threads alone
        try:
            warm = time.perf_counter()
            trainer.train_epoch(1)  # warm-up (and compilation): not counted
            warm = time.perf_counter() - warm
            samples, seconds = 0, 0.0
            for epoch in range(2, 2 + args.epochs):
                _, n, s = trainer.train_epoch(epoch)
                samples, seconds = samples + n, seconds + s
        finally:
            trainer.loader.close()
    narrow = trainer.progress.narrow_channels_last or []
    print(json.dumps({"samples_per_s": samples / seconds, "warmup_s": warm, "narrow_channels_last": narrow}))


OLD = ["--batch", "2", "--workers", "0", "--no-amp", "--no-compile", "--no-channels-last", "--monai-affine"]
OLD += ["--no-narrow-channels-last"]
NEW = ["--batch", "4", "--workers", "0", "--amp", "--compile"]
NARROW_OFF = "--no-narrow-channels-last"  # the rows before session 19's lever
SETTINGS = [
    ("before: 3dfd396's drawing, float32, AdamW, batch 2", [*OLD, "--legacy", "--unfused", "--fixed-threads"]),
    ("+ volumes padded once, crop centres kept, no MONAI metadata", [*OLD, "--unfused", "--fixed-threads"]),
    ("+ fused AdamW", [*OLD, "--fixed-threads"]),
    ("+ bfloat16 autocast (AMX)", [*OLD, "--amp", "--fixed-threads"]),
    ("+ torch.compile", [*OLD, "--amp", "--compile", "--fixed-threads"]),
    (
        "+ batch 4 (the plan's CPU batch now)",
        [*NEW, "--no-channels-last", "--monai-affine", "--fixed-threads", NARROW_OFF],
    ),
    (
        "+ channels-last 3D (medseg: only on a CPU without bf16)",
        [*NEW, "--channels-last", "--monai-affine", "--fixed-threads"],
    ),
    ("+ thread tuner", [*NEW, "--monai-affine", NARROW_OFF]),
    ("+ rotation and scaling in one resampling", [*NEW, NARROW_OFF]),
    ("+ narrow convolutions channels-last where it pays = medseg's default", NEW),
    ("  (default with 1 worker process)", ["--batch", "4", "--workers", "1", "--amp", "--compile"]),
    # what a CPU without bf16 runs: float32, compiled, channels-last at 2 threads, eager steps at the tuner's 1
    ("  (default in float32, as on a CPU without bf16)", ["--batch", "4", "--workers", "0", "--no-amp", "--compile"]),
]


def levers(args: argparse.Namespace) -> None:
    """Each lever's samples/s, every setting in a fresh process, quiet and (``--busy``) beside a torch process in
    another session (``setsid``: the kernel's autogroup then shares the CPU per session, as between two terminals).
    Round-robin over the settings ``--repeat`` times, median reported: a shared machine's speed drifts."""
    settings = [s for s in SETTINGS if not args.only or any(k in s[0] for k in args.only.split(","))]
    rows = []
    for repeat in range(args.repeat):
        for name, flags in settings:
            again = args.busy == "all" or any(k and k in name for k in args.busy.split(","))
            for busy in [False, True] if again else [False]:
                result = _one_setting(args, flags, busy)
                rows.append({"setting": name, "busy": busy, **result})
                print(
                    f"{name} {'BUSY' if busy else 'quiet'} #{repeat + 1}: {result['samples_per_s']:.1f} samples/s "
                    f"(warm-up {result['warmup_s']:.1f} s; channels-last: {result['narrow_channels_last'] or 'none'})",
                    flush=True,
                )

    def median(name: str, busy: bool) -> float | None:
        values = sorted(r["samples_per_s"] for r in rows if r["setting"] == name and r["busy"] == busy)
        return values[len(values) // 2] if values else None

    base = median(settings[0][0], False) or float("nan")
    print(f"\nmedian of {args.repeat} round(s) of {args.epochs} timed epochs (20 iterations each)")
    print("| setting | quiet samples/s | vs before | busy samples/s | busy / quiet |")
    print("|---|---|---|---|---|")
    for name, _ in settings:
        quiet, busy = median(name, False) or float("nan"), median(name, True)
        cells = f"{busy:.1f} | {busy / quiet:.0%}" if busy is not None else "- | -"
        print(f"| {name} | {quiet:.1f} | {quiet / base:.2f}x | {cells} |")


def _one_setting(args: argparse.Namespace, flags: list[str], busy: bool) -> dict[str, float]:
    hog = None
    if busy:
        hog = subprocess.Popen([sys.executable, "-c", HOG], start_new_session=True)
        time.sleep(3)
    command = [sys.executable, __file__, "--one", "--threads", str(args.threads), "--epochs", str(args.epochs)]
    command += ["--train-dir", str(args.train_dir), "--cache", str(args.cache), *flags]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=args.env)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternated_step_ms(
    nets: dict[str, tuple[torch.nn.Module, torch.memory_format]],
    batch: int,
    iterations: int,
    dtype: torch.dtype | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[torch.dtype, dict[str, float]]:
    """Median milliseconds per compiled training step (forward, backward, fused AdamW; the hippocampus patch) of each
    network in its layout, all in one process with their steps alternated, so that a shared machine's drift hits them
    alike; under the autocast ``medseg train`` would use on this CPU (which is returned too), or per network the
    type in ``dtypes``."""
    from monai.losses import DiceCELoss

    from medseg.train.loop import cpu_has_native_bf16

    if dtype is None:  # what `amp: true` trains in on this CPU
        dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    image, label = torch.randn(batch, 1, 40, 56, 40), torch.randint(0, 3, (batch, 1, 40, 56, 40))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    runs = {}
    for name, (net, fmt) in nets.items():
        net = net.to(memory_format=fmt)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        runs[name] = (torch.compile(net), optimizer, image.contiguous(memory_format=fmt), [])
    for step in range(iterations + 5):
        for name, (model, optimizer, x, times) in runs.items():
            step_dtype = (dtypes or {}).get(name, dtype)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=step_dtype, enabled=step_dtype != torch.float32):
                output = model(x)
            loss_fn(output.float(), label).backward()
            optimizer.step()
            if step >= 5:  # the first steps compile
                times.append(time.perf_counter() - start)
    return dtype, {name: 1000 * float(np.median(run[3])) for name, run in runs.items()}


def layout(args: argparse.Namespace) -> None:
    """Step time of the compiled hippocampus UNet, contiguous against channels-last 3D, steps alternated."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {
        "contiguous": (unet([16, 32, 64, 128]), torch.contiguous_format),
        "channels-last 3D": (unet([16, 32, 64, 128]), torch.channels_last_3d),
    }
    try:
        dtype, ms = alternated_step_ms(nets, args.batch or 4, args.iterations, torch.float32 if args.float32 else None)
    except Exception as error:  # torch 2.13: float32 channels-last at one thread fails on some CPUs (BENCHMARKS.md)
        print(f"{args.threads} thread(s): failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        raise SystemExit(1) from error
    print(f"{dtype}, batch {args.batch or 4}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    print(f"channels-last speed-up: {ms['contiguous'] / ms['channels-last 3D']:.2f}x")


def precision(args: argparse.Namespace) -> None:
    """Step time of the compiled hippocampus UNet in bfloat16 autocast (contiguous, as ``amp`` trains on a CPU with
    bf16) against float32 (contiguous, and channels-last as a CPU without bf16 trains), steps alternated: whether
    this CPU's bf16 pays. AMX (Intel Sapphire Rapids on) multiplies bf16 matrices in tiles; AVX512-BF16 alone
    (AMD Zen 4, Intel Cooper Lake) only has bf16 dot-product instructions."""
    from medseg.train.loop import cpu_bf16_flags, cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {
        "bfloat16 contiguous": (unet([16, 32, 64, 128]), torch.contiguous_format),
        "float32 contiguous": (unet([16, 32, 64, 128]), torch.contiguous_format),
        "float32 channels-last 3D": (unet([16, 32, 64, 128]), torch.channels_last_3d),
    }
    dtypes = {"bfloat16 contiguous": torch.bfloat16}
    _, ms = alternated_step_ms(nets, args.batch or 4, args.iterations, torch.float32, dtypes)
    found = cpu_bf16_flags() or ["neither amx_bf16 nor avx512_bf16"]
    print(f"{args.threads} thread(s), batch {args.batch or 4}, compiled, steps alternated; CPU flags: {found}")
    print(f"medseg's choice on this CPU: {'bfloat16' if cpu_has_native_bf16() else 'float32'}")
    for name, value in ms.items():
        print(f"  {name:26s} {value:7.1f} ms  {ms['float32 contiguous'] / value:.2f}x float32 contiguous")


NARROW_VARIANTS = ["default", "medseg's choice", "+ the transposed convolution"]


def narrow(args: argparse.Namespace) -> None:
    """The narrow convolutions' layouts, alone and in the compiled network (``medseg.train.layout``)."""
    from medseg.train.layout import step_ms
    from medseg.train.loop import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = args.batch or 4
    dtype = None if args.float32 or not cpu_has_native_bf16() else torch.bfloat16
    print(f"{args.threads} thread(s), batch {batch}, {dtype or torch.float32}; forward and backward of one layer:")
    # (the UNet's first layer, fed the image, is timed without an input gradient by medseg itself: its log shows it)
    for inputs, outputs, kernel in [(3, 3, 3), (2, 2, 3), (8, 8, 3), (14, 14, 3), (16, 16, 3), (16, 3, 1)]:
        conv = torch.nn.Conv3d(inputs, outputs, kernel, padding=kernel // 2)
        default_ms, channels_last_ms = step_ms(conv, (batch, inputs, 40, 56, 40), dtype, iterations=5)
        print(
            f"  {inputs:2d} -> {outputs:2d}, kernel {kernel}: {default_ms:6.1f} ms default, {channels_last_ms:6.1f} ms"
        )
    # each network in its own process, rounds alternated: in one process torch.compile reused one UNet's graph for
    # another UNet whose layer had forward hooks, and the converted network stepped at the default's speed
    results: dict[str, list[float]] = {name: [] for name in NARROW_VARIANTS}
    layers: dict[str, list[str]] = {}
    for _ in range(args.repeat):
        for name in NARROW_VARIANTS:
            command = [sys.executable, __file__, "narrow", "--one-narrow", name, "--threads", str(args.threads)]
            command += ["--iterations", str(args.iterations), "--batch", str(batch)]
            command += ["--float32"] if args.float32 else []
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=args.env)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result["ms"])
            layers[name] = result["layers"]
    print(f"compiled UNet 16-128, ms per training step, {args.repeat} round(s) of one process per network:")
    medians = {name: float(np.median(values)) for name, values in results.items()}
    for name, values in results.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        speed = medians["default"] / medians[name]
        print(f"  {name} {layers[name]}: {rounds} (median {medians[name]:.1f}: {speed:.2f}x the default's speed)")


def narrow_step(args: argparse.Namespace) -> None:
    """One network of ``narrow``, in this process: its median ms per compiled step and its converted layers."""
    from medseg.train.layout import convert_layers, narrow_channels_last
    from medseg.train.loop import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = None if args.float32 or not cpu_has_native_bf16() else torch.bfloat16
    net, names = unet([16, 32, 64, 128]), []
    if args.one_narrow != "default":
        names = narrow_channels_last(net, (args.batch, 1, 40, 56, 40), dtype, None)
    if args.one_narrow == "+ the transposed convolution":  # the 32 -> 3 one before the last unit
        names += convert_layers(net, ["model.2.0.conv"])
    layout = {args.one_narrow: (net, torch.contiguous_format)}
    _, ms = alternated_step_ms(layout, args.batch, args.iterations, dtype or torch.float32)
    print(json.dumps({"ms": ms[args.one_narrow], "layers": names}))


def widths(args: argparse.Namespace) -> None:
    """Step time of the compiled hippocampus UNet at the plan's width (16-128) against wider and deeper ones."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = {"16-128": [16, 32, 64, 128], "24-192": [24, 48, 96, 192], "32-256": [32, 64, 128, 256]}
    nets = {f"UNet {k}": (unet(v), torch.contiguous_format) for k, v in features.items()}
    nets["UNet 16-128, 3 residual units"] = (
        UNet(3, 1, 3, features["16-128"], [2, 2, 2], num_res_units=3, norm="instance"),
        torch.contiguous_format,
    )
    dtype, ms = alternated_step_ms(nets, args.batch or 4, args.iterations)
    base = ms["UNet 16-128"]
    print(f"{dtype}, batch {args.batch or 4}, compiled, steps alternated:")
    for (name, value), (net, _) in zip(ms.items(), nets.values(), strict=True):
        params = sum(p.numel() for p in net.parameters())
        print(f"  {name:32s} {value:7.1f} ms  {value / base:.2f}x  {params:,} parameters")


def loader(args: argparse.Namespace) -> None:
    """Samples/s of the batch loader alone (no network), with the GPU plan's augmentation (nnU-Net's preset) and
    with the CPU plan's (light), per worker count: what a GPU's data feed would get per worker process. Each is
    measured with medseg's rotation and scaling and again with MONAI's ``RandAffined`` pair (before session 11),
    ``--repeat`` rounds alternated in this process, median reported."""
    from medseg.config import AugmentConfig
    from medseg.plan.functional import resolve_augment
    from medseg.train.data import BatchLoader

    resolved, items = hippocampus_items(args.train_dir, args.cache)
    rates: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.repeat):
        for preset, batch in (("nnunet", 2), ("light", 4)):
            augment = resolve_augment(AugmentConfig(), preset)
            update = {"augment": augment, "batch_size": batch, "iterations_per_epoch": 50}
            cfg = resolved.train.model_copy(update=update)
            for workers in args.worker_counts:
                for affine in ("medseg one resampling", "MONAI RandAffined x2"):
                    batches = BatchLoader(items, cfg, workers)
                    if affine.startswith("MONAI"):
                        batches.dataset.transform = with_monai_affines(batches.dataset.transform)
                    try:
                        for _ in batches.epoch(1):  # starts the workers
                            pass
                        start, samples = time.perf_counter(), 0
                        for epoch in range(2, 2 + args.epochs):
                            samples += sum(b["image"].shape[0] for b in batches.epoch(epoch))
                        rate = samples / (time.perf_counter() - start)
                    finally:
                        batches.close()
                    rates.setdefault((preset, workers, affine), []).append(rate)
                    print(f"{preset}, batch {batch}, {workers} worker(s), {affine}: {rate:.0f} samples/s", flush=True)
    print(f"\nmedian of {args.repeat} round(s) of {args.epochs} epochs (50 batches each)")
    print("| augmentation | workers | medseg one resampling | MONAI RandAffined x2 | ratio |")
    print("|---|---|---|---|---|")
    for preset in ("nnunet", "light"):
        for workers in args.worker_counts:
            new, old = (
                sorted(rates[(preset, workers, a)])[args.repeat // 2]
                for a in ("medseg one resampling", "MONAI RandAffined x2")
            )
            print(f"| {preset} | {workers} | {new:.0f} | {old:.0f} | {new / old:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what",
        nargs="?",
        default="levers",
        choices=["levers", "networks", "loader", "layout", "precision", "widths", "narrow"],
    )
    parser.add_argument("--worker-counts", type=int, nargs="+", default=[0, 1, 2], help="loader: worker counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float32", action="store_true", help="layout: float32 steps even on a bf16 CPU")
    parser.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="networks: timed iterations per network; layout, precision, widths: per network (at least 30, 30, 20)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="networks only")
    parser.add_argument(
        "--epochs", type=int, default=5, help="levers: timed epochs (20 iterations each); loader: (50 each)"
    )
    parser.add_argument(
        "--busy",
        default="",
        help="levers: the settings (name parts, comma-separated) to measure "
        "again beside a torch process in another session; 'all' for every one",
    )
    parser.add_argument("--repeat", type=int, default=1, help="levers, loader, narrow: rounds (median reported)")
    parser.add_argument("--only", default="", help="levers: comma-separated parts of the setting names to run")
    parser.add_argument("--train-dir", type=Path, default=Path("../shared/data/hippocampus"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medseg_train_speed.pkl")
    # one setting, in this process (what `levers` runs in a child process per setting)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-narrow", choices=NARROW_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--narrow-channels-last", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--unfused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--monai-affine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fixed-threads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train_dir, args.cache = args.train_dir.resolve(), args.cache.resolve()
    args.env = dict(os.environ)
    if args.one_narrow:
        narrow_step(args)
    elif args.one:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        lever_samples_per_second(args)
    elif args.what == "networks":
        networks(args)
    elif args.what == "loader":
        loader(args)
    elif args.what in ("layout", "precision", "widths", "narrow"):
        args.iterations = max(args.iterations, 20 if args.what == "widths" else 30)
        {"layout": layout, "precision": precision, "widths": widths, "narrow": narrow}[args.what](args)
    else:
        levers(args)


if __name__ == "__main__":
    main()
