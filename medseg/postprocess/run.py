"""`medseg postprocess`: clean one predicted label."""

from __future__ import annotations

from pathlib import Path

from medseg.config import Config
from medseg.io import read_volume, write_volume
from medseg.postprocess.functional import remove_small_components
from medseg.volume import Label


def run(config: Config, prediction: Path, output_path: Path) -> Path:
    label = read_volume(prediction, Label)
    cleaned = remove_small_components(label, config.postprocess.min_component_mm3, config.num_classes)
    return write_volume(cleaned, output_path)
