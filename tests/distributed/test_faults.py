"""A rank that dies mid-step takes the whole job down, on every launcher, within a bound, with a message
that names it. The ranks are real processes, killed with real signals while they train. (A rank that
freezes: test_frozen.py.)"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.test_multinode import node_cmd, write_hostfile
from tests.helpers import child_env, deepspeed_cmd, free_port, metrics, torchrun_cmd, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.solo]

# The acceptance bound from the kill to the last launcher's exit: a hang guard, not a speed test. Without
# failure detection the survivors wait out the 600 s collective timeout (or forever, for a frozen rank).
BOUND_S = 120


def long_run(tmp_path: Path, small_data: dict, **distributed: int) -> Path:
    return write_config(
        tmp_path,
        small_data,
        train={"max_steps": 5000, "save_every": 0, "log_every": 1},
        distributed=distributed,
    )


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid from the newest header of the rank's log (`===== ... rank R/W on HOST pid N =====`)."""
    headers = re.findall(r"pid (\d+) =====", (run_dir / "logs" / f"rank-{rank:05d}.log").read_text())
    return int(headers[-1])


def wait_for_step(run_dir: Path, step: int, jobs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(job.poll() is not None for job in jobs):
            pytest.fail("a launcher exited before the fault was injected: " + describe(jobs))
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if any(r.get("step", 0) >= step for r in rows):
            return
        time.sleep(0.5)
    pytest.fail(f"no step {step} within {timeout} s")


def describe(jobs: list[subprocess.Popen]) -> str:
    return "; ".join(f"pid {j.pid} exit {j.poll()}" for j in jobs)


def inject_and_wait(
    run_dir: Path, jobs: list[subprocess.Popen], rank: int, sig: signal.Signals
) -> tuple[float, list[tuple[int, str]]]:
    """Signal rank `rank` at step 3; return seconds until every launcher exited, and their (code, stderr)."""
    wait_for_step(run_dir, 3, jobs)
    victim = psutil.Process(rank_pid(run_dir, rank))
    killed_at = time.monotonic()
    victim.send_signal(sig)
    try:
        results = []
        for job in jobs:
            _, err = job.communicate(timeout=max(1.0, BOUND_S + 60 - (time.monotonic() - killed_at)))
            results.append((job.returncode, err))
        return time.monotonic() - killed_at, results
    finally:
        cleanup(jobs, victim)


def cleanup(jobs: list[subprocess.Popen], victim: psutil.Process) -> None:
    """Leave nothing behind, even when the test fails: a frozen rank would otherwise outlive the test."""
    for job in jobs:
        try:
            procs = [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in [victim, *procs]:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        job.wait(timeout=30)


def start_deepspeed_job(tmp_path, config) -> subprocess.Popen:
    return start(deepspeed_cmd("--module", "dstrain.train", "--config", str(config)), tmp_path)


def test_killed_rank_ends_deepspeed_job_with_its_name(tmp_path, small_data):
    job = start_deepspeed_job(tmp_path, long_run(tmp_path, small_data))
    took, [(code, err)] = inject_and_wait(tmp_path / "run", [job], rank=1, sig=signal.SIGKILL)
    assert code != 0
    assert took < BOUND_S
    assert re.search(r"error: rank 1 \(.*pid \d+\) died", err), err[-3000:]
    assert "logs/rank-00001.log" in err


def test_killed_rank_0_ends_two_node_job_with_its_name(tmp_path, small_data):
    config = long_run(tmp_path, small_data)
    hostfile, port = write_hostfile(tmp_path), free_port()
    jobs = [start([*node_cmd(hostfile, r, port), "--config", str(config)], tmp_path) for r in (0, 1)]
    took, [(code0, _), (code1, err1)] = inject_and_wait(tmp_path / "run", jobs, rank=0, sig=signal.SIGKILL)
    assert code0 != 0 and code1 != 0
    assert took < BOUND_S
    # node 0 lost its only rank; node 1's rank says who died (its console is silent but for errors)
    assert re.search(r"\[rank 1\] error: rank 0 \(.*\) died", err1), err1[-3000:]


def test_killed_rank_ends_torchrun_job_with_its_name(tmp_path, small_data):
    config = long_run(tmp_path, small_data)
    job = start(torchrun_cmd("-m", "dstrain.train", "--config", str(config)), tmp_path)
    took, [(code, err)] = inject_and_wait(tmp_path / "run", [job], rank=1, sig=signal.SIGKILL)
    assert code != 0
    assert took < BOUND_S
    assert re.search(r"error: rank 1 \(.*pid \d+\) died", err), err[-3000:]
