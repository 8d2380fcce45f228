"""Post-processing rules and the automatic keep-largest plan on hand-checkable volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.config import Config
from medseg.errors import ConfigError
from medseg.io import read_volume, write_tsv, write_volume
from medseg.manifest import MANIFEST_COLUMNS
from medseg.postprocess.decision import decide, dice_per_class
from medseg.postprocess.functional import (
    ClassRule,
    apply_rules,
    class_rules,
    fill_holes,
    keep_largest_components,
    remove_small_components,
)
from medseg.volume import Label

SPACING = np.diag([0.5, 2.0, 1.0, 1.0])  # 1 mm3 voxels, anisotropic


def _label(shape: tuple[int, int, int] = (12, 8, 8)) -> np.ndarray:
    return np.zeros((1, *shape), np.uint8)


def test_remove_small_components_uses_mm3_and_per_class_sizes() -> None:
    a = _label()
    a[0, 0:4, 0:2, 0:2] = 1  # 16 voxels = 16 mm3
    a[0, 8, 6, 6] = 1  # 1 mm3
    a[0, 6:8, 4:6, 0:2] = 2  # 8 mm3
    out = remove_small_components(Label(a, SPACING), {1: 2.0, 2: 10.0}, 3).array[0]
    assert np.count_nonzero(out == 1) == 16 and out[8, 6, 6] == 0  # the 1 mm3 speck of class 1 went
    assert not (out == 2).any()  # class 2's 8 mm3 component is below its own 10 mm3
    # Diagonal neighbours are one component (26-connectivity): 2 voxels = 2 mm3 survive a 1.5 mm3 threshold.
    b = _label()
    b[0, 1, 1, 1] = b[0, 2, 2, 2] = 1
    assert np.count_nonzero(remove_small_components(Label(b, SPACING), 1.5, 2).array) == 2


def test_keep_largest_n_per_class_leaves_other_classes_alone() -> None:
    a = _label()
    a[0, 0:3, 0, 0] = 1  # 3 voxels
    a[0, 5, 0, 0] = 1  # 1 voxel
    a[0, 8:10, 0, 0] = 1  # 2 voxels
    a[0, 0, 5, 5] = 2
    a[0, 5, 5, 5] = 2
    out = keep_largest_components(Label(a, SPACING), {1: 2, 2: 0}).array[0]
    assert out[0:3, 0, 0].tolist() == [1, 1, 1] and out[8:10, 0, 0].tolist() == [1, 1] and out[5, 0, 0] == 0
    assert np.count_nonzero(out == 2) == 2  # n = 0 keeps everything


def test_fill_holes_fills_background_only() -> None:
    a = _label()
    a[0, 2:7, 2:7, 2:7] = 1
    a[0, 4, 4, 4] = 0  # a background cavity
    a[0, 3, 3, 3] = 2  # another class nested inside: must survive
    out = fill_holes(Label(a, SPACING), [1]).array[0]
    assert out[4, 4, 4] == 1 and out[3, 3, 3] == 2
    a[0, 4, 4, 2] = 0  # open the cavity to the outside? no: (4,4,2) is on the face, (4,4,3) still closes it
    a[0, 4, 4, 3] = 0
    opened = fill_holes(Label(a, SPACING), [1]).array[0]
    assert opened[4, 4, 4] == 0  # now connected to the outside through a face: not a hole


def test_class_rules_resolve_overrides_and_reject_unknown_names() -> None:
    config = Config.model_validate(
        {"postprocess": {"min_component_mm3": 5, "per_class": {"organ_b": {"keep_largest_n": 1, "fill_holes": True}}}}
    )
    rules = class_rules(config.postprocess, config.classes)
    assert rules == {1: ClassRule(5.0, 0, False), 2: ClassRule(5.0, 1, True)}
    bad = Config.model_validate({"postprocess": {"per_class": {"liver": {"keep_largest_n": 1}}}})
    with pytest.raises(ConfigError, match="liver"):
        class_rules(bad.postprocess, bad.classes)


def test_apply_rules_order() -> None:
    a = _label()
    a[0, 0:5, 0:5, 0:5] = 1
    a[0, 2, 2, 2] = 0  # hole
    a[0, 8:10, 6, 6] = 1  # a 2 mm3 component
    a[0, 11, 0, 0] = 1  # a 1 mm3 component
    out = apply_rules(Label(a, SPACING), {1: ClassRule(1.5, 1, True)}).array[0]
    assert np.count_nonzero(out == 1) == 125


def test_decide_follows_nnunet_rule_by_hand() -> None:
    # Two cases, two classes; rows: configured rules, keep-largest on class 1, keep-largest on class 2.
    case1 = np.array([[0.6, 0.8], [0.9, 0.8], [0.6, 0.7]])
    case2 = np.array([[0.8, np.nan], [0.8, np.nan], [0.8, np.nan]])
    # class 1: means 0.7 -> 0.85, class 2 unchanged: accepted. class 2: 0.8 -> 0.7: rejected.
    assert decide([case1, case2]) == [1]
    # A trial that lifts the mean but lowers another class is rejected.
    coupled = np.array([[0.5, 0.8], [0.9, 0.79], [0.5, 0.8]])
    assert decide([coupled]) == []
    # No change is no improvement.
    assert decide([np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])]) == []


def test_dice_per_class_on_label_maps() -> None:
    ref = np.array([1, 1, 2, 0], np.uint8).reshape(4, 1, 1)
    pred = np.array([1, 0, 2, 2], np.uint8).reshape(4, 1, 1)
    assert dice_per_class(pred, ref, 3).tolist()[:2] == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    assert np.isnan(dice_per_class(pred, ref, 3)[2])


def test_postprocess_plan_and_apply_from_the_cli(tmp_path: Path) -> None:
    """Class 1 predictions carry a false-positive speck (keep-largest helps); class 2 is split in two real
    halves (keep-largest would hurt). The plan must pick class 1 only, and `postprocess --plan` applies it."""
    rows = []
    for i in range(3):
        ref = _label((16, 8, 8))
        ref[0, 1:6, 1:6, 1:6] = 1
        ref[0, 8:10, 1:6, 1:6] = 2
        ref[0, 12:14, 1:6, 1:6] = 2
        pred = ref.copy()
        pred[0, 14 - i : 15 - i, 7, 7] = 1  # a far speck of class 1 (27 mm3 threshold off below)
        write_volume(Label(ref, SPACING), tmp_path / "labels" / f"p{i}.nii.gz")
        write_volume(Label(pred, SPACING), tmp_path / "pred" / f"p{i}.nii.gz")
        label = str(tmp_path / "labels" / f"p{i}.nii.gz")
        rows.append({"patient_id": f"p{i}", "subject_id": f"s{i}", "image": label, "label": label, "split": "val"})
    write_tsv(tmp_path / "manifest.tsv", rows, MANIFEST_COLUMNS)
    (tmp_path / "config.yaml").write_text("postprocess:\n  min_component_mm3: 0\n")
    config = ["--config", str(tmp_path / "config.yaml")]
    plan_file = tmp_path / "plan.json"
    inputs = ["--manifest", str(tmp_path / "manifest.tsv"), "--predictions", str(tmp_path / "pred")]
    rc = main(["postprocess-decide", *config, *inputs, "--output", str(plan_file)])
    assert rc == 0
    decision = json.loads(plan_file.read_text())
    assert decision["keep_largest"] == ["organ_a"] and decision["n_cases"] == 3
    assert decision["classes"]["organ_b"]["dice_with_keep_largest"] < decision["classes"]["organ_b"]["dice_before"]
    assert decision["mean_dice_after"] > decision["mean_dice_before"]
    out = tmp_path / "clean.nii.gz"
    assert main(["postprocess", *config, "--input", str(tmp_path / "pred" / "p0.nii.gz"), "--output", str(out)]) == 0
    assert read_volume(out, Label).array[0, 14, 7, 7] == 1  # without the plan the speck stays
    args = ["postprocess", *config, "--input", str(tmp_path / "pred" / "p0.nii.gz"), "--output", str(out)]
    assert main([*args, "--decision", str(plan_file)]) == 0
    cleaned = read_volume(out, Label).array[0]
    assert cleaned[14, 7, 7] == 0 and np.count_nonzero(cleaned == 2) == 100
