"""The workflow's predict and report targets: path helpers, and a dry run that fans predict_all out per series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from fast_predict_config import fast_predict_config
from predict_helpers import CLASSES, save_checkpoint, tiny_config, write_series
from test_workflow import _snakemake

from medseg.config import Config
from medseg.io import read_tsv, write_tsv
from medseg.predict.run import PLAN_COLUMNS
from medseg.workflow import Workflow

REPO = Path(__file__).resolve().parents[2]


def test_targets_and_records(tmp_path: Path) -> None:
    plain = Workflow(Config.model_validate({"paths": {"results_dir": str(tmp_path)}}))
    assert plain.predict_targets() == []
    assert str(tmp_path / "report" / "report.html") in plain.final_targets()
    assert plain.predict_model == str(tmp_path / "train" / "model.pt")
    assert plain.predict_model_inputs() == [plain.predict_model]

    wf = Workflow(
        Config.model_validate(
            {"paths": {"results_dir": str(tmp_path)}, "predict": {"input_dir": "scans", "model": "0" * 32}}
        )
    )
    assert wf.predict_targets() == [str(tmp_path / "predict" / "summary.tsv")]
    assert wf.predict_model_inputs() == []  # an MLflow run id is not a file Snakemake can wait for
    # only an alias moves (the registry is asked for its version then: tests/test_team_server.py); nothing else
    # asks the registry, so these need no tracking server
    assert plain.predict_model_version() == wf.predict_model_version() == ""
    fixed = Config.model_validate({"predict": {"input_dir": "scans", "model": "models:/tiny-team/3"}})
    assert Workflow(fixed).predict_model_version() == ""
    write_tsv(wf.predict_series_list, [{"series_id": "PA_1"}, {"series_id": "PB_2"}], PLAN_COLUMNS)
    assert wf.predict_records() == [str(tmp_path / "predict" / "records" / f"{s}.json") for s in ("PA_1", "PB_2")]


def test_dry_run_plans_predict_all(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"demo_data: {{enabled: false}}\npaths: {{results_dir: {tmp_path / 'results'}}}\n"
        f"predict: {{input_dir: {tmp_path}, model: {tmp_path / 'model.pt'}}}\n"
    )
    (tmp_path / "model.pt").write_bytes(b"")
    snakemake = Path(sys.executable).parent / "snakemake"
    done = subprocess.run(
        [
            str(snakemake),
            "-s",
            str(REPO / "Snakefile"),
            "-n",
            "predict_all",
            "--configfile",
            str(config),
            "--cores",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "predict_series_list" in done.stdout and "predict_all" in done.stdout


def test_a_series_added_inside_a_patient_folder_is_predicted_and_the_others_are_not_again(tmp_path: Path) -> None:
    """Hospital folders grow below their top level (a new study in a patient's folder), which Snakemake's dating of
    the folder input does not see; the listing must, and only the new series is predicted."""
    scans = tmp_path / "scans"
    write_series(scans / "A" / "study1", seed=0, patient_id="MRN-1")
    write_series(scans / "B" / "study1", seed=1, patient_id="MRN-2")
    model = save_checkpoint(tiny_config(tmp_path / "key"), tmp_path / "model.pt")
    config = tmp_path / "config.yaml"
    data = fast_predict_config(CLASSES, tmp_path / "key")
    data |= {"demo_data": {"enabled": False}, "paths": {"results_dir": str(tmp_path / "results")}}
    data |= {"predict": {"input_dir": str(scans), "model": str(model)}}
    config.write_text(yaml.safe_dump(data))

    def snakemake(*extra: str) -> str:
        done = _snakemake(REPO, tmp_path, "predict_all", "--cores", "2", "--configfile", str(config), *extra)
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
        return done.stdout + done.stderr

    snakemake()
    records = tmp_path / "results" / "predict" / "records"
    first = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(first) == 2, first
    assert "Nothing to be done" in snakemake("-n")

    write_series(scans / "A" / "study2", seed=2, patient_id="MRN-1")  # a second study of patient A
    output = snakemake()
    assert "Params have changed" in output  # the listing ran again: the top folder's time did not move
    series = read_tsv(tmp_path / "results" / "predict" / "series.tsv")
    now = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert len(series) == 3 and len(now) == 3, (series, now)
    assert {name: now[name] for name in first} == first  # the two earlier series were not predicted again
    assert "Nothing to be done" in snakemake("-n")
