"""The workflow's predict and report targets: path helpers, and a dry run that fans predict_all out per series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medseg.config import Config
from medseg.io import write_tsv
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
