"""A tiny real filesystem for the disk-full tests: a tmpfs mounted over a test's directory.

CI runs as root in a container, where mounting a tmpfs may be allowed (CAP_SYS_ADMIN) or not; without it the
test is skipped with the reason, and the injected-ENOSPC tests still cover the same code paths.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount(where: Path, options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` (mount's units: 1200k, 8m) at `where` (created), unmounted at the end."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = mount(where, f"size={size}" + (",ro" if read_only else ""))
    except FileNotFoundError:
        pytest.skip("no `mount` command here: cannot make a tiny filesystem")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def grow(where: Path, size: str) -> None:
    """Make room on a mounted tmpfs: what a user does by freeing space."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)
