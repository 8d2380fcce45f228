"""The Snakemake profiles in configs/profiles: a dry run with the SLURM and the Kubernetes executor (the plugins
are dev dependencies) plans each job with the resources the executor turns into its request: threads, mem_mb,
runtime and, for train and infer, gpu."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_workflow import _snakemake  # tests/ is on sys.path (pytest)


def planned_jobs(output: str) -> list[dict[str, str]]:
    """``[{"rule", "threads", "mem_mb", "runtime", "gpu", ...}]`` from a dry run's job listing."""
    jobs: list[dict[str, str]] = []
    for line in output.splitlines():
        rule = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if rule:
            jobs.append({"rule": rule.group(1)})
        elif jobs and line.strip().startswith("threads:"):
            jobs[-1]["threads"] = line.split(":", 1)[1].strip()
        elif jobs and line.strip().startswith("resources:"):
            for pair in line.split(":", 1)[1].split(","):
                key, _, value = pair.strip().partition("=")
                jobs[-1][key] = value
    return jobs


def check_resources(jobs: list[dict[str, str]], gpu_rules: set[str]) -> None:
    assert jobs
    for job in jobs:
        if job["rule"] == "all":
            continue
        assert int(job["mem_mb"]) >= 2000 and int(job["runtime"]) >= 15, job
        assert (job.get("gpu") == "1") == (job["rule"] in gpu_rules), job


def test_slurm_profile_plans_every_job_with_memory_runtime_and_gpus(repo: Path, tmp_path: Path) -> None:
    tiny = str(repo / "configs" / "tiny.yaml")
    # the per-case jobs (resample, infer, ...) exist once ingest, a checkpoint, has run: run it here first
    first = _snakemake(repo, tmp_path, "--cores", "2", "--configfile", tiny, "--until", "ingest")
    assert first.returncode == 0, first.stderr[-3000:]
    profile = str(repo / "configs" / "profiles" / "slurm")
    result = _snakemake(repo, tmp_path, "--profile", profile, "--configfile", tiny, "--dry-run")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = planned_jobs(result.stdout)
    rules = {job["rule"] for job in jobs}
    assert {"plan", "resample", "train", "infer", "postprocess", "evaluate", "report"} <= rules, rules
    check_resources(jobs, gpu_rules={"train", "infer"})
    train = next(job for job in jobs if job["rule"] == "train")
    assert train["threads"] == "16" and train["mem_mb"] == "32000"  # the profile's cores, medseg's train memory
    assert int(train["runtime"]) == 24 * 60  # no max_minutes in tiny.yaml: a day


def test_kubernetes_profile_plans_jobs_with_gpu_requests_and_memory(repo: Path, tmp_path: Path) -> None:
    profile = str(repo / "configs" / "profiles" / "kubernetes")
    override = tmp_path / "minutes.yaml"
    override.write_text("train:\n  max_minutes: 30\njobs:\n  mem_mb:\n    train: 64000\n")
    store = ["--default-storage-prefix", str(tmp_path / "store")]  # the profile's /data is the pods' volume
    args = ["--profile", profile, "--configfile", str(repo / "configs" / "tiny.yaml"), str(override), *store, "-n"]
    result = _snakemake(repo, tmp_path, *args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = planned_jobs(result.stdout)
    check_resources(jobs, gpu_rules={"train"})  # infer appears after the ingest checkpoint (see the SLURM test)
    train = next(job for job in jobs if job["rule"] == "train")
    assert train["gpu_manufacturer"] == "nvidia" and train["mem_mb"] == "64000"  # jobs.mem_mb over the default
    assert int(train["runtime"]) == int(30 * 1.25) + 30  # follows train.max_minutes


@pytest.mark.parametrize("name", ["local", "slurm", "kubernetes"])
def test_each_profile_is_a_snakemake_profile(repo: Path, name: str) -> None:
    text = (repo / "configs" / "profiles" / name / "config.yaml").read_text()
    assert ("executor: " + name in text) == (name != "local")
