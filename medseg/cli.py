"""The `medseg` command: one subcommand per pipeline stage. The only place that configures logging.

Exit status: 0 done; 1 an error stopped the command (the message says why); 3 the batch finished but skipped
some cases (see the failures report; ``--skips-ok`` turns this into 0 for workflows that should go on).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medseg.config import Config, load_config
from medseg.errors import ConfigError, MedsegError

log = logging.getLogger("medseg")

EXIT_ERROR, EXIT_SKIPPED = 1, 3


def _track(items: Iterable[Any], description: str, total: int) -> Iterable[Any]:
    """A rich progress bar (cases done, time left) on a terminal; plain iteration in logs and CI."""
    if not sys.stderr.isatty():
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=False)


def _demo_data(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.demo_data.run import run

    folders = run(cfg, Path(args.output))
    log.info("demo cohort of %d patients written to %s", len(folders), args.output)
    return 0


def usable_folder(path: Path, option: str) -> None:
    """Fail at once, before any work, where ``path`` cannot become a folder to write into.

    Raises:
        ConfigError: ``path`` or a folder above it is an existing file, or the nearest existing folder is not
            writable; the message names the option and the path.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a folder: name a folder (created if missing)")
    _writable_parent(path, option)


def usable_file(path: Path, option: str) -> None:
    """Fail at once, before any work, where the file ``path`` cannot be written.

    Raises:
        ConfigError: ``path`` is a folder, a folder above it is a file, or the nearest existing folder is not
            writable.
    """
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder, not a file: name the file to write")
    _writable_parent(path.parent, option, named=path)


def _writable_parent(path: Path, option: str, named: Path | None = None) -> None:
    named = named or path
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {named}: {parent} is an existing file, so nothing can be written below it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{option} {named}: the folder {parent} is not writable")
            return


