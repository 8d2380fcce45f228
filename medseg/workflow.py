"""Paths, shards and target lists for the Snakemake workflow, importable (and so testable) outside Snakemake.

The Snakefile hands Snakemake's ``config`` (the user's ``--configfile``/``--config``) to
:meth:`Workflow.from_snakemake`, which lays it over the library defaults (``configs/default.yaml``) and, while
``demo_data.enabled`` is true, the demo's recipe (``configs/demo.yaml``); validates the result; and writes it to
``<results_dir>/config.yaml`` (only when it changed, so that an unchanged config never looks new). Every rule
passes that file to its ``medseg`` command.

Stage graph: demo_data -> ingest (checkpoint) -> plan -> resample (shards) -> train (one job, or one per fold, then
ensemble) -> infer (shards) -> postprocess_decide -> postprocess (shards) -> evaluate -> report. A shard is
``jobs.cases_per_job`` patients of the sorted manifest, so that hundreds of small cases do not cost a process each.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.config import Config, validate_config
from medseg.io import read_tsv, write_text
from medseg.manifest import read_manifest, select

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: mappings merge key by key, anything else is replaced (Snakemake's rule)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def layered(user: dict[str, Any], configs: Path = CONFIGS) -> dict[str, Any]:
    """The library defaults, the demo recipe while the demo is on (``configs/demo.yaml``, or ``demo_xray.yaml`` for
    ``demo_data.kind: xray``), then the user's config."""
    base = yaml.safe_load((configs / "default.yaml").read_text()) or {}
    demo = merge(base, user).get("demo_data", {})
    if demo.get("enabled", True):
        recipe = "demo_xray.yaml" if demo.get("kind", "ct") == "xray" else "demo.yaml"
        base = merge(base, yaml.safe_load((configs / recipe).read_text()) or {})
    return merge(base, user)


def listing_digest(folder: Path) -> str:
    """A digest of the files below ``folder`` (relative path, size, modification time), for a rule's params.

    Snakemake dates a folder input by the folder's own time, which a file replaced, fixed or added below its top
    level does not move. Names starting with a dot are left out (``.DS_Store``, Snakemake's
    ``.snakemake_timestamp``). A hash, so Snakemake's metadata records no file or folder name. About a second per
    50,000 files.
    """
    digest = hashlib.sha256()
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(parent, name)
            try:
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # a broken link, a file gone meanwhile: the stage reports it
                size, mtime = -1, -1
            digest.update(f"{os.path.relpath(path, folder)}\0{size}\0{mtime}\n".encode(errors="replace"))
    return digest.hexdigest()


def chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` in as few shards of at most ``size`` as possible, balanced: 52 by 40 gives 26 + 26, not 40 + 12
    (the slowest shard sets the stage's wall time)."""
    count = -(-len(items) // size)
    return [items[k * len(items) // count : (k + 1) * len(items) // count] for k in range(count)]


# What each rule asks a cluster executor for: memory (MB) and a wall-time limit (minutes). Sized for a CT of
# 512 x 512 x 600 float32 (600 MB) plus its copies in the stage; `jobs.mem_mb` / `jobs.runtime_min` (or a
# profile's set-resources) override them per rule. Training's limit follows train.max_minutes when it is set.
RULE_MEM_MB = {
    "demo_data": 2000,
    "ingest": 8000,
    "plan": 8000,
    "resample": 8000,
    "train": 32000,
    "train_fold": 32000,
    "infer": 16000,
    "postprocess_decide": 8000,
    "postprocess": 8000,
    "evaluate": 8000,
    "report": 4000,
    "predict_series_list": 4000,
    "predict": 16000,
    "predict_all": 2000,
}
RULE_RUNTIME_MIN = {"demo_data": 15, "ingest": 120, "plan": 60, "train": 24 * 60, "report": 30}
DEFAULT_RUNTIME_MIN = 120


_REGISTERED_NOW: dict[tuple[str, str], str] = {}  # (tracking config, models:/ URI) -> version and checksum


@dataclass(frozen=True)
class Workflow:
    config: Config

    def resources(self, rule: str, gpu: bool = False) -> dict[str, Any]:
        """Snakemake resources of ``rule``: ``mem_mb``, ``runtime`` (minutes) and, for train and infer, ``gpu``
        (read by the SLURM and Kubernetes executors alike; locally only ``--resources gpu=N`` limits them)."""
        jobs = self.config.jobs
        runtime = RULE_RUNTIME_MIN.get(rule, DEFAULT_RUNTIME_MIN)
        minutes = self.config.train.max_minutes
        if rule in ("train", "train_fold") and minutes:
            runtime = int(minutes * 1.25) + 30  # loading, validation and the model's logging besides the budget
        out: dict[str, Any] = {
            "mem_mb": jobs.mem_mb.get(rule, RULE_MEM_MB.get(rule, 4000)),
            "runtime": jobs.runtime_min.get(rule, runtime),
        }
        if gpu:
            out["gpu"] = jobs.gpus
        return out

    @classmethod
    def from_snakemake(cls, config: dict[str, Any], source: str = "Snakemake config") -> Workflow:
        wf = cls(validate_config(layered(dict(config)), source))
        # the keys that were set (every key of configs/default.yaml, the demo's, the user's), not the model's
        # defaults too: written out in full, augmentation values nobody set would read back as set, and the plan's
        # preset (`light` on a CPU) would no longer replace them in the jobs that load this file
        text = yaml.safe_dump(wf.config.model_dump(mode="json", exclude_unset=True), sort_keys=False)
        path = wf.config_file
        if not path.exists() or path.read_text() != text:
            write_text(path, text)
        return wf

    def check_tracking(self) -> None:
        """Raise :class:`medseg.errors.TrackingError` when ``tracking.uri`` names a server that does not answer."""
        uri = self.config.tracking.uri
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            return  # a local store: nothing to reach (and no mlflow import in Snakemake's process)
        from medseg.tracking import check_reachable

        check_reachable(self.config.tracking)

    @property
    def results(self) -> Path:
        return self.config.paths.results_dir

    @property
    def config_file(self) -> Path:
        return self.results / "config.yaml"

    @property
    def raw_dir(self) -> Path:
        return self.config.paths.raw_dir

    def raw_listing_digest(self) -> str:
        """:func:`listing_digest` of the input folder, a parameter of ingest, so that a file replaced, fixed or added
        below its top level (say the one ``failures.tsv`` named) runs ingest, and every stage after it, again.
        Empty for the demo: its folder is the demo_data rule's output, which Snakemake already follows, and its
        listing before that rule runs would differ from the next invocation's."""
        return "" if self.config.demo_data.enabled else listing_digest(self.raw_dir)

    @property
    def manifest(self) -> Path:
        return self.config.paths.manifests_dir / f"{self.config.dataset}.tsv"

    @property
    def plan(self) -> Path:
        return self.stage_dir("plan") / "plan.json"

    def stage_dir(self, stage: str) -> Path:
        return self.results / stage

    def log(self, name: str) -> str:
        return str(self.results / "logs" / f"{name}.log")

    def benchmark(self, name: str) -> str:
        """Snakemake's ``benchmark:`` file of a job (wall seconds, memory): training's cost, read apart."""
        return str(self.results / "benchmarks" / f"{name}.tsv")

    def patients(self, *splits: str) -> list[str]:
        """Patient ids of the given splits, sorted, read from the manifest (call after the ingest checkpoint)."""
        return sorted(e.patient_id for e in select(read_manifest(self.manifest), *splits))

    # --- shards of per-case stages ---------------------------------------------------------------------------

    def _shards(self, patients: list[str]) -> list[list[str]]:
        return chunks(patients, self.config.jobs.cases_per_job)

    def resample_shards(self) -> dict[str, list[str]]:
        """Shard name -> patients, over the train and val patients (training needs them; infer resamples itself)."""
        return {str(i): s for i, s in enumerate(self._shards(self.patients("train", "val")))}

    def resample_records(self) -> list[str]:
        return [str(self.stage_dir("resample") / "shards" / f"{k}.json") for k in self.resample_shards()]

    @property
    def folds(self) -> int | None:
        return self.config.train.folds

    def infer_groups(self) -> dict[str, list[str]]:
        """Which model predicts whom: ``test`` (the model, or the folds' ensemble) always; for the keep-largest
        decision, ``val`` (the model) or, with folds, ``fold<k>`` (fold k's held-out patients, by fold k's model:
        out-of-fold predictions)."""
        groups = {"test": self.patients("test")}
        if self.config.postprocess.auto_keep_largest:
            if self.folds:
                from medseg.plan.run import assign_folds, training_pool  # the plan stage's own fold rule

                pool = training_pool(read_manifest(self.manifest))
                fold_of = assign_folds(pool, self.folds, self.config.train.seed)
                for k in range(self.folds):
                    groups[f"fold{k}"] = sorted(p for p, f in fold_of.items() if f == k)
            else:
                groups["val"] = self.patients("val")
        return {g: p for g, p in groups.items() if p}

    def infer_shards(self) -> dict[str, list[str]]:
        """Shard name ``<group>-<i>`` -> patients."""
        return {f"{g}-{i}": s for g, ps in self.infer_groups().items() for i, s in enumerate(self._shards(ps))}

    def infer_records(self, *groups: str) -> list[str]:
        d = self.stage_dir("infer") / "shards"
        return [str(d / f"{k}.json") for k in self.infer_shards() if not groups or k.rsplit("-", 1)[0] in groups]

    def decision_records(self) -> list[str]:
        """The predictions the keep-largest decision is made on: val, or every fold's out-of-fold ones."""
        groups = [f"fold{k}" for k in range(self.folds)] if self.folds else ["val"]
        return self.infer_records(*groups)

    def decision_splits(self) -> str:
        return "--split train --split val" if self.folds else "--split val"

    def model_for(self, shard: str) -> str:
        """The model a shard of infer uses: fold k's for ``fold<k>-*``, else the workflow's model."""
        group = shard.rsplit("-", 1)[0]
        if group.startswith("fold"):
            return str(self.fold_dir(int(group[4:])) / "model.pt")
        return str(self.model)

    def postprocess_shards(self) -> dict[str, list[str]]:
        return {str(i): s for i, s in enumerate(self._shards(self.patients("test")))}

    def postprocess_records(self) -> list[str]:
        return [str(self.stage_dir("postprocess") / "shards" / f"{k}.json") for k in self.postprocess_shards()]

    # --- training ------------------------------------------------------------------------------------------

    @property
    def model(self) -> Path:
        """The model later stages use: the single model, or the folds' ensemble."""
        return self.stage_dir("train") / "model.pt"

    def fold_dir(self, fold: int) -> Path:
        return self.stage_dir("train") / f"fold{fold}"

    def fold_models(self) -> list[str]:
        return [str(self.fold_dir(k) / "model.pt") for k in range(self.folds or 0)]

    @property
    def postprocess_decision(self) -> Path:
        return self.stage_dir("postprocess") / "decision.json"

    def postprocess_decision_inputs(self) -> list[str]:
        """The decision as an input of every ``postprocess`` job, when one is made (auto mode, validation patients)."""
        made = self.config.postprocess.auto_keep_largest and bool(self.decision_records())
        return [str(self.postprocess_decision)] if made else []

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
    def predict_series_list(self) -> Path:
        """``series.tsv``: the eligible series below ``predict.input_dir``, one job each."""
        return self.predict_dir / "series.tsv"

    @property
    def predict_model(self) -> str:
        """What ``--model`` gets: ``predict.model`` if set, else the model this workflow trains."""
        return self.config.predict.model or str(self.model)

    def predict_model_version(self) -> str:
        """For ``predict.model: models:/<name>@<alias>``, the version the alias names now and its checksum: a
        parameter of each predict job, so that promoting another version predicts again, which the unchanged URI
        alone would not. Empty for a file (Snakemake follows its time), a run id or a fixed version (they do not
        move). Asked of the registry once per Snakemake process.

        Raises:
            MedsegError: the alias, or the registry, cannot be found.
        """
        model = self.config.predict.model
        if model is None or not model.startswith("models:/") or "@" not in model:
            return ""
        key = (self.config.tracking.model_dump_json(), model)
        if key not in _REGISTERED_NOW:
            from medseg.tracking import resolve_registered

            found = resolve_registered(self.config.tracking, model)
            _REGISTERED_NOW[key] = f"{found.label} {found.sha256}"
        return _REGISTERED_NOW[key]

    def predict_model_inputs(self) -> list[str]:
        """The model as a rule input when it is a local file (an MLflow run id or URI is not a file)."""
        model = self.predict_model
        return [model] if self.config.predict.model is None or Path(model).suffix == ".pt" else []

    def predict_record(self, series_id: str) -> str:
        return str(self.predict_dir / "records" / f"{series_id}.json")

    def predict_records(self) -> list[str]:
        """One record per series of the plan (call after the predict_series_list checkpoint)."""
        return [self.predict_record(r["series_id"]) for r in read_tsv(self.predict_series_list)]

    def predict_targets(self) -> list[str]:
        """The summary of predicting ``predict.input_dir``; nothing when it is not set."""
        return [str(self.predict_dir / "summary.tsv")] if self.config.predict.input_dir is not None else []


def after_checkpoint(checkpoint: Any, targets: Callable[..., Any]) -> Callable[[Any], Any]:
    """An input/params function for Snakemake: wait for ``checkpoint`` (the manifest exists), then call
    ``targets()``, or ``targets(wildcards)`` when it takes an argument."""

    takes_wildcards = bool(inspect.signature(targets).parameters)

    def inputs(wildcards: Any) -> Any:
        checkpoint.get()
        return targets(wildcards) if takes_wildcards else targets()

    return inputs
