from pathlib import Path

import pytest
import yaml

from medseg.cli import main
from medseg.config import Config, load_config, validate_config
from medseg.errors import ConfigError


def test_every_shipped_config_validates(repo: Path) -> None:
    for path in sorted((repo / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config)


def test_default_yaml_is_the_library_defaults(repo: Path) -> None:
    # configs/default.yaml documents the defaults; it must not drift from them (the demo's recipe is demo.yaml).
    assert load_config(repo / "configs" / "default.yaml").to_dict() == Config().to_dict()
    # an augmentation key written there would count as set by the user and silence the plan's preset
    assert load_config(repo / "configs" / "default.yaml").train.augment.model_fields_set == {"preset"}


def test_misspelt_section_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        validate_config({"trian": {"epochs": 3}}, "x.yaml")


def test_bad_value_is_named_with_its_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*'fast'"):
        validate_config({"train": {"learning_rate": "fast"}}, "x.yaml")


def test_nested_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'resample\.target_spacing'"):
        validate_config({"resample": {"target_spacing": [1, 1, 1]}})


@pytest.mark.parametrize("bad", [{"trian": {"epochs": 2}}, {"train": {"learning_rate": "fast"}}])
def test_cli_exits_nonzero_naming_the_key(tmp_path: Path, bad: dict, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["check-config", "--config", str(path)]) == 1
    key = "trian" if "trian" in bad else "train.learning_rate"
    assert key in caplog.text and str(path) in caplog.text


def test_digest_changes_with_config_and_sections_are_independent() -> None:
    a, b = Config(), validate_config({"train": {"epochs": 3}})
    assert a.digest() != b.digest()
    assert a.section_digest("train") != b.section_digest("train")
    assert a.section_digest("resample") == b.section_digest("resample")


def test_the_config_file_the_workflow_hands_its_jobs_keeps_the_plans_augmentation_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user config without augmentation keys: the jobs load results/config.yaml, and the plan's `light` preset
    (CPU) must still replace nnU-Net's values there (written in full, every augmentation key read back as set)."""
    from medseg.plan.functional import LIGHT_AUGMENT, resolve_augment
    from medseg.workflow import Workflow

    monkeypatch.chdir(tmp_path)
    user = {"dataset": "own", "demo_data": {"enabled": False}, "paths": {"raw_dir": str(tmp_path)}}
    workflow = Workflow.from_snakemake(user)
    loaded = load_config(workflow.config_file)
    assert loaded.digest() == workflow.config.digest()  # the same config
    assert loaded.train.augment.model_fields_set == {"preset"}
    light = resolve_augment(loaded.train.augment, "light")
    assert light.rotation_deg == LIGHT_AUGMENT["rotation_deg"] and light.scale_range == LIGHT_AUGMENT["scale_range"]
