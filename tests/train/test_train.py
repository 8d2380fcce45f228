"""Training end to end on tiny volumes: outputs, MLflow, 2D, resume after kill -9, budget, early stopping, folds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg import tracking
from medseg.config import Config, CrfConfig, load_config, validate_config
from medseg.evaluate.run import score_patient
from medseg.infer.run import run as infer_run
from medseg.io import file_sha256, read_json, read_tsv
from medseg.manifest import read_manifest
from medseg.models import load_checkpoint
from medseg.plan.run import run as plan_stage
from medseg.train import loop
from medseg.train.run import run, split_entries


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _history(folder: Path) -> list[dict[str, str]]:
    return read_tsv(folder / "history.tsv")


def test_training_writes_its_outputs_and_tracks_everything(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, log_model=True)
    config = config.model_copy(
        update={"tracking": config.tracking.model_copy(update={"system_metrics_interval_s": 0.2})}
    )
    out = root / "train"
    summary = run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)
    for name in ("model.pt", "last.pt", "history.tsv", "config.yaml", "plan.json", "run.json"):
        assert (out / name).exists(), name
    plan = read_json(out / "plan.json")
    # network: auto on a CPU
    assert plan["overrides"]["train.patch_size_vox"] == [16, 16, 8] and plan["train"]["network"] == "unet"
    assert plan["fingerprint"]["n_cases"] == 5  # the train and val patients
    checkpoint = load_checkpoint(out / "model.pt")  # what `medseg infer` and `predict` do
    assert checkpoint.config.train.channels == (4, 8, 16) and checkpoint.config.train.strides is not None
    assert checkpoint.contract["classes"] == ["organ_a", "organ_b"] and checkpoint.plan == plan

    client = tracking.client(config.tracking)
    mlrun = client.get_run(summary["run_id"])
    params, metrics, tags = mlrun.data.params, mlrun.data.metrics, mlrun.data.tags
    assert params["train.network"] == "unet" and params["train.epochs"] == "2"
    assert params["train.patch_size_vox"] == "[16, 16, 8]" and "plan_overrides.train.patch_size_vox" in params
    assert params["resample.normalization"] == "zscore" and params["resample.target_spacing_mm"] == "[1.5, 1.5, 2.5]"
    for key in ("train_loss", "learning_rate", "seconds_per_epoch", "samples_per_second"):
        assert len(client.get_metric_history(summary["run_id"], key)) == 2, key
    assert {"val_dice_organ_a", "val_dice_organ_b", "val_dice_mean"} <= set(metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert tags["config_digest"] == config.digest() and len(tags["manifest_sha256"]) >= 12
    assert tags["git_commit"] and tags["stopped_by"] == "epochs"
    artifacts = {f.path for f in client.list_artifacts(summary["run_id"], "train")}
    assert {"train/model.pt", "train/history.tsv", "train/crf_decision.json"} <= artifacts
    # postprocess.crf auto: tried on the validation patients' probabilities; model.pt records on or off, never auto
    decision = read_json(out / "crf_decision.json")
    assert decision["n_cases"] == 1 and isinstance(decision["enabled"], bool) and decision["model_epoch"] == 2
    assert checkpoint.config.postprocess.crf.enabled is decision["enabled"]
    assert tags["postprocess_crf"] == ("on" if decision["enabled"] else "off") and "crf_val_dice_with" in metrics
    assert {f.path for f in client.list_artifacts(summary["run_id"], "plan")} == {"plan/plan.json"}
    logged = client.search_logged_models(experiment_ids=[mlrun.info.experiment_id])
    assert logged and logged[0].source_run_id == summary["run_id"]  # the MLflow pytorch model
    files = [f.path for f in client.list_logged_model_artifacts(logged[0].model_id, "data")]
    assert files == ["data/model.pt2"]  # torch.export's archive, not a pickle that runs code when loaded
    # registered once as a version of medseg-<dataset>, with its checksum; the manifest is the run's dataset input
    query = f"name = 'medseg-tiny' and run_id = '{summary['run_id']}'"
    versions = client.search_model_versions(query)
    assert len(versions) == 1 and versions[0].tags["model_sha256"] == file_sha256(out / "model.pt")
    assert versions[0].tags["manifest_sha256"] == tags["manifest_sha256"]
    assert client.get_run(summary["run_id"]).inputs.dataset_inputs[0].dataset.name == "tiny-manifest"
    written = {name: (out / name).stat().st_mtime_ns for name in ("model.pt", "crf_decision.json")}
    run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)  # finished: nothing new registered
    assert len(client.search_model_versions(query)) == 1
    assert file_sha256(out / "model.pt") == versions[0].tags["model_sha256"]
    # the CRF decision is not redone: neither model.pt nor the decision file is written again
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written


def test_a_2d_configuration_trains_and_evaluates_end_to_end(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, spatial_dims=2, patch_size_vox=[16, 16, 1], network="unet", epochs=2)
    out = root / "train2d"
    run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], out)
    test = next(e for e in read_manifest(tiny_dataset["manifest"]) if e.split == "test")
    prediction = infer_run(config, out / "model.pt", test.image, root / "infer" / f"{test.patient_id}.nii.gz")
    rows = score_patient(config, test.patient_id, prediction, test.label)
    assert [r["class"] for r in rows] == config.classes
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert _history(out)[-1]["epoch"] == "2"
    # the channels-last layout (of 2D networks: torch.channels_last) trains too
    flat = config.model_copy(update={"train": config.train.model_copy(update={"channels_last": True})})
    run(flat, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train2d_cl")
    assert _history(root / "train2d_cl")[-1]["epoch"] == "2"
    # postprocess.crf refines the probabilities inside infer: same grid, a valid label
    crf = config.model_copy(
        update={"postprocess": config.postprocess.model_copy(update={"crf": CrfConfig(enabled=True, iterations=2)})}
    )
    refined = infer_run(crf, out / "model.pt", test.image, root / "infer_crf" / f"{test.patient_id}.nii.gz")
    assert [r["class"] for r in score_patient(config, test.patient_id, refined, test.label)] == config.classes


def test_resume_after_kill_9_continues_the_epochs_the_batches_and_the_mlflow_run(
    tiny_dataset: dict, make_config: Callable
) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, epochs=12, iterations_per_epoch=2, val_every_epochs=1, num_workers=1)
    config_path = root / "config.yaml"
    config_path.write_text(config.to_yaml())
    out = root / "train"
    command = [
        sys.executable, "-m", "medseg.cli", "train", "--config", str(config_path),
        "--manifest", str(tiny_dataset["manifest"]), "--resample-dir", str(tiny_dataset["resample_dir"]),
        "--output-dir", str(out),
    ]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = int(loop.load_resume_state(out, _identity(config, tiny_dataset, out / "plan.json"))["epoch"])
    run_id = read_json(out / "run.json")["run_id"]
    assert 1 <= killed_at < 12

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'last.pt'} after epoch {killed_at}" in second.stderr
    assert read_json(out / "run.json")["run_id"] == run_id
    assert [int(r["epoch"]) for r in _history(out)] == list(range(1, 13))
    client = tracking.client(config.tracking)
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train_loss")})
    assert steps == list(range(1, 13))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    # the killed and resumed run (a worker process) drew the batches of an uninterrupted run (no workers)
    loaded = load_config(config_path)  # as the killed run read it
    straight = loaded.model_copy(update={"train": loaded.train.model_copy(update={"num_workers": 0})})
    run(straight, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "straight")
    drawn = [r["batches_crc32"] for r in _history(out)]
    assert drawn == [r["batches_crc32"] for r in _history(root / "straight")] and len(set(drawn)) == 12


def _identity(config: Config, dataset: dict, plan: Path) -> str:
    """The resume identity: the config the plan resolved, and the manifest."""
    from medseg.plan.run import load_plan
    from medseg.train.run import identity

    return identity(load_plan(plan).apply(config), dataset["manifest"])


def _crash_at_3_then_resume(args: tuple, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train into ``out``, crash at the start of epoch 3, then resume to the end."""
    original = loop.BatchLoader.epoch

    def crash_at_3(self: loop.BatchLoader, epoch: int) -> Any:
        if epoch == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, epoch)

    monkeypatch.setattr(loop.BatchLoader, "epoch", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(*args, out)
    monkeypatch.setattr(loop.BatchLoader, "epoch", original)
    run(*args, out)


def test_a_resumed_run_matches_an_uninterrupted_one(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, epochs=4, val_every_epochs=2, network="unet")
    args = (config, tiny_dataset["manifest"], tiny_dataset["resample_dir"])
    run(*args, root / "straight")
    _crash_at_3_then_resume(args, root / "resumed", monkeypatch)
    straight, resumed = _history(root / "straight"), _history(root / "resumed")
    assert [r["epoch"] for r in resumed] == ["1", "2", "3", "4"]
    for a, b in zip(straight, resumed, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
        assert float(a["learning_rate"]) == pytest.approx(float(b["learning_rate"]), rel=1e-6)


def test_a_finished_run_whose_model_is_gone_trains_afresh(tiny_dataset: dict, make_config: Callable) -> None:
    """Started again with its outputs in place, a finished run only finishes again (the same MLflow run). Snakemake
    removes a job's outputs, but not ``last.pt``, before it runs the job again (``--forcerun train``, or an input
    rewritten upstream): then the run trains afresh instead of failing for want of ``model.pt``."""
    root = tiny_dataset["root"]
    config = make_config(root, epochs=2, network="unet")
    args = (config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train")
    first = run(*args)
    again = run(*args)
    assert again["run_id"] == first["run_id"] and again["epochs"] == 2
    for name in ("model.pt", "run.json", "history.tsv"):  # the train rule's outputs
        (root / "train" / name).unlink()
    fresh = run(*args)
    assert fresh["run_id"] != first["run_id"] and fresh["epochs"] == 2
    assert (root / "train" / "model.pt").exists() and [r["epoch"] for r in _history(root / "train")] == ["1", "2"]


def test_wall_clock_budget_stops_training(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, epochs=500, max_minutes=0.0001, network="unet")
    summary = run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train")
    assert summary["stopped"] == "time budget" and summary["epochs"] == 1
    assert (root / "train" / "model.pt").exists()


def test_early_stopping(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    # a learning rate this small cannot change the validation Dice: every validation after the first is stale
    config = make_config(root, epochs=20, learning_rate=1e-12, early_stopping_patience=2, network="unet")
    summary = run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train")
    assert summary["stopped"] == "early stopping" and summary["epochs"] == 3 and summary["best_epoch"] == 1


@pytest.mark.parametrize(("keep", "patience", "epoch"), [(None, None, 3), ("best", None, 1), (None, 5, 1)])
def test_model_pt_keeps_the_final_weights_unless_asked_for_the_best(
    tiny_dataset: dict, make_config: Callable, keep: str | None, patience: int | None, epoch: int
) -> None:
    """``train.keep_weights``: final by default (the last validation's weights), best on request or when early
    stopping is on. The validation Dice cannot change (a learning rate of 1e-12), so the best is epoch 1's."""
    root = tiny_dataset["root"]
    settings = {"keep_weights": keep, "early_stopping_patience": patience}
    config = make_config(root, epochs=3, learning_rate=1e-12, network="unet", **settings)
    summary = run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "train")
    assert summary["best_epoch"] == 1 and summary["epochs"] == 3
    (member,) = load_checkpoint(root / "train" / "model.pt").members
    assert member["epoch"] == epoch


def test_k_fold_split_is_by_subject_and_written_in_the_plan(tiny_dataset: dict, make_config: Callable) -> None:
    root = tiny_dataset["root"]
    entries = read_manifest(tiny_dataset["manifest"])
    config = make_config(root, folds=2)
    plan = plan_stage(config, tiny_dataset["manifest"], root / "plan.json")
    assert read_json(root / "plan.json")["folds"] == plan.folds
    seen: dict[str, int] = {}
    for fold in (0, 1):
        train, val = split_entries(plan, entries, fold)
        assert {e.patient_id for e in val} == {p for p, f in (plan.folds or {}).items() if f == fold}
        assert not {e.patient_id for e in train} & {e.patient_id for e in val}
        seen.update({e.patient_id: fold for e in val})
    pool = {e.patient_id for e in entries if e.split in ("train", "val")}
    assert set(seen) == pool  # every train/val patient validates in exactly one fold


def test_the_demo_recipe_is_its_own_layer_and_the_defaults_are_plan_driven(repo: Path) -> None:
    from medseg.workflow import layered

    defaults = load_config(repo / "configs" / "default.yaml")
    assert defaults.train.network == "auto" and defaults.train.patch_size_vox is None and defaults.train.epochs is None
    assert defaults.resample.target_spacing_mm is None and defaults.resample.normalization is None
    demo = validate_config(layered({}))
    assert demo.train.network == "unet" and demo.train.patch_size_vox == (48, 48, 24)
    assert np.prod(demo.train.patch_size_vox) * (demo.train.batch_size or 0) <= 2 * 48 * 48 * 24
    # your own data: the demo's recipe stays out, only what you set is set
    own = validate_config(layered({"demo_data": {"enabled": False}, "train": {"max_minutes": 15}}))
    assert own.train.patch_size_vox is None and own.train.epochs is None and own.train.max_minutes == 15


def test_plan_command_writes_a_readable_plan(tiny_dataset: dict, make_config: Callable) -> None:
    from medseg.cli import main

    root = tiny_dataset["root"]
    config_path = root / "plan_config.yaml"
    config_path.write_text(make_config(root, patch_size_vox=None, batch_size=None).to_yaml())
    out = root / "plan.json"
    assert (
        main(["plan", "--config", str(config_path), "--manifest", str(tiny_dataset["manifest"]), "--output", str(out)])
        == 0
    )
    plan = read_json(out)
    assert plan["resample"]["target_spacing_mm"] == pytest.approx([1.5, 1.5, 2.5])  # set by make_config
    assert plan["train"]["patch_size_vox"] == plan["planned"]["train"]["patch_size_vox"]  # from the plan
    assert plan["overrides"]["train.channels"] == [4, 8, 16] and "train.patch_size_vox" not in plan["overrides"]


def test_ema_weights_are_the_ones_validated_saved_and_resumed(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_dataset["root"]
    config = make_config(root, epochs=4, val_every_epochs=1, network="unet", ema_decay=0.5)
    args = (config, tiny_dataset["manifest"], tiny_dataset["resample_dir"])
    run(*args, root / "straight")
    _crash_at_3_then_resume(args, root / "resumed", monkeypatch)
    # validation ran on the averaged weights, restored on resume: the same Dice as the uninterrupted run
    for a, b in zip(_history(root / "straight"), _history(root / "resumed"), strict=True):
        assert float(a["val_dice_mean"]) == pytest.approx(float(b["val_dice_mean"]), abs=1e-6)
    from medseg.models import load_state

    assert load_state(root / "straight" / "last.pt")["ema"]["n_averaged"] == 4 * config.train.iterations_per_epoch
    # ... and they are not the raw weights: the same run without the average validates differently
    raw = config.model_copy(update={"train": config.train.model_copy(update={"ema_decay": None})})
    run(raw, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "raw")
    dice = [[r["val_dice_mean"] for r in _history(root / f)] for f in ("straight", "raw")]
    assert dice[0] != dice[1]


def test_channels_last_layout_is_chosen_for_compiled_float32_cpu_steps_and_trains_like_the_default(
    tiny_dataset: dict, make_config: Callable
) -> None:
    import torch

    root = tiny_dataset["root"]
    config = make_config(root, epochs=2, network="unet")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    recipe = config.train
    with _torch_threads(2):  # the automatic choice skips one-thread jobs (the next test)
        assert loop.memory_format(recipe, cpu, compiled=True) == torch.channels_last_3d
        assert loop.memory_format(recipe, cpu, compiled=True, autocast=torch.bfloat16) is None  # 1.45x slower there
        forced = recipe.model_copy(update={"channels_last": True})
        assert loop.memory_format(forced, cpu, compiled=True, autocast=torch.bfloat16) == torch.channels_last_3d
        assert loop.memory_format(recipe, cpu, compiled=False) is None
        assert loop.memory_format(recipe, cuda, compiled=True) is None
        flat = recipe.model_copy(update={"spatial_dims": 2})
        assert loop.memory_format(flat, cpu, compiled=True) == torch.channels_last
        off = recipe.model_copy(update={"channels_last": False})
        assert loop.memory_format(off, cpu, compiled=True) is None
    # forced on in an eager run: the same training (to rounding), a checkpoint any layout loads
    layout = config.model_copy(update={"train": config.train.model_copy(update={"channels_last": True})})
    args = (tiny_dataset["manifest"], tiny_dataset["resample_dir"])
    run(config, *args, root / "contiguous")
    run(layout, *args, root / "channels_last")
    for a, b in zip(_history(root / "contiguous"), _history(root / "channels_last"), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-3)
    checkpoint = load_checkpoint(root / "channels_last" / "model.pt")
    weights = checkpoint.members[0]["state_dict"].values()
    assert any(w.dim() == 5 and not w.is_contiguous() for w in weights)  # saved as trained: channels-last
    test = next(e for e in read_manifest(tiny_dataset["manifest"]) if e.split == "test")
    prediction = infer_run(layout, root / "channels_last" / "model.pt", test.image, root / "infer_cl" / "p.nii.gz")
    assert all(0.0 <= r["dice"] <= 1.0 for r in score_patient(layout, test.patient_id, prediction, test.label))


def test_a_compiled_channels_last_step_that_fails_goes_on_in_the_default_layout(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch 2.13's inductor fails compiled float32 channels-last steps at one thread on some CPUs (an
    ``assert_size_stride`` in the generated code; seen when the thread tuner tried one thread on a busy 2-core Xeon).
    Stand-in: a first "compiled" step that raises as that one did; the run must train on, recompiled, contiguous."""
    import torch

    root = tiny_dataset["root"]
    config = make_config(root, epochs=2, network="unet")
    config = config.model_copy(update={"train": config.train.model_copy(update={"channels_last": True, "amp": False})})
    compiled: list[Callable] = []

    def fake_compile(module: torch.nn.Module) -> Callable:
        first = not compiled

        def step(x: torch.Tensor) -> torch.Tensor:
            if first:
                raise AssertionError("expected size 128==128, stride 175==1 at dim=1")
            assert x.is_contiguous() and all(p.is_contiguous() for p in module.parameters())
            return module(x)

        compiled.append(step)
        return step

    monkeypatch.setattr(loop, "compiles", lambda cfg, device: True)
    monkeypatch.setattr(torch, "compile", fake_compile)
    # two threads (the suite's torch may run one): the compiled step fails, the run goes on
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with caplog.at_level("WARNING", logger="medseg.train.loop"):
        run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "fallback")
    assert len(compiled) == 2  # compiled once more, after the failure
    assert "continuing in the default layout" in caplog.text and "stride 175==1" in caplog.text
    assert len(_history(root / "fallback")) == 2
    weights = load_checkpoint(root / "fallback" / "model.pt").members[0]["state_dict"].values()
    assert all(w.is_contiguous() for w in weights)
    # one thread: channels-last steps run eagerly, the failing compiled step is never called, the layout stays
    compiled.clear()
    caplog.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    run(config, tiny_dataset["manifest"], tiny_dataset["resample_dir"], root / "eager")
    assert len(compiled) == 1 and "continuing in the default layout" not in caplog.text
    weights = load_checkpoint(root / "eager" / "model.pt").members[0]["state_dict"].values()
    assert any(w.dim() == 5 and not w.is_contiguous() for w in weights)
    # and the automatic choice does not pick the layout for a job of one thread (still the patched count)
    assert loop.memory_format(make_config(root, epochs=2).train, torch.device("cpu"), compiled=True) is None
