"""A real SLURM cluster: the tiny workflow through ``configs/profiles/slurm``, every rule job an ``sbatch`` job.

The cluster is this machine: Debian's SLURM (slurmctld, slurmd, and slurmdbd with a MariaDB accounting database,
because snakemake-executor-plugin-slurm reads job states with ``sacct``) and munge authentication, every daemon in
the foreground on its own loopback port, with its own folder, socket and configuration (``SLURM_CONF``), so that
nothing of the machine's own configuration is read or changed. slurmd runs jobs as the submitting user, so it must
run as root, as it does on a real cluster.

.ci/run installs the packages (``apt-get install slurm-wlm slurmdbd mariadb-server munge``); without them, or
without root, the test is skipped (failed under ``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_team_server import _free_port
from test_workflow import _fresh_copy, _snakemake

from medseg.io import read_tsv

PROGRAMS = (
    *("slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "sacct", "sacctmgr", "sinfo"),
    *("munged", "mariadbd", "mariadb", "mariadb-install-db"),
)
DB_PASSWORD = "medseg-test-only"
CLUSTER = "medsegtest"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _wait(
    check: Callable[[], bool], what: str, processes: list[subprocess.Popen], logs: list[Path], seconds: float = 60
) -> None:
    """Poll ``check()`` until true; a daemon that exits, or the time running out, fails with the daemons' logs."""
    deadline = time.monotonic() + seconds
    dead: list = []
    while time.monotonic() < deadline and not dead:
        if check():
            return
        dead = [p.args[0] for p in processes if p.poll() is not None]
        time.sleep(0.5)
    tails = "\n".join(f"--- {log}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs if log.exists())
    raise RuntimeError(f"{what} did not come up (exited: {dead}; last check {_LAST_ERROR[0]})\n{tails}")


_LAST_ERROR: list[str] = [""]


def _ok(*command: str) -> bool:
    """Whether ``command`` succeeds; its output is kept for the failure message of :func:`_wait`."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    _LAST_ERROR[0] = f"{' '.join(command)}: {done.stdout}{done.stderr}"
    return done.returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[dict[str, str]]:
    missing = [p for p in PROGRAMS if _which(p) is None]
    reason = ""
    if missing:
        reason = f"SLURM is not installed (missing {', '.join(missing)}; .ci/run installs slurm-wlm and friends)"
    elif os.geteuid() != 0:
        reason = "slurmd runs jobs as their user and must run as root"
    if reason:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{reason}, and CI must test the SLURM profile")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="medseg-slurm-"))
    host = socket.gethostname().split(".")[0]
    ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "db")}
    munge_socket, db_socket = root / "munge.socket", root / "mysql.sock"
    processes: list[subprocess.Popen] = []
    logs = [root / name for name in ("munged.log", "mariadb.log", "slurmdbd.log", "slurmctld.log", "slurmd.log")]
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
    environment = pytest.MonkeyPatch()  # SLURM_CONF and PATH for this module's tests, undone at the end

    def start(*command: str, log: str) -> None:
        with open(root / log, "ab") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))

    try:
        environment.setenv(
            "SLURM_CONF", env["SLURM_CONF"]
        )  # sacctmgr and sinfo here, sbatch and sacct in Snakemake's plugin
        # snakemake-executor-plugin-slurm-jobstep drops every SLURM_* variable but the job's identity before its
        # inner `srun` (0.6.1, "Sanitize inherited SLURM task/GPU settings"), SLURM_CONF too: a real cluster's srun
        # finds /etc/slurm/slurm.conf or slurmd's configless cache; this one's finds its config through this shim,
        # first in PATH
        shim = root / "bin" / "srun"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nSLURM_CONF="{env["SLURM_CONF"]}" exec {_which("srun")} "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        environment.setenv("PATH", env["PATH"])
        # munge: a fresh key, only for this cluster
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        start(
            _which("munged") or "munged",
            "--foreground",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={root / 'munged.pid'}",
            f"--log-file={root / 'munged.log'}",
            f"--seed-file={root / 'munged.seed'}",
            log="munged.out",
        )
        _wait(munge_socket.exists, "munged", processes, logs)
        # MariaDB: slurmdbd's store, on a loopback port
        data = root / "db"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}", "--skip-test-db"],
            capture_output=True,
            check=True,
        )
        start(
            _which("mariadbd") or "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={data}",
            f"--socket={db_socket}",
            f"--port={ports['db']}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            f"--pid-file={root / 'mariadb.pid'}",
            f"--log-error={root / 'mariadb.log'}",
            log="mariadb.out",
        )
        client = ["mariadb", "--no-defaults", f"--socket={db_socket}", "-u", "root"]
        _wait(lambda: _ok(*client, "-e", "SELECT 1"), "MariaDB", processes, logs)
        sql = (
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        subprocess.run([*client, "-e", sql], capture_output=True, check=True)
        common = (
            f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\nSlurmUser=root\n"  # the daemons' user: root here
        )
        dbd = root / "slurmdbd.conf"  # slurmdbd reads it beside SLURM_CONF
        dbd.write_text(
            common + f"DbdHost=localhost\nDbdPort={ports['dbd']}\nPidFile={root / 'slurmdbd.pid'}\n"
            f"LogFile={root / 'slurmdbd.log'}\nStorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={ports['db']}\nStorageUser=slurm\nStoragePass={DB_PASSWORD}\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)
        # the node as slurmd sees it (a node configured with more CPUs than slurmd finds is drained, not idle)
        seen = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        node = dict(item.split("=", 1) for item in seen.split() if "=" in item)
        cpus, memory_mb = int(node["CPUs"]), int(node["RealMemory"]) - 1000
        (root / "slurm.conf").write_text(
            common + f"ClusterName={CLUSTER}\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ports['ctld']}\n"
            f"SlurmdPort={ports['slurmd']}\nStateSaveLocation={root / 'ctld'}\nSlurmdSpoolDir={root / 'slurmd'}\n"
            f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={root / 'slurmctld.log'}\nSlurmdLogFile={root / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/linux\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={ports['dbd']}\nAccountingStoragePass={munge_socket}\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            "MinJobAge=600\nReturnToService=2\n"
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        start(_which("slurmdbd") or "slurmdbd", "-D", log="slurmdbd.out")
        _wait(lambda: _ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", processes, logs)
        for command in (
            ["add", "cluster", CLUSTER],
            ["add", "account", "research", "Description=medseg", "Organization=hospital"],
            ["add", "user", "root", "Account=research"],
        ):
            subprocess.run(["sacctmgr", "-i", *command], capture_output=True, check=True, env=env)
        start(_which("slurmctld") or "slurmctld", "-D", "-i", log="slurmctld.out")
        start(_which("slurmd") or "slurmd", "-D", "-N", host, log="slurmd.out")

        def idle() -> bool:
            states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
            return "idle" in states.stdout

        _wait(idle, "slurmctld and slurmd (an idle node)", processes, logs)
        yield {"root": str(root), "host": host, "cpus": str(cpus)}
    finally:
        environment.undo()
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


def _sacct() -> list[dict[str, str]]:
    fields = ["JobName", "State", "AllocCPUS", "ReqMem", "ExitCode", "Elapsed", "Comment", "SubmitLine"]
    out = subprocess.run(
        ["sacct", "-a", "-X", "-P", "-n", f"--format={','.join(fields)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def _on_slurm(clone: Path, cores: str, *args: str) -> tuple[str, int]:
    """Snakemake with the SLURM profile in ``clone``: its output (after asserting success) and the jobs it submitted."""
    result = _snakemake(
        clone,
        clone,
        *args,
        "--profile",
        str(clone / "configs" / "profiles" / "slurm"),
        "--cores",
        cores,  # the profile's 16 is more than this node has: SLURM would hold the train job forever
        # the plugin (2.8) polls sacct this long after a submission, then waits 10 s longer after each poll that
        # finds nothing finished (1 s: polls at 1, 12, 33 s). This cluster's jobs take 7-14 s (sacct's Elapsed;
        # Snakemake's start-up is most of it), so most just missed the 12 s poll; 4 s polls at 4, 18 and 42 s
        "--slurm-init-seconds-before-status-checks",
        "4",
        "--seconds-between-status-checks",
        "2",
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "(100%) done" in output, output[-3000:]
    return output, output.count("has been submitted with SLURM jobid")


def test_the_tiny_workflow_and_predict_all_run_as_slurm_jobs(
    slurm_cluster: dict[str, str], repo: Path, tmp_path: Path
) -> None:
    clone = _fresh_copy(repo, tmp_path / "clone")
    overrides = tmp_path / "cluster.yaml"
    # medseg's default requests (train 32 GB) are for real nodes; this node has what the machine has
    overrides.write_text("jobs:\n  gpus: 0\n  mem_mb: {train: 3000, infer: 2000, ingest: 2000, plan: 2000}\n")
    cores = slurm_cluster["cpus"]
    tiny = str(clone / "configs" / "tiny.yaml")
    output, submitted = _on_slurm(clone, cores, "--configfile", tiny, str(overrides))
    jobs = _sacct()  # a cluster of this test's own: every job in its accounting is the workflow's
    # every rule job went through sbatch, and SLURM's accounting saw each one complete
    assert submitted >= 8 and len(jobs) == submitted, (submitted, jobs)
    assert all(j["State"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs), jobs
    assert max(int(j["AllocCPUS"]) for j in jobs) == int(cores), jobs  # training asked for the node's cores
    assert "3000M" in {j["ReqMem"] for j in jobs}, jobs  # jobs.mem_mb reached sbatch --mem
    assert (clone / "results" / "train" / "model.pt").is_file()
    assert (clone / "results" / "report" / "report.html").is_file()
    assert list((clone / "results" / "evaluate").rglob("*.tsv")), "no metrics"

    # batch inference on a hospital folder: a listing job, then one job per series (a checkpoint's fan-out). Two
    # of the demo's patients, one DICOM series and one NIfTI (configs/tiny.yaml: DEMO0000-0002 are DICOM): each job
    # here takes 18 s or more (Snakemake's start-up inside it, the plugin's polling), so the fan-out is shown on two
    hospital = tmp_path / "hospital"
    for patient in ("DEMO0000", "DEMO0003"):
        shutil.copytree(clone / "data" / "demo_raw" / patient, hospital / patient)
    predict = tmp_path / "predict.yaml"
    model = clone / "results" / "train" / "model.pt"
    predict.write_text(f"predict:\n  input_dir: {hospital}\n  model: {model}\n")
    output, more = _on_slurm(clone, cores, "predict_all", "--configfile", tiny, str(overrides), str(predict))
    series = read_tsv(clone / "results" / "predict" / "series.tsv")
    segs = sorted((clone / "results" / "predict" / "dicom_seg").glob("*.dcm"))
    dicom = [r for r in series if r["source_format"] == "dicom"]
    assert len(series) == 2 and len(dicom) == 1 and len(segs) == 1, (series, segs)
    assert more == len(series) + 2, output[-3000:]  # the listing, each series, the summary
    jobs = _sacct()
    assert len(jobs) == submitted + more and all(j["State"] == "COMPLETED" for j in jobs), jobs
    # what SLURM keeps of each job (name; comment: the rule and its wildcards, here the series' pseudonymous id;
    # submit line) names no demo patient (their DICOM says "Mustermann01^Erika", "DEMO0001", as do their folders);
    # the cluster's accounting outlives the run
    recorded = " ".join(f"{j['JobName']} {j['Comment']} {j['SubmitLine']}" for j in jobs)
    assert "rule_train" in recorded and series[0]["series_id"] in recorded, recorded
    assert not [v for v in ("Mustermann", "DEMO0") if v in recorded], recorded
