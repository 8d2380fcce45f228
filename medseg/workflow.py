"""Paths and target lists for the Snakemake workflow, importable (and so testable) outside Snakemake.

The Snakefile validates Snakemake's ``config`` through :meth:`Workflow.from_snakemake`, which writes the resolved
config to ``<results_dir>/config.yaml`` (only when it changed, so that an unchanged config never looks new);
every rule passes that file to its ``medseg`` command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.config import Config, validate_config
from medseg.io import read_tsv, write_text
from medseg.manifest import read_manifest, select


@dataclass(frozen=True)
class Workflow:
    config: Config

    @classmethod
    def from_snakemake(cls, config: dict[str, Any], source: str = "Snakemake config") -> Workflow:
        wf = cls(validate_config(config, source))
        text = wf.config.to_yaml()
        path = wf.config_file
        if not path.exists() or path.read_text() != text:
            write_text(path, text)
        return wf

    @property
    def results(self) -> Path:
        return self.config.paths.results_dir

    @property
    def config_file(self) -> Path:
        return self.results / "config.yaml"

    @property
    def raw_dir(self) -> Path:
        return self.config.paths.raw_dir

    @property
    def manifest(self) -> Path:
        return self.config.paths.manifests_dir / f"{self.config.dataset}.tsv"

    def stage_dir(self, stage: str) -> Path:
        return self.results / stage

    def log(self, name: str) -> str:
        return str(self.results / "logs" / f"{name}.log")

    def patients(self, *splits: str) -> list[str]:
        """Patient ids of the given splits, read from the manifest (call after the ingest checkpoint)."""
        return [e.patient_id for e in select(read_manifest(self.manifest), *splits)]

    def resampled_inputs(self) -> list[str]:
        d = self.stage_dir("resample")
        return [str(d / f"{p}{s}") for p in self.patients("train", "val") for s in ("_image.nii.gz", "_label.nii.gz")]

    def postprocessed_predictions(self) -> list[str]:
        return [str(self.stage_dir("postprocess") / f"{p}.nii.gz") for p in self.patients("test")]

    def validation_predictions(self) -> list[str]:
        """What ``postprocess_plan`` decides on: the validation patients' raw predictions."""
        return [str(self.stage_dir("infer") / f"{p}.nii.gz") for p in self.patients("val")]

    @property
    def postprocess_plan(self) -> Path:
        return self.stage_dir("postprocess") / "plan.json"

    def postprocess_plan_inputs(self) -> list[str]:
        """The plan as an input of every ``postprocess`` job, when one is made (auto mode, validation patients)."""
        made = self.config.postprocess.auto_keep_largest and bool(self.patients("val"))
        return [str(self.postprocess_plan)] if made else []

    def final_targets(self) -> list[str]:
        d = self.stage_dir("evaluate")
        return [str(d / "metrics.tsv"), str(d / "summary.json"), str(self.report_file), *self.predict_targets()]

    @property
    def report_file(self) -> Path:
        return self.stage_dir("report") / "report.html"

    @property
    def predict_dir(self) -> Path:
        return self.stage_dir("predict")

    @property
    def predict_plan(self) -> Path:
        """``series.tsv``: the eligible series below ``predict.input_dir``, one job each."""
        return self.predict_dir / "series.tsv"

    @property
    def predict_model(self) -> str:
        """What ``--model`` gets: ``predict.model`` if set, else the model this workflow trains."""
        return self.config.predict.model or str(self.stage_dir("train") / "model.pt")

    def predict_model_inputs(self) -> list[str]:
        """The model as a rule input when it is a local file (an MLflow run id or URI is not a file)."""
        model = self.predict_model
        return [model] if self.config.predict.model is None or Path(model).suffix == ".pt" else []

    def predict_record(self, series_id: str) -> str:
        return str(self.predict_dir / "records" / f"{series_id}.json")

    def predict_records(self) -> list[str]:
        """One record per series of the plan (call after the predict_plan checkpoint)."""
        return [self.predict_record(r["series_id"]) for r in read_tsv(self.predict_plan)]

    def predict_targets(self) -> list[str]:
        """The summary of predicting ``predict.input_dir``; nothing when it is not set."""
        return [str(self.predict_dir / "summary.tsv")] if self.config.predict.input_dir is not None else []


def after_checkpoint(checkpoint: Any, targets: Callable[[], list[str]]) -> Callable[[Any], list[str]]:
    """An input function for Snakemake: wait for ``checkpoint`` (the manifest exists), then list ``targets()``."""

    def inputs(_wildcards: Any) -> list[str]:
        checkpoint.get()
        return targets()

    return inputs
