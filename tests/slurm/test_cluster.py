"""Smoke tests: the fixture's cluster runs multi-task steps, requeues jobs and delivers signals to steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, wait_for
from tests.slurm.conf import CLUSTER_NAME

pytestmark = pytest.mark.timeout(180)

# The step's tasks: record TERM (then exit 0), say they are ready once the trap is set, and idle. Slurm
# signals every process of the step, so the sleep may die before bash gets its TERM: a foreground
# `sleep 1` loop keeps bash alive until its trap runs (a single `sleep 300 & wait` would let bash end
# with 143 first) and leaves no orphan holding the step's output open (which keeps the job RUNNING).
STEP = """#!/bin/bash
trap 'echo "task $SLURM_PROCID got TERM" >> "$PROBE_DIR/term"; exit 0' TERM
echo "$SLURM_PROCID" >> "$PROBE_DIR/ready"
for _ in $(seq 300); do sleep 1; done
"""
REQUEUE_JOB = """#!/bin/bash
echo "${SLURM_RESTART_COUNT:-0}" >> "$PROBE_DIR/restarts"
srun bash "$PROBE_DIR/step.sh"
"""
SIGNAL_JOB = """#!/bin/bash
trap 'echo "batch got TERM" >> "$PROBE_DIR/batch"' TERM
srun bash "$PROBE_DIR/step.sh"
echo "srun exited $?" >> "$PROBE_DIR/batch"
"""


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def probe(slurm: SlurmCluster, tmp_path: Path, job_script: str) -> tuple[Path, dict[str, str]]:
    """The batch script in tmp_path, next to step.sh, and an env that tells both where to write."""
    (tmp_path / "step.sh").write_text(STEP, encoding="utf-8")
    script = tmp_path / "job.sh"
    script.write_text(job_script, encoding="utf-8")
    return script, {**slurm.env, "PROBE_DIR": str(tmp_path)}


def test_cluster_is_ours_and_ready(slurm: SlurmCluster) -> None:
    config = slurm.run(["scontrol", "show", "config"])
    assert re.search(rf"^ClusterName\s*=\s*{CLUSTER_NAME}$", config.stdout, re.M), config.stdout[:500]
    node = slurm.run(["sinfo", "-h", "-o", "%P %T %c"])
    partition, state, cpus = node.stdout.split()
    assert partition == "debug*" and state in ("idle", "mixed", "allocated") and int(cpus) >= 2, node.stdout


def test_two_tasks_run_in_one_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    wrap = r'srun bash -c "echo task \$SLURM_PROCID of \$SLURM_NTASKS on \$(hostname)"'
    job = slurm.sbatch(["--ntasks=2", "--nodes=1", f"--output={out}", "--wrap", wrap])
    info = slurm.wait_job(job, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    text = out.read_text(encoding="utf-8")
    for rank in (0, 1):
        assert re.search(rf"^task {rank} of 2 on \S+$", text, re.M), text


def test_requeue_terms_the_step_and_restarts_the_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    script, env = probe(slurm, tmp_path, REQUEUE_JOB)
    job = slurm.sbatch(["--requeue", "--ntasks=1", f"--output={tmp_path / 'out.txt'}", str(script)], env=env)
    wait_for(lambda: lines(tmp_path / "ready"), 60, "step did not start", detail=lambda: str(slurm.job(job)))

    requeue = slurm.run(["scontrol", "requeue", job])
    assert requeue.returncode == 0, requeue.stderr
    wait_for(lambda: lines(tmp_path / "term"), 30, "step did not get TERM on requeue")
    assert lines(tmp_path / "term") == ["task 0 got TERM"]

    # The requeued job is held until its credential expires (cred_expire=5 s), then the scheduler starts it.
    wait_for(
        lambda: len(lines(tmp_path / "restarts")) >= 2,
        90,
        "requeued job did not run again",
        detail=lambda: f"restarts={lines(tmp_path / 'restarts')} job={slurm.job(job)}",
    )
    assert lines(tmp_path / "restarts") == ["0", "1"]
    assert slurm.job(job)["Restarts"] == "1"

    cancel = slurm.run(["scancel", job])
    assert cancel.returncode == 0, cancel.stderr
    assert slurm.wait_job(job, timeout=60)["JobState"] == "CANCELLED"


def test_scancel_signal_term_reaches_the_step_tasks_only(slurm: SlurmCluster, tmp_path: Path) -> None:
    script, env = probe(slurm, tmp_path, SIGNAL_JOB)
    job = slurm.sbatch(["--ntasks=2", "--nodes=1", f"--output={tmp_path / 'out.txt'}", str(script)], env=env)
    wait_for(
        lambda: len(lines(tmp_path / "ready")) == 2,
        60,
        "step did not start",
        detail=lambda: str(slurm.job(job)),
    )

    signal = slurm.run(["scancel", "--signal=TERM", job])
    assert signal.returncode == 0, signal.stderr
    info = slurm.wait_job(job, timeout=60)

    assert sorted(lines(tmp_path / "term")) == ["task 0 got TERM", "task 1 got TERM"]
    # Without --batch/--full, scancel --signal spares the batch shell: srun returns, the script goes on.
    assert lines(tmp_path / "batch") == ["srun exited 0"]
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
