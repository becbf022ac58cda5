"""Real `dstrain train` processes held in one phase by tests/integration/stop_probe/sitecustomize.py, then
signalled: what the stop tests of every phase share."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.helpers import REPO, child_env

PROBE = REPO / "tests" / "integration" / "stop_probe"
HANG_GUARD_S = 300  # a hang guard, not a speed test: each wait below normally ends within seconds


def probed_env(phase: str, held_dir: Path, **extra: str) -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE), str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(DSTRAIN_PROBE_PHASE=phase, DSTRAIN_PROBE_DIR=str(held_dir), **extra)
    return env


def start_probed(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """In its own session, so a test can signal the whole group as a terminal's Ctrl-C does."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_held(proc: subprocess.Popen, held_dir: Path, rank: int = 0) -> int:
    """The pid of `rank` once it holds in the probed phase."""
    marker = held_dir / f"held.rank{rank}"
    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.is_file() or not marker.read_text():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before holding\n{out[-2000:]}\n{err[-4000:]}")
        assert time.monotonic() < deadline, "the run never reached the probed phase"
        time.sleep(0.05)
    return int(marker.read_text())


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for the whole tree to exit (bounded); returns (exit status, stdout + stderr)."""
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running {HANG_GUARD_S} s after the signal\n{err[-4000:]}") from None
    return proc.returncode, out + err


def leftovers(marker: str) -> list[list[str]]:
    """Processes whose command line mentions `marker` (the run's config path): none may outlive the run."""
    deadline = time.monotonic() + 30  # ranks the launcher reaped may take a moment to leave the table
    while True:
        found = [
            p.info["cmdline"]
            for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()
        ]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
