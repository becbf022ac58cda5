"""A frozen rank (a real SIGSTOP: alive, its sockets open, silent) ends the whole job, whichever rank it is,
on one node and across two, with one line that names it; a pause shorter than the heartbeat timeout ends
nothing and changes nothing; a job ended this way resumes bitwise from its last checkpoint.

The ranks stop themselves in step 5, after the checkpoint of step 4 (tests/distributed/freeze_probe), while
the others wait for them in a collective: the hang that used to last until someone noticed. Each launch
costs ~20 s of start-up on 2 cores, so the short pause shares its launch with a freeze and the resume.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.distributed.test_multinode import node_cmd, write_hostfile
from tests.helpers import (
    REPO,
    check,
    child_env,
    deepspeed_cmd,
    dstrain,
    free_port,
    make_small_data,
    metrics,
    train_deepspeed,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.solo]

PROBE = Path(__file__).parent / "freeze_probe"
TIMEOUT_S = 10  # distributed.heartbeat_timeout_s at its minimum
# A hang guard, not a speed test: the job ends within TIMEOUT_S + 15 s (BENCHMARKS.md has the times
# measured). Before, a frozen rank 0 hung the job for good; a frozen rank 1 took 65 s.
HANG_GUARD_S = 120
START_GUARD_S = 300  # start-up on a loaded 2-core machine, before the freeze
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_small_data(tmp_path_factory.mktemp("data"))


def run_config(tmp_path: Path, data: dict[str, Path]) -> Path:
    return write_config(
        tmp_path,
        data,
        train={"max_steps": STEPS, "save_every": 2, "log_every": 1},
        distributed={"heartbeat_timeout_s": TIMEOUT_S},
    )


def adapter(run_dir: Path) -> dict[str, bytes]:
    """The final adapter's tensors, as bytes: compared bitwise."""
    tensors = load_file(str(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "adapter_model.safetensors"))
    return {name: t.contiguous().view(-1).numpy().tobytes() for name, t in tensors.items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> dict[str, bytes]:
    """The final adapter of the same run, neither paused nor frozen."""
    tmp = tmp_path_factory.mktemp("straight")
    check(train_deepspeed(run_config(tmp, data), cwd=tmp))
    return adapter(tmp / "run")


def start(cmd: list[str], tmp_path: Path, plan: str) -> subprocess.Popen:
    """A launcher whose ranks stop themselves as `plan` says ("1:4": rank 1 in step 5); in its own group."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE), str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(DSTRAIN_FREEZE=plan, DSTRAIN_FREEZE_DIR=str(tmp_path))
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def left_clean(jobs: list[subprocess.Popen]) -> Iterator[None]:
    """Leave nothing behind, frozen or not, even when the test fails (SIGKILL ends a stopped process too)."""
    try:
        yield
    finally:
        for job in jobs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.communicate()


def wait_frozen(jobs: list[subprocess.Popen], tmp_path: Path, rank: int) -> tuple[psutil.Process, float]:
    """The rank's process once it has stopped itself, and when that was seen."""
    marker, deadline = tmp_path / f"frozen.rank{rank}", time.monotonic() + START_GUARD_S
    while True:
        if marker.is_file() and marker.read_text():
            proc = psutil.Process(int(marker.read_text()))
            if proc.status() == psutil.STATUS_STOPPED:
                return proc, time.monotonic()
        for job in jobs:
            if job.poll() is not None:
                pytest.fail(
                    f"a launcher exited {job.returncode} before the freeze:\n{job.communicate()[1][-3000:]}"
                )
        assert time.monotonic() < deadline, f"rank {rank} never froze"
        time.sleep(0.1)


def ended(job: subprocess.Popen, frozen_at: float) -> tuple[int, str]:
    try:
        out, err = job.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job was still running {HANG_GUARD_S} s after the freeze")
    assert time.monotonic() - frozen_at < HANG_GUARD_S
    return job.returncode, out + err


def the_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return lines[0]


def killed(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def one_node(tmp_path: Path, data: dict[str, Path], plan: str) -> subprocess.Popen:
    return start(
        deepspeed_cmd("--module", "dstrain.train", "--config", str(run_config(tmp_path, data))),
        tmp_path,
        plan,
    )


def test_frozen_rank_0_ends_the_job_naming_it(tmp_path, data):
    job = one_node(tmp_path, data, "0:4")
    with left_clean([job]):
        frozen, at = wait_frozen([job], tmp_path, rank=0)
        code, output = ended(job, at)
    line = the_error_line(output)
    assert code != 0
    # rank 0 serves the rendezvous store: rank 1 sees it take requests and answer none
    named = rf"^\[rank 1\] error: rank 0 \({socket.gethostname()}, pid {frozen.pid}\) stopped responding"
    assert re.search(rf"{named}: the rendezvous store it serves at \S+ has not answered for \d+ s", line), (
        line
    )
    assert "(store unresponsive" in line and "stopped (SIGSTOP" in line and "ended with SIGKILL" in line
    assert f"{tmp_path}/run/logs/rank-00000.log" in line
    assert killed(frozen)  # by its peer on this node: the launcher did not wait 30 s on a SIGTERM


def test_a_short_pause_ends_nothing_a_frozen_rank_1_ends_the_job_and_it_resumes_bitwise(
    tmp_path, data, straight
):
    job = one_node(tmp_path, data, "0:2,1:4")
    with left_clean([job]):
        paused, _ = wait_frozen([job], tmp_path, rank=0)  # in step 3; rank 0's store does not answer either
        time.sleep(3)  # well within the 10 s timeout
        paused.send_signal(signal.SIGCONT)
        frozen, at = wait_frozen([job], tmp_path, rank=1)  # in step 5: the run went on past the pause
        code, output = ended(job, at)
    line = the_error_line(output)  # about rank 1 only: the pause ended nothing
    assert code != 0
    named = rf"^error: rank 1 \({socket.gethostname()}, pid {frozen.pid}\) stopped responding"
    assert re.search(rf"{named}: no heartbeat for \d+ s", line), line
    assert "stopped (SIGSTOP" in line and "ended with SIGKILL" in line
    assert f"{tmp_path}/run/logs/rank-00001.log" in line
    assert killed(frozen)

    resumed = check(dstrain("resume", str(tmp_path / "run"), "--num-gpus", "2", cwd=tmp_path))
    assert "at step 4" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r][-4:] == [5, 6, 7, 8]
    # the paused steps and the resumed ones are those of a run that nothing happened to
    assert adapter(tmp_path / "run") == straight


def two_nodes(tmp_path: Path, data: dict[str, Path], frozen_rank: int) -> list[subprocess.Popen]:
    """Two launchers, one rank each (tests/distributed/test_multinode.py); node 0's rank 0 serves the store."""
    config, hostfile, port = run_config(tmp_path, data), write_hostfile(tmp_path), free_port()
    return [
        start([*node_cmd(hostfile, n, port), "--config", str(config)], tmp_path, f"{frozen_rank}:4")
        for n in (0, 1)
    ]


def test_frozen_node_without_the_store_ends_the_other_node_naming_its_rank(tmp_path, data):
    jobs = two_nodes(tmp_path, data, frozen_rank=1)
    with left_clean(jobs):
        frozen, at = wait_frozen(jobs, tmp_path, rank=1)
        code, output = ended(jobs[0], at)
        assert jobs[1].poll() is None  # the frozen node's launcher waits on it: its scheduler's to end
        assert frozen.status() == psutil.STATUS_STOPPED  # on another node: not this rank's to kill
    line = the_error_line(output)
    assert code != 0
    assert re.search(
        rf"^error: rank 1 \(\S+, pid {frozen.pid}\) stopped responding: no heartbeat for \d+ s", line
    )
    assert "killed (by a signal, the OOM killer or a node failure) or is frozen" in line
    assert f"{tmp_path}/run/logs/rank-00001.log" in line


def test_frozen_node_with_the_store_ends_the_other_node_naming_rank_0(tmp_path, data):
    jobs = two_nodes(tmp_path, data, frozen_rank=0)
    with left_clean(jobs):
        frozen, at = wait_frozen(jobs, tmp_path, rank=0)
        code, output = ended(jobs[1], at)
        assert jobs[0].poll() is None and frozen.status() == psutil.STATUS_STOPPED
    line = the_error_line(output)
    assert code != 0
    named = rf"^\[rank 1\] error: rank 0 \(\S+, pid {frozen.pid}\) stopped responding"
    assert re.search(rf"{named}: the rendezvous store it serves at \S+ has not answered for \d+ s", line), (
        line
    )
    assert "(store unresponsive" in line and "so rank 0 is frozen or its node hangs" in line
    assert f"{tmp_path}/run/logs/rank-00000.log" in line
