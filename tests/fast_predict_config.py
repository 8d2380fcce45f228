"""The config data of the predict and reliability tests: a tiny model and coarse preprocessing, so that a
512 x 512 scan predicts in a second or two. (tests/ is on sys.path: pytest puts the rootdir conftest's folder there.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fast_predict_config(classes: list[str], key_file: Path) -> dict[str, Any]:
    return {
        "classes": list(classes),
        "ingest": {"pseudonym_key_file": str(key_file)},
        "resample": {"target_spacing_mm": [4.0, 4.0, 6.5], "normalization": "zscore"},
        "train": {
            "network": "unet",
            "channels": [4, 8],
            "strides": [2],
            "num_res_units": 0,
            "patch_size_vox": [32, 32, 8],
        },
        "infer": {"device": "cpu", "overlap": 0.25, "sw_batch_size": 8},
    }
