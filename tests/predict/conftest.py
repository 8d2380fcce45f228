"""Fixtures of the predict tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from predict_helpers import save_checkpoint, tiny_config

from medseg.config import Config


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Config, Path]:
    """A config with a tiny model and that model's randomly initialised checkpoint."""
    config = tiny_config(tmp_path / "key")
    return config, save_checkpoint(config, tmp_path / "model.pt")
