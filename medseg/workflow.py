"""Paths and target lists for the Snakemake workflow, importable (and so testable) outside Snakemake.

The Snakefile validates Snakemake's ``config`` through :meth:`Workflow.from_snakemake`, which writes the resolved
config to ``<results_dir>/config.yaml`` (only when it changed, so that an unchanged config never looks new);
every rule passes that file to its ``medseg`` command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.config import Config, validate_config
from medseg.io import write_text
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

    def final_targets(self) -> list[str]:
        d = self.stage_dir("evaluate")
        return [str(d / "metrics.tsv"), str(d / "summary.json")]
