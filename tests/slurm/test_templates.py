"""The sbatch templates in launch/, submitted to a real Slurm (slurmctld + slurmd + munge on this machine):
a 2-task job trains and checkpoints; a job sent SIGTERM saves, requeues itself and resumes from that save.

The test cluster has 2 CPUs and no GPUs, so the GPU and CPU counts of the templates' #SBATCH lines are
overridden on the sbatch command line (as a user with other hardware would), and each node runs 1 rank.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env, metrics, write_config
from tests.stop_helpers import probed_env

CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def submit(slurm, tmp_path: Path, template: str, config: Path, *args: str, env: dict | None = None) -> str:
    env = {
        **(env or child_env()),
        **slurm.env,
        "PATH": child_env()["PATH"] + ":" + slurm.env.get("PATH", ""),
    }
    return slurm.sbatch(
        [*CPU_NODE, f"--output={tmp_path}/slurm-%j.out", str(REPO / "launch" / template), str(config), *args],
        cwd=tmp_path,
        env=env,
    )


def job_output(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else "(no output file)"


def test_two_task_job_trains_and_checkpoints(slurm, tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 4, "save_every": 2})
    job = submit(slurm, tmp_path, "multi_node.sbatch", config, "--nproc-per-node", "1")
    fields = slurm.wait_job(job, timeout=600)
    out = job_output(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", out[-4000:]
    assert "dstrain.slurm: 2 node(s) x 1 rank(s)" in out
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert (run / "logs" / "rank-00001.log").is_file()


def wait_for_step(run: Path, step: int, slurm, job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(run) if (run / "metrics.jsonl").is_file() else []
        if any(r.get("step", 0) >= step for r in rows):
            return
        if slurm.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ended before step {step}: {slurm.job(job)}")
        time.sleep(0.5)
    pytest.fail(f"job {job} reached no step {step} within {timeout} s")


def test_sigterm_saves_then_the_requeued_job_resumes(slurm, tmp_path, small_data):
    steps = 400
    config = write_config(tmp_path, small_data, train={"max_steps": steps, "save_every": 0, "log_every": 1})
    job = submit(slurm, tmp_path, "preemptible.sbatch", config, "--nproc-per-node", "1")
    run = tmp_path / "run"
    wait_for_step(run, 3, slurm, job)
    signalled = slurm.run(["scancel", "--signal=TERM", job])
    assert signalled.returncode == 0, signalled.stderr

    fields = slurm.wait_job(job, timeout=900)  # through the requeue, to the end of the resumed run
    out = job_output(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{out[-4000:]}"
    assert "SIGTERM received: stopping after this step" in out
    assert f"requeueing job {job}" in out

    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and saved[-1] == f"step-{steps:08d}", saved  # the stop's save, the end's save
    stopped_at = int(saved[0].removeprefix("step-"))
    second_attempt = (run / "logs" / "rank-00000.log").read_text().split("===== ")[-1]
    assert re.search(rf"resuming from \S*{saved[0]} at step {stopped_at}\b", second_attempt), second_attempt
    logged = [r["step"] for r in metrics(run) if "loss" in r]
    assert logged == list(range(1, steps + 1))  # rows a stopped run logged past its save are dropped


def test_sigterm_during_the_requeued_jobs_start_up_requeues_it_again(slurm, tmp_path, small_data):
    """Preempted again while the requeued job is still starting (here: held by the probe in its model
    build): nothing was trained since the last save, so the ranks stop at once with 143, and dstrain.slurm
    counts that as a clean stop, requeues the job and exits 0; the third attempt finishes the run."""
    steps = 40
    config = write_config(tmp_path, small_data, train={"max_steps": steps, "save_every": 0, "log_every": 1})
    held = tmp_path / "held"
    held.mkdir()
    env = probed_env("build", held, DSTRAIN_PROBE_RESUMED="1", DSTRAIN_PROBE_ONCE="1")
    job = submit(slurm, tmp_path, "preemptible.sbatch", config, "--nproc-per-node", "1", env=env)
    run = tmp_path / "run"
    wait_for_step(run, 3, slurm, job)
    assert slurm.run(["scancel", "--signal=TERM", job]).returncode == 0  # preempted while training
    deadline = time.monotonic() + 600
    while not (held / "held.rank0").is_file():  # the requeued job holds in its start-up
        assert time.monotonic() < deadline, f"the requeued job never started: {slurm.job(job)}"
        time.sleep(0.5)
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert slurm.run(["scancel", "--signal=TERM", job]).returncode == 0  # preempted while starting

    fields = slurm.wait_job(job, timeout=900)
    out = job_output(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", f"{fields}\n{out[-4000:]}"
    assert "stopped by SIGTERM during the model and engine build: nothing was trained" in out
    assert out.count(f"requeueing job {job}") == 2
    final = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert final == [*saved, f"step-{steps:08d}"]  # the start-up stop wrote nothing
