"""The training data pipeline: batches drawn in worker processes are a function of (seed, epoch, batch) alone,
leave the shared volumes untouched, and keep image and mask together; the thread tuner leaves a busy machine's
cores to whoever holds them and takes them back when they are free."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transforms import SPATIAL_ONLY, agreement, coded_volume  # tests/train is on sys.path (pytest)

from medseg.config import AugmentConfig, Recipe
from medseg.device import ThreadTuner
from medseg.train.data import BatchLoader

NNUNET = AugmentConfig(preset="nnunet", elastic_prob=0.2, low_resolution_prob=0.25)  # every transform can fire


def recipe(**update: object) -> Recipe:
    values = {
        "network": "unet",
        "channels": (4, 8, 16),
        "strides": (2, 2),
        "kernel_sizes": (3, 3, 3),
        "batch_size": 3,
        "patch_size_vox": (16, 16, 8),
        "epochs": 4,
        "iterations_per_epoch": 4,
        "augment": NNUNET,
        "seed": 7,
        **update,
    }
    return Recipe(**values)


def blob_items(n: int = 4) -> list[dict]:
    """Noisy volumes with a labelled box (classes 1 and 2); the odd ones smaller than the patch (padded)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        shape = (14, 22, 6) if i % 2 else (24, 24, 12)
        label = np.zeros((1, *shape), np.uint8)
        label[0, 3:8, 4:12, 1:5] = 1 + i % 2
        image = (label * 2.0 + rng.normal(0, 0.5, label.shape)).astype(np.float32)
        items.append({"patient_id": f"p{i}", "image": image, "label": label})
    return items


def draw(loader: BatchLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader.epoch(epoch)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_batches_depend_on_seed_and_epoch_only_not_on_workers_or_order() -> None:
    items, cfg = blob_items(), recipe()
    in_process, two_workers = BatchLoader(items, cfg, 0), BatchLoader(items, cfg, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # the training process may have several threads, a worker has one
        epoch3 = draw(in_process, 3)
        torch.set_num_threads(threads)
        assert len(epoch3) == 4 and epoch3[0]["image"].shape == (3, 1, 16, 16, 8)
        assert epoch3[0]["label"].shape == (3, 1, 16, 16, 8) and epoch3[0]["image"].dtype == torch.float32
        assert same(draw(two_workers, 3), epoch3)  # 2 worker processes draw what the training process drew
        draw(two_workers, 4)
        assert same(draw(two_workers, 3), epoch3)  # the persistent workers go back to epoch 3 exactly
        assert not same(draw(in_process, 4), epoch3)
        assert not same(draw(BatchLoader(items, recipe(seed=8), 0), 3), epoch3)
        partial = next(iter(two_workers.epoch(5)))  # stopped after one batch (a time budget), then epoch 5 again
        assert torch.equal(draw(two_workers, 5)[0]["image"], partial["image"])
    finally:
        torch.set_num_threads(threads)
        two_workers.close()


def test_drawing_leaves_the_shared_volumes_untouched() -> None:
    items = blob_items()
    loader = BatchLoader(items, recipe(), 1)
    before = {k: v.clone() for k, v in loader.dataset.blocks.items()}
    try:
        for epoch in range(1, 6):
            draw(loader, epoch)
    finally:
        loader.close()
    blocks = loader.dataset.blocks
    assert len(blocks) == 4 and all(block.is_shared() for block in blocks.values())  # 4 blocks, not 4 per case
    assert all(torch.equal(blocks[k], before[k]) for k in before)


def test_batches_from_workers_keep_image_and_mask_together() -> None:
    items = [{"patient_id": f"c{i}", **coded_volume((28, 28, 20))} for i in range(2)]
    loader = BatchLoader(items, recipe(augment=SPATIAL_ONLY, patch_size_vox=(20, 20, 16), batch_size=2), 1)
    try:
        for epoch in range(1, 8):
            for batch in loader.epoch(epoch):
                for image, label in zip(batch["image"], batch["label"], strict=True):
                    wrong, shift = agreement({"image": image.numpy(), "label": label.numpy()})
                    assert wrong < 0.02 and shift < 2.0, (epoch, wrong, shift)
    finally:
        loader.close()


def test_crops_are_centred_on_foreground_at_the_configured_share() -> None:
    items = blob_items()
    loader = BatchLoader(
        items,
        recipe(
            augment=AugmentConfig(preset="light", flip_prob=0.0, rotation_prob=0.0, scale_prob=0.0),
            foreground_fraction=1.0,
        ),
        0,
    )
    labels = torch.cat([b["label"] for e in (1, 2) for b in loader.epoch(e)])
    assert all(bool((patch > 0).any()) for patch in labels)  # every patch centred on a labelled voxel


def simulate(tuner: ThreadTuner, busy: range, steps: int) -> tuple[list[int], float]:
    """Step times of a 2-core machine: quiet 2 threads 0.05 s, 1 thread 0.08 s; busy (another session's process)
    2 threads 3 s (they wait for each other), 1 thread 0.1 s. Returns the threads used per step and the total."""
    used, total = [], 0.0
    for step in range(steps):
        hog = step in busy
        seconds = (3.0 if tuner.threads == 2 else 0.1) if hog else (0.05 if tuner.threads == 2 else 0.08)
        used.append(tuner.threads)
        total += seconds
        tuner.record(seconds)
    return used, total


def test_thread_tuner_gives_way_on_a_busy_machine_and_takes_the_cores_back(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    tuner = ThreadTuner(2, period=50)
    used, total = simulate(tuner, busy=range(300, 900), steps=1500)
    assert used[100:300].count(2) >= 190  # quiet: 2 threads but for a short probe
    assert used[310:900].count(1) >= 570  # busy: 1 thread within two slow steps, a few aborted probes
    assert used[1300:].count(2) >= 190  # quiet again: back to 2 at the next probe (at most 8 x 50 steps later)
    ideal = 300 * 0.05 + 600 * 0.1 + 600 * 0.05
    assert total < 1.25 * ideal  # fixed at 2 threads it would be 600 * 3 s more
    assert set(set_to) == {1, 2}


def test_thread_tuner_does_not_judge_a_thread_count_by_its_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    tuner, used, compiled = ThreadTuner(2, period=50), [], {2}
    for _ in range(300):  # busy from the start: 2 threads step in 3 s, 1 thread in 0.1 s after a 60 s compilation
        used.append(tuner.threads)
        seconds = 3.0 if tuner.threads == 2 else 0.1 if tuner.threads in compiled else 60.0
        compiled.add(tuner.threads)
        tuner.record(seconds)
    assert used[20:].count(1) >= 270


def test_thread_tuner_does_nothing_with_one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("no thread change expected"))
    used, _ = simulate(ThreadTuner(1), busy=range(0), steps=50)
    assert set(used) == {1}
