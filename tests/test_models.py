"""Checkpoints: plain data only (a pickle that would run code is refused, never run), fold ensembles average."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.config import validate_config
from medseg.errors import ModelLoadError
from medseg.io import write_volume
from medseg.models import Ensemble, load_checkpoint, save_checkpoint
from medseg.networks import build_network
from medseg.train.loop import load_resume_state
from medseg.volume import Image


class _RunsCode:
    """Unpickling this object runs ``touch <marker>``: what a planted model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"format": "medseg-checkpoint", "members": [], "config": {}, "payload": _RunsCode(marker)}, path)
    return path


def _config() -> object:
    return validate_config(
        {
            "classes": ["a"],
            "resample": {"target_spacing_mm": [1.0, 1.0, 1.0], "normalization": "zscore"},
            "train": {"network": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0,
                      "patch_size_vox": [16, 16, 8], "batch_size": 1, "epochs": 1},
        }
    )  # fmt: skip


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil.pt", marker)
    with pytest.raises(ModelLoadError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_predict_refuses_a_planted_or_foreign_model_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "ran"
    text = tmp_path / "notes.pt"
    text.write_text("this is not a model\n")
    write_volume(Image(np.zeros((1, 16, 16, 8), np.float32), np.eye(4)), tmp_path / "in" / "scan.nii.gz")
    config = tmp_path / "config.yaml"
    config.write_text(f"ingest: {{pseudonym_key_file: {tmp_path / 'key'}}}\n")
    for model, says in ((_evil(tmp_path / "evil.pt", marker), "refused"), (text, "refused")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            args = ["predict", "--config", str(config), "--model", str(model), "--input", str(tmp_path / "in")]
            assert main([*args, "--output", str(tmp_path / "out")]) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and says in errors[0] and model.name in errors[0], errors
        assert "Traceback" not in caplog.text
    assert not marker.exists()


def test_resume_ignores_a_planted_last_pt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "ran"
    _evil(tmp_path / "last.pt", marker)
    with caplog.at_level(logging.WARNING):
        assert load_resume_state(tmp_path, "any") is None
    assert not marker.exists() and "starting afresh" in caplog.text


def test_a_checkpoint_round_trips_and_an_ensemble_averages_probabilities(tmp_path: Path) -> None:
    config = _config()
    torch.manual_seed(0)
    nets = [build_network(config.train, config.num_classes).eval() for _ in range(2)]
    members = [{"state_dict": n.state_dict(), "fold": k, "epoch": 1, "val_dice": 0.5} for k, n in enumerate(nets)]
    path = save_checkpoint(tmp_path / "model.pt", config, members, contract={"modalities": ["MR"]})
    checkpoint = load_checkpoint(path)
    assert checkpoint.contract == {"modalities": ["MR"]} and [m["fold"] for m in checkpoint.members] == [0, 1]
    ensemble = checkpoint.network("cpu")
    assert isinstance(ensemble, Ensemble)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        expected = (torch.softmax(nets[0](x), 1) + torch.softmax(nets[1](x), 1)) / 2
        assert torch.allclose(torch.softmax(ensemble(x), 1), expected, atol=1e-5)


def test_the_benchmark_averages_checkpoints_as_one_ensemble_and_refuses_mismatched_ones(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "hippocampus_bench", Path(__file__).parents[1] / "benchmarks" / "hippocampus.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = _config()
    torch.manual_seed(0)
    nets = [build_network(config.train, config.num_classes).eval() for _ in range(3)]
    one = [{"state_dict": nets[0].state_dict(), "fold": None, "epoch": 1, "val_dice": 0.5}]
    folds = [{"state_dict": n.state_dict(), "fold": k, "epoch": 1, "val_dice": 0.5} for k, n in enumerate(nets[1:])]
    paths = [save_checkpoint(tmp_path / "a.pt", config, one), save_checkpoint(tmp_path / "b.pt", config, folds)]
    model, trained = bench.checkpoint_ensemble(paths, torch.device("cpu"))
    assert isinstance(model, Ensemble) and len(model.members) == 3 and trained.train == config.train
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        expected = sum(torch.softmax(n(x), 1) for n in nets) / 3
        assert torch.allclose(torch.softmax(model(x), 1), expected, atol=1e-5)
    other_patch = config.model_copy(update={"train": config.train.model_copy(update={"patch_size_vox": (16, 16, 16)})})
    for other in (other_patch, config.model_copy(update={"classes": ["a", "b"]})):
        odd = save_checkpoint(tmp_path / "odd.pt", other, one)
        with pytest.raises(SystemExit, match=r"odd\.pt"):
            bench.checkpoint_ensemble([paths[0], odd], torch.device("cpu"))