def _ingest(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.ingest.run import run

    usable_folder(Path(args.output), "--output")
    usable_file(Path(args.manifest), "--manifest")
    result = run(cfg, Path(args.input), Path(args.output), Path(args.manifest), track=_track)
    log.info(
        "ingested %d case(s), skipped %d; manifest %s, failures report %s",
        len(result.rows),
        len(result.failures),
        args.manifest,
        Path(args.output) / "failures.tsv",
    )
    if not result.rows:
        log.error("nothing could be ingested from the input folder (see the failures report)")
        return EXIT_ERROR
    return EXIT_SKIPPED if result.failures and not args.skips_ok else 0


def _entries(manifest: str, patient_ids: list[str] | None) -> list[Any]:
    """The manifest's entries, or only ``patient_ids`` (a workflow shard), in that order."""
    from medseg.manifest import read_manifest

    entries = read_manifest(manifest)
    if patient_ids is None:
        return entries
    by_id = {e.patient_id: e for e in entries}
    unknown = [p for p in patient_ids if p not in by_id]
    if unknown:
        raise MedsegError(f"patient(s) {', '.join(unknown)} not in manifest {manifest}")
    return [by_id[p] for p in patient_ids]


def _shard_record(path: str | None, patients: Sequence[str], failures: list[dict[str, str]], **extra: Any) -> None:
    from medseg.io import write_json

    if path:
        write_json(path, {"patients": list(patients), "failures": failures, **extra})


def _resample(cfg: Config, args: argparse.Namespace) -> int:
    import torch

    from medseg.resample.run import run_many

    torch.set_num_threads(1)  # the pool runs cases side by side; one torch thread each does not oversubscribe
    from medseg.device import usable_cores

    args.threads = min(args.threads, usable_cores())
    wanted = _entries(args.manifest, args.patient_id)
    if args.plan:
        from medseg.plan.run import load_resample_section

        cfg = cfg.model_copy(update={"resample": load_resample_section(Path(args.plan))})
    failures = run_many(cfg, wanted, Path(args.output_dir), args.threads, track=_track)
    if failures:
        log.error("%d of %d patient(s) could not be resampled", len(failures), len(wanted))
        return EXIT_ERROR
    _shard_record(args.record, [e.patient_id for e in wanted], failures)
    log.info("%d patient(s) resampled into %s", len(wanted), args.output_dir)
    return 0


def _train(cfg: Config, args: argparse.Namespace) -> int:
    from medseg import distributed
    from medseg.train.run import run

    nproc = distributed.processes(cfg.train.processes, cfg.train.device)
    if nproc > 1 and not distributed.launched().active:
        distributed.relaunch(sys.argv[1:], nproc)  # DDP: this process becomes torchrun

    try:
        summary = run(
            cfg,
            Path(args.manifest),
            Path(args.resample_dir),
            Path(args.output_dir),
            threads=args.threads,
            plan_path=Path(args.plan) if args.plan else None,
            fold=args.fold,
        )
    finally:
        distributed.stop()
    if not distributed.launched().main:
        return 0
    log.info("training done: best validation Dice %.4f, MLflow run %s", summary["best_val_dice"], summary["run_id"])
    return 0


def _ensemble(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.train.run import ensemble

    ensemble(cfg, [Path(d) for d in args.fold_dir], Path(args.output_dir))
    return 0


def _plan(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.plan.run import run

    run(cfg, Path(args.manifest), Path(args.output), threads=args.threads)
    return 0


def _infer(cfg: Config, args: argparse.Namespace) -> int:

    from medseg.device import set_torch_threads
    from medseg.infer.run import run, run_many

    set_torch_threads(args.threads)
    if args.image:
        if not args.output:
            raise MedsegError("medseg infer --image needs --output")
        run(cfg, Path(args.model), Path(args.image), Path(args.output))
        return 0
    if not (args.manifest and args.output_dir):
        raise MedsegError("medseg infer needs --image and --output, or --manifest and --output-dir")
    wanted = _entries(args.manifest, args.patient_id)
    record = Path(args.record) if args.record else None
    failures = run_many(cfg, Path(args.model), wanted, Path(args.output_dir), record)
    return EXIT_SKIPPED if failures and not args.skips_ok else 0


def _refine(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.device import set_torch_threads
    from medseg.infer.run import refine

    usable_file(Path(args.output), "--output")
    set_torch_threads(args.threads)
    mask = Path(args.mask) if args.mask else None
    out = refine(cfg, Path(args.model), Path(args.image), Path(args.clicks), Path(args.output), mask)
    log.info("corrected mask written to %s", out)
    return 0


def _postprocess(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.postprocess.run import run, run_many

    decision = Path(args.decision) if args.decision else None
    if args.input:
        if not args.output:
            raise MedsegError("medseg postprocess --input needs --output")
        run(cfg, Path(args.input), Path(args.output), decision)
        return 0
    if not (args.input_dir and args.output_dir and args.patient_id):
        raise MedsegError("medseg postprocess needs --input and --output, or --input-dir, --output-dir, --patient-id")
    failures = run_many(cfg, args.patient_id, Path(args.input_dir), Path(args.output_dir), decision, args.threads)
    _shard_record(args.record, args.patient_id, failures)
    return EXIT_SKIPPED if failures and not args.skips_ok else 0


def _postprocess_decide(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.postprocess.run import decide_run

    splits = args.split or ["val"]
    decision = decide_run(cfg, Path(args.manifest), Path(args.predictions), Path(args.output), split=splits)
    log.info(
        "keep-largest on %s (mean %s Dice %s -> %s over %d case(s)); decision in %s",
        decision["keep_largest"] or "no class",
        "+".join(splits),
        decision.get("mean_dice_before"),
        decision.get("mean_dice_after"),
        decision["n_cases"],
        args.output,
    )
    if decision.get("failures"):
        log.error("%d case(s) left out, see %s", len(decision["failures"]), args.output)
        return 0 if args.skips_ok else EXIT_SKIPPED
    return 0


def _evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.evaluate.run import run

    run_json = Path(args.run_json) if args.run_json else None
    summary = run(cfg, Path(args.manifest), Path(args.predictions), Path(args.output_dir), run_json)
    log.info("mean foreground Dice over %d test patient(s): %s", summary["n_patients"], summary["mean_foreground_dice"])
    for name, entry in summary["per_class"].items():
        log.info(
            "  %s: Dice %s, IoU %s, boundary F1 %s, surface Dice %s, HD95 %s mm, MSD %s mm",
            name,
            *(entry[m]["mean"] for m in ("dice", "iou", "boundary_f1", "surface_dice", "hd95_mm", "msd_mm")),
        )
    log.info("metrics: %s", Path(args.output_dir) / "metrics.tsv")
    if cfg.tracking.uri.startswith("sqlite:"):
        log.info("dashboard: mlflow ui --backend-store-uri %s --port 5000", cfg.tracking.uri)
    if summary["failures"]:
        log.error("%d patient(s) could not be scored, see summary.json", len(summary["failures"]))
        return 0 if args.skips_ok else EXIT_SKIPPED
    return 0


def _promote(cfg: Config, args: argparse.Namespace) -> int:
    from medseg import tracking
    from medseg.io import read_json
    from medseg.train.run import model_name

    name = args.name or model_name(cfg)
    version = args.version or tracking.registered_version(cfg.tracking, read_json(Path(args.run_json))["run_id"], name)
    tracking.set_alias(cfg.tracking, name, version, args.alias)
    log.info("models:/%s@%s is now version %s", name, args.alias, version)
    return 0


def _check_tracking(cfg: Config, args: argparse.Namespace) -> int:
    from medseg import tracking

    tracking.check_reachable(cfg.tracking)
    log.info("MLflow tracking at %s answers", tracking.safe_uri(cfg.tracking.uri))
    return 0


def _predict(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.predict.run import run, write_series_list

    usable_folder(Path(args.output), "--output")
    if args.list_series:
        jobs = write_series_list(cfg, Path(args.input), Path(args.output))
        log.info("%d eligible series listed in %s", len(jobs), Path(args.output) / "series.tsv")
        return 0
    if not args.model:
        raise MedsegError("medseg predict needs --model (a checkpoint, an MLflow run id, a runs:/ or models:/ URI)")

    from medseg.device import set_torch_threads

    set_torch_threads(args.threads)
    result = run(
        cfg,
        args.model,
        Path(args.input),
        Path(args.output),
        args.series_id,
        track=_track,
        allow_any_modality=args.allow_any_modality,
        name_after_input=args.name_after_input,
    )
    failed = sum(1 for r in result.records if r["status"] == "failed")
    log.info(
        "%d series: %d predicted now, %d done before, %d skipped (model contract), %d failed; summary %s",
        len(result.records),
        result.predicted,
        sum(1 for r in result.records if r["status"] == "done"),
        sum(1 for r in result.records if r["status"] == "skipped"),
        failed,
        Path(args.output) / "summary.tsv",
    )
    if result.records and failed == len(result.records):
        return EXIT_ERROR
    return EXIT_SKIPPED if result.failures and not args.skips_ok else 0


def _report(cfg: Config, args: argparse.Namespace) -> int:
    from medseg.report.run import run

    path = run(
        cfg,
        metrics=Path(args.metrics),
        output=Path(args.output),
        history=Path(args.history) if args.history else None,
        manifest=Path(args.manifest) if args.manifest else None,
        predictions=Path(args.predictions) if args.predictions else None,
        run_json=Path(args.run_json) if args.run_json else None,
    )
    log.info("report written to %s", path)
    return 0


def _check_config(cfg: Config, args: argparse.Namespace) -> int:
    print(f"# config digest {cfg.digest()}\n{cfg.to_yaml()}", end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
        p.set_defaults(handler=handler)
        return p

    p = command("demo-data", _demo_data, "write the synthetic demo cohort (DICOM and NIfTI)")
    p.add_argument("--output", required=True, help="folder to write (replaced)")

    p = command("ingest", _ingest, "DICOM/NIfTI folder -> canonical NIfTI, sidecars, manifest, failures report")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="folder for images/, labels/, sidecars/ and reports")
    p.add_argument("--manifest", required=True, help="manifest TSV to write")
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some cases were skipped")

    p = command("plan", _plan, "fingerprint the training cases and write the plan every later stage follows")
    p.add_argument("--manifest", required=True)
    p.add_argument("--output", required=True, help="plan JSON to write (results/plan/plan.json in the workflow)")
    p.add_argument("--threads", type=int, default=1, help="cases read at a time")

    p = command("resample", _resample, "resample and normalise patients onto the plan's target spacing")
    p.add_argument("--manifest", required=True)
    p.add_argument(
        "--plan",
        default=None,
        help="plan.json of `medseg plan` (needed unless the config sets target spacing and normalisation)",
    )
    p.add_argument("--patient-id", nargs="+", default=None, help="these patients (default: every one in the manifest)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--threads", type=int, default=1, help="patients resampled at a time")
    p.add_argument("--record", default=None, help="JSON written last, listing the patients done (workflow shards)")

    p = command("train", _train, "train on the plan's recipe: the manifest's train split, or one fold")
    p.add_argument("--manifest", required=True)
    p.add_argument("--plan", default=None, help="plan.json of `medseg plan` (default: plan now, into the output)")
    p.add_argument("--resample-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--fold", type=int, default=None, help="the fold to hold out (the plan must have folds)")
    p.add_argument("--threads", type=int, default=1)

    p = command("ensemble", _ensemble, "bundle the folds' models into one model.pt whose members are averaged")
    p.add_argument("--fold-dir", nargs="+", required=True, help="each fold's train folder (holding model.pt)")
    p.add_argument("--output-dir", required=True)

    p = command("infer", _infer, "predict images; each label is written on its image's own grid")
    p.add_argument("--model", required=True, help="checkpoint (model.pt) written by `medseg train` or `ensemble`")
    p.add_argument("--image", default=None, help="one image file (with --output)")
    p.add_argument("--output", default=None)
    p.add_argument("--manifest", default=None, help="predict manifest patients (with --output-dir)")
    p.add_argument("--patient-id", nargs="+", default=None, help="only these patients of the manifest")
    p.add_argument("--output-dir", default=None, help="folder of <patient_id>.nii.gz")
    p.add_argument("--record", default=None, help="JSON written last, listing the patients done (workflow shards)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some patients failed")

    p = command(
        "refine",
        _refine,
        "correct a mask with a few clicks, using a model trained with train.clicks (DeepEdit-style guidance)",
    )
    p.add_argument("--model", required=True, help="checkpoint (model.pt) of a click-guided training")
    p.add_argument("--image", required=True, help="the image (NIfTI), on whose grid the mask and the clicks are")
    p.add_argument("--mask", default=None, help="the mask to correct (default: none, segment from the clicks)")
    p.add_argument(
        "--clicks",
        required=True,
        help='JSON: {"clicks": [{"class": "<name>" | "background", "voxel": [i, j, k]} | {..., "ras_mm": [x, y, z]}]}',
    )
    p.add_argument("--output", required=True, help="the corrected mask (NIfTI) to write")
    p.add_argument("--threads", type=int, default=1)

    p = command("postprocess", _postprocess, "per-class clean-up: small components, largest N, holes")
    p.add_argument("--input", default=None, help="one label file (with --output)")
    p.add_argument("--output", default=None)
    p.add_argument("--input-dir", default=None, help="folder of <patient_id>.nii.gz (with --patient-id)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--patient-id", nargs="+", default=None)
    p.add_argument("--decision", default=None, help="decision JSON of `medseg postprocess-decide` to apply as well")
    p.add_argument("--record", default=None, help="JSON written last, listing the patients done (workflow shards)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some patients failed")

    p = command(
        "postprocess-decide",
        _postprocess_decide,
        "decide keep-largest per class from validation predictions (nnU-Net's rule); write the decision JSON",
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--predictions", required=True, help="folder of <patient_id>.nii.gz, before post-processing")
    p.add_argument("--output", required=True, help="decision JSON to write")
    p.add_argument("--split", action="append", default=None, help="manifest split(s) to decide on (default: val)")
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some cases were left out")

    p = command("evaluate", _evaluate, "overlap, boundary and distance metrics per test patient and class")
    p.add_argument("--manifest", required=True)
    p.add_argument("--predictions", required=True, help="folder of <patient_id>.nii.gz")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--run-json", default=None, help="run.json of training: log into its MLflow run")
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some patients could not be scored")

    p = command("predict", _predict, "new scans in; per eligible series a NIfTI, a DICOM-SEG and a QC picture out")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint file, MLflow run id, runs:/<run id>/train/model.pt, or a registered model: "
        "models:/<name>@champion (downloaded once, checksum verified) or models:/<name>/<version>",
    )
    p.add_argument("--input", required=True, help="folder of DICOM series (any layout) and/or NIfTI files")
    p.add_argument("--output", required=True)
    p.add_argument("--series-id", action="append", default=None, help="only this series (repeatable)")
    p.add_argument("--list-series", action="store_true", help="only list the eligible series into <output>/series.tsv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skips-ok", action="store_true", help="exit 0 even if some series failed or were skipped")
    p.add_argument(
        "--allow-any-modality",
        action="store_true",
        help="predict series of a modality the model was not trained on (flagged) instead of skipping them",
    )
    p.add_argument(
        "--name-after-input",
        action="store_true",
        help="name NIfTI inputs' outputs after the file (case_017_0000.nii.gz -> case_017); DICOM stays pseudonymised",
    )

    p = command("report", _report, "one self-contained HTML page: config, metrics, box plots, worst cases, curves")
    p.add_argument("--metrics", required=True, help="metrics.tsv of `medseg evaluate`")
    p.add_argument("--output", required=True, help="the HTML file to write")
    p.add_argument("--history", default=None, help="history.tsv of `medseg train`")
    p.add_argument("--manifest", default=None, help="manifest, for the worst patients' images and references")
    p.add_argument("--predictions", default=None, help="folder of <patient_id>.nii.gz, for the QC pictures")
    p.add_argument("--run-json", default=None, help="run.json of training: log the report into its MLflow run")

    p = command(
        "promote",
        _promote,
        "after review: point a registry alias (champion) at a model version, the one `predict --model "
        "models:/<name>@champion` then uses",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-json", default=None, help="run.json of the reviewed training: the version it registered")
    which.add_argument("--version", default=None, help="the model version to promote")
    p.add_argument("--name", default=None, help="registered model name (default: tracking.model_name)")
    p.add_argument("--alias", default="champion")

    command("check-tracking", _check_tracking, "fail unless the configured MLflow tracking backend answers")
    command("check-config", _check_config, "validate a config and print it fully resolved")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config)
        return args.handler(cfg, args)
    except MedsegError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except Exception as err:  # a bug or an input no boundary foresaw: one line here, the traceback with -v
        # Only the type at ERROR: an unforeseen message may hold a source path, which may name a patient.
        log.debug("traceback", exc_info=True)
        log.error("stopped by an unexpected %s (run with -v for the message and traceback)", type(err).__name__)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
