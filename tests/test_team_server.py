"""A team MLflow server: PostgreSQL (Debian's package) as the backend store, `mlflow server` with an artifact root,
both on loopback ports. The tiny workflow tracks into it, its model is registered, promoted to ``champion`` and used
by ``medseg predict --model models:/<name>@champion``; everything is read back through the REST API.

PostgreSQL's password reaches the server through libpq's ``PGPASSWORD`` (the environment), never a URI or a config.
.ci/run installs PostgreSQL (``apt-get install postgresql``); without its programs the test is skipped (failed
under ``CI=true``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_workflow import _snakemake

from medseg.config import load_config
from medseg.io import read_json
from medseg.tracking import register_model, set_alias

PG_PASSWORD = "medseg-test-only"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: CI runs as root, so run its programs as the package's `postgres` user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("PostgreSQL is not installed, and CI must test the team server (.ci/run installs it)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    root = tmp_path_factory.mktemp("team_server")
    # PostgreSQL's own folder outside pytest's (which only root may enter), owned by the user that runs it
    pg_root = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
    data, socket_dir = pg_root / "data", pg_root / "socket"
    socket_dir.mkdir()
    password_file = pg_root / "password.txt"
    password_file.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (pg_root, socket_dir, password_file):
            shutil.chown(path, "postgres")
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(
        _as_postgres([initdb, "-D", str(data), "-U", "medseg", "--auth=scram-sha-256", f"--pwfile={password_file}"]),
        **run,
    )
    pg_port, mlflow_port = _free_port(), _free_port()
    options = f"-p {pg_port} -k {socket_dir} -c listen_addresses=127.0.0.1"
    start = [pg_ctl, "-D", str(data), "-o", options, "-l", str(pg_root / "server.log"), "-w", "start"]
    subprocess.run(_as_postgres(start), **run)
    env = dict(os.environ, PGPASSWORD=PG_PASSWORD)
    mlflow_process = None
    try:
        createdb = _pg_bin("createdb")
        subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(pg_port), "-U", "medseg", "mlflow"], env=env, **run)
        server = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"postgresql://medseg@127.0.0.1:{pg_port}/mlflow",  # no password in the URI
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        ]  # fmt: skip
        mlflow_process = subprocess.Popen(
            server,
            env=env,
            stdout=(root / "mlflow.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{mlflow_port}"
        _wait_http(f"{url}/health", mlflow_process)
        yield {"url": url, "root": root, "pg_port": pg_port}
    finally:
        if mlflow_process is not None:
            mlflow_process.terminate()
            try:
                mlflow_process.wait(30)
            except subprocess.TimeoutExpired:
                mlflow_process.kill()
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), **run)
        shutil.rmtree(pg_root, ignore_errors=True)


def _rest(url: str, endpoint: str, **query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}") as response:
        return json.loads(response.read())


def _medseg(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "medseg.cli", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600, check=False)


def test_tiny_workflow_registry_and_champion_predict_on_a_postgres_backed_server(
    repo: Path, tmp_path: Path, team_server: dict[str, Any]
) -> None:
    url = team_server["url"]
    server = tmp_path / "server.yaml"
    server.write_text(f"tracking: {{uri: '{url}', experiment: medseg-team, model_name: tiny-team}}\n")
    tiny = str(repo / "configs" / "tiny.yaml")
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", tiny, str(server))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # the run, its metrics and artifacts, through the REST API (the artifacts under the server's root, proxied)
    run_id = read_json(tmp_path / "results" / "train" / "run.json")["run_id"]
    run = _rest(url, "runs/get", run_id=run_id)["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "val_dice_mean" in metrics and "test_dice_organ_a" in metrics
    assert run["inputs"]["dataset_inputs"][0]["dataset"]["name"] == "tiny-manifest"
    files = {f["path"] for f in _rest(url, "artifacts/list", run_id=run_id, path="train").get("files", [])}
    assert "train/model.pt" in files
    assert list((team_server["root"] / "artifacts").rglob("model.pt")), "artifacts are stored under the server's root"

    # registered by the training, tagged with the manifest digest and the validation Dice
    versions = _rest(url, "model-versions/search", filter="name='tiny-team'")["model_versions"]
    assert [v["version"] for v in versions] == ["1"] and versions[0]["run_id"] == run_id
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert {"model_sha256", "manifest_sha256", "best_val_dice"} <= set(tags)

    # review, then promote: champion points at the run's version
    config = str(tmp_path / "results" / "config.yaml")
    promoted = _medseg(tmp_path, "promote", "--config", config, "--run-json", "results/train/run.json")
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    alias = _rest(url, "registered-models/alias", name="tiny-team", alias="champion")["model_version"]
    assert alias["version"] == "1"

    # batch inference by alias: a generated DICOM series, the version in the record and the DICOM-SEG
    scans = tmp_path / "scans"
    shutil.copytree(tmp_path / "data" / "demo_raw" / "DEMO0000", scans / "one")
    args = ["predict", "--config", config, "--model", "models:/tiny-team@champion", "--input", str(scans)]
    predicted = _medseg(tmp_path, *args, "--output", "predictions")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "tiny-team v1" in predicted.stderr and "checksum verified" in predicted.stderr
    records = list((tmp_path / "predictions" / "records").glob("*.json"))
    assert len(records) == 1
    record = read_json(records[0])
    assert (record["status"], record["model_name"], record["model_version"]) == ("done", "tiny-team", "1")
    seg = pydicom.dcmread(next((tmp_path / "predictions" / "dicom_seg").glob("*.dcm")))
    assert "tiny-team v1" in list(seg.SoftwareVersions)
    assert str(seg.ContentCreatorName) == "medseg^tiny-team v1"
    assert seg.SeriesDescription.endswith("[tiny-team v1]")
    # downloaded once: a second run verifies the cached copy and downloads nothing
    again = _medseg(tmp_path, *args, "--output", "predictions")
    assert again.returncode == 0 and "downloaded" not in again.stderr and "checksum verified" in again.stderr

    # the workflow's predict_all by alias; promoting another version predicts again (the URI itself is unchanged)
    by_alias = tmp_path / "predict.yaml"
    by_alias.write_text(f"predict: {{input_dir: '{scans}', model: 'models:/tiny-team@champion'}}\n")
    workflow = ("predict_all", "--cores", "2", "--configfile", tiny, str(server), str(by_alias))
    done = _snakemake(repo, tmp_path, *workflow)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    unchanged = _snakemake(repo, tmp_path, *workflow, "-n")
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, unchanged.stderr[-3000:]
    tracking = load_config(tmp_path / "results" / "config.yaml").tracking
    second = register_model(tracking, run_id, "tiny-team", tmp_path / "results" / "train" / "model.pt", {})
    set_alias(tracking, "tiny-team", second.version, "champion")
    planned = _snakemake(repo, tmp_path, *workflow, "-n")
    output = planned.stdout + planned.stderr
    assert planned.returncode == 0 and re.search(r"^predict +1$", output, re.M), output[-3000:]
    assert "Params have changed" in output and "tiny-team v2" in output, output[-3000:]


def test_a_workflow_without_its_tracking_server_stops_before_any_work(repo: Path, tmp_path: Path) -> None:
    dead = tmp_path / "dead.yaml"
    dead.write_text(f"tracking: {{uri: 'http://127.0.0.1:{_free_port()}'}}\n")
    start = time.monotonic()
    result = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(repo / "configs" / "tiny.yaml"), str(dead))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot reach the MLflow tracking server" in output, output[-3000:]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "data").exists() and not (tmp_path / "results" / "ingest").exists()


def test_credentials_in_the_tracking_uri_are_refused_and_never_echoed(repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracking: {uri: 'http://alice:s3cret@mlflow.example.org'}\n")
    result = _medseg(tmp_path, "check-config", "--config", str(bad))
    assert result.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
