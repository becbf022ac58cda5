"""Helpers of the disk-full tests: a tiny real filesystem (a tmpfs mounted over a test's directory), the
environment of the ENOSPC probe (tests/integration/disk_probe), and what a run must leave behind.

CI runs as root in a container, where mounting a tmpfs may be allowed (CAP_SYS_ADMIN) or not: without it a
test injects the failure instead (`mountable_tmpfs`), or is skipped with the reason (`tmpfs`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstrain.checkpoint import layout
from tests.helpers import REPO, child_env

PROBE = REPO / "tests" / "integration" / "disk_probe"
TRAIN = {"max_steps": 4, "save_every": 2, "keep_last": 5, "log_every": 1}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def probe_env(single: bool = True, **values: str) -> dict[str, str]:
    """The environment of a run whose writes fail as DSTRAIN_DISKFULL_* say (see the probe's docstring);
    `single`: a process without a launcher (with one, the ranks fail, not the launcher)."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PROBE), str(REPO), env.get("PYTHONPATH", "")])
    env.update(values)
    if single:
        env["DSTRAIN_DISKFULL_SINGLE"] = "1"
    return env


def assert_checkpoints(run_dir: Path, *steps: int) -> None:
    """Exactly these checkpoints, each matching its manifest, `latest` naming the newest, no temp dirs."""
    root = layout.checkpoints_dir(run_dir)
    names = [layout.step_name(step) for step in steps]
    assert [p.name for p in layout.list_checkpoints(root)] == names
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # no partial checkpoint
    assert all(layout.verify_checkpoint(root / name) == [] for name in names)
    assert layout.read_latest(root) == names[-1]


def mount(where: Path, options: str) -> str | None:
    """Mount a tmpfs at `where`; None when done, else why it could not be."""
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
    except FileNotFoundError:
        return "no `mount` command here"
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


@contextlib.contextmanager
def mountable_tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path | None]:
    """A tmpfs of `size` (mount's units: 1200k, 8m) at `where` (created), unmounted at the end; None (and
    `where` a plain directory) where this machine does not let the test mount one."""
    where.mkdir(parents=True, exist_ok=True)
    if mount(where, f"size={size}" + (",ro" if read_only else "")) is not None:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """`mountable_tmpfs`, or the test skipped with the reason."""
    where.mkdir(parents=True, exist_ok=True)
    why = mount(where, f"size={size}" + (",ro" if read_only else ""))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why}): needs root with CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def grow(where: Path, size: str) -> None:
    """Make room on a mounted tmpfs: what a user does by freeing space."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)
