"""Acceptance: planted patient identity goes through `medseg ingest` and MLflow and comes out nowhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from medseg import tracking
from medseg.config import TrackingConfig, load_config
from medseg.demo_data.dicom import Identity, SeriesGeometry, write_ct_series
from medseg.io import read_tsv


def test_planted_identity_appears_in_no_output_log_or_mlflow_entry(tmp_path):
    identity = Identity(
        patient_name="Quimby^Hortensia",
        patient_id="MRN7730146",
        birth_date="19470829",
        accession_number="ACC55821907",
        institution_name="Saint Wolfgang Infirmary",
    )
    planted = [
        "Quimby",
        "Hortensia",
        identity.patient_id,
        identity.birth_date,
        identity.accession_number,
        identity.institution_name,
        identity.study_uid,
        identity.series_uid,
    ]
    geometry = SeriesGeometry(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (1.0, 1.0), 2.0)
    hu = np.random.default_rng(0).normal(0, 100, size=(8, 8, 4))
    # As exports lay it out: folders named by patient ID and name; a description typed with the patient's name.
    inputs = tmp_path / "in"
    series_folder = inputs / identity.patient_id / "Quimby^Hortensia" / "CT1"
    write_ct_series(hu, geometry, identity, series_folder, series_description="CT abdomen Quimby")
    broken = inputs / identity.patient_id / f"{identity.accession_number}.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # a truncated file: its path lands in failures.tsv
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "classes": ["organ"],
                "ingest": {
                    "pseudonym_key_file": str(tmp_path / "secret" / "key"),
                    "id_map_file": str(tmp_path / "secret" / "id_map.tsv"),
                },
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_dir": str(tmp_path / "mlartifacts")},
            }
        )
    )
    out, manifest, log_file = tmp_path / "out", tmp_path / "manifest.tsv", tmp_path / "ingest.log"
    with log_file.open("w") as log:
        command = (
            f"-m medseg.cli -v ingest --config {config_path} --input {inputs} --output {out} --manifest {manifest}"
        )
        status = subprocess.run(
            [sys.executable, *command.split()],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            check=False,
        ).returncode
    assert status == 3, log_file.read_text()  # one case ingested, one file skipped
    rows = read_tsv(manifest)
    assert len(rows) == 1 and Path(rows[0]["image"]).exists()
    assert "ingested" in log_file.read_text()

    config = load_config(config_path)
    tracking_config = TrackingConfig(**config.tracking.model_dump())
    with tracking.run(tracking_config, run_name="phi-check"):
        tracking.log_params(config.to_dict())
        tracking.set_tags({"patient_ids": ",".join(r["patient_id"] for r in rows)})
        for path in (manifest, out / "series.tsv", out / "failures.tsv", log_file):
            tracking.log_artifact(path, "ingest")
        for path in sorted((out / "sidecars").iterdir()):
            tracking.log_artifact(path, "ingest/sidecars")

    searched = [p for p in tmp_path.rglob("*") if p.is_file() and tmp_path / "in" not in p.parents]
    searched = [p for p in searched if p.parent != tmp_path / "secret"]
    assert any(p.name == "mlflow.db" for p in searched) and any("mlartifacts" in p.parts for p in searched)
    assert len(searched) >= 10
    for path in searched:
        data = path.read_bytes().lower()
        rel = str(path.relative_to(tmp_path)).lower()
        for value in planted:
            assert value.lower().encode() not in data, f"{value} found in {path}"
            assert value.lower() not in rel, f"{value} found in the path {rel}"
    # The test can fail: the values are in the input, and the id map the user asked for holds the source id.
    assert identity.patient_id.encode() in (tmp_path / "secret" / "id_map.tsv").read_bytes()
