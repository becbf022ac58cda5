"""Writes that fail for lack of space or quota (ENOSPC, EDQUOT) or for permission (EACCES, EPERM, EROFS).

Every write of a run (checkpoints, metrics.jsonl, TensorBoard, the loss plot, the run files, the data
snapshot) and of the data index cache goes through `guard`, which turns such a failure into one
`StorageError`: what was being written and where, the bytes it needed where known, what is free on that
filesystem (`shutil.disk_usage`), and what to do. Any other error passes through unchanged.

safetensors reports a failed write as `SafetensorError: Error while serializing: I/O error: No space left on
device (os error 28)`, not as an OSError: the errno is read from that text.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dstrain.errors import StorageError

SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
PERMISSION = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the filesystem is read-only",
}
REASONS = {**SPACE, **PERMISSION}
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors) names an errno


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a space or permission failure (an OSError, or safetensors' error text); else None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in REASONS else None
    found = RUST_OS_ERROR.search(str(exc))
    code = int(found.group(1)) if found else None
    return code if code in REASONS else None


def free_bytes(path: Path) -> int | None:
    """Free bytes for this user on the filesystem that holds `path` (or would: its nearest existing parent)."""
    for candidate in (Path(path), *Path(path).absolute().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human(size: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as `df -h` and `du -h` count)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Place:
    """Where writes go, and what a user can do when one fails there."""

    root: Path  # the directory whose filesystem is reported
    space_fix: str  # for ENOSPC / EDQUOT
    permission_fix: str  # for EACCES / EPERM / EROFS
    after: Callable[[], str] | None = None  # read at failure time: what is intact, how to go on


def run_place(run_dir: Path) -> Place:
    """A run dir: its checkpoints, metrics, TensorBoard events, plot, run files and data snapshot."""
    return Place(
        Path(run_dir),
        "free space there, lower train.keep_last, or move output_dir to a filesystem with room",
        f"make {run_dir} writable by this user, or move output_dir",
        lambda: resume_hint(Path(run_dir)),
    )


def cache_place(cache_root: Path) -> Place:
    """The data index cache (`dstrain.data.index.cache_root`)."""
    return Place(
        Path(cache_root),
        "free space there, or set DSTRAIN_CACHE_DIR to a directory on a filesystem with room",
        f"make {cache_root} writable by this user, or set DSTRAIN_CACHE_DIR to a writable directory",
    )


def resume_hint(run_dir: Path) -> str:
    from dstrain.checkpoint import layout

    latest = layout.read_latest(layout.checkpoints_dir(run_dir))
    if latest is None:
        return "no checkpoint had been written yet: start the run again once that is done"
    return (
        f"the last checkpoint, {latest}, is intact: `dstrain resume {run_dir}` continues from it once that is "
        "done (add --set output_dir=NEW_DIR to continue in another place)"
    )


def describe(code: int, place: Place, what: str, path: Path, needed: int | None = None) -> str:
    """One line: what failed where, the bytes needed and free, what to do, and what is intact."""
    parts = [f"{REASONS[code]} ({errno.errorcode[code]}) writing {what} {path}"]
    if code in SPACE:
        free = free_bytes(place.root)
        sizes = [f"it needs about {human(needed)}"] if needed else []
        sizes += [f"{human(free)} is free on the filesystem of {place.root}"] if free is not None else []
        parts[0] += f" ({', '.join(sizes)})" if sizes else ""
        parts.append(place.space_fix)
    else:
        parts.append(place.permission_fix)
    if place.after is not None:
        parts.append(place.after())
    return "; ".join(parts)


@contextmanager
def guard(place: Place, what: str, path: Path, needed: int | None = None) -> Iterator[None]:
    """Run a write; a space or permission failure in it becomes one StorageError naming `what` at `path`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        code = storage_errno(exc)
        if code is None:
            raise
        raise StorageError(describe(code, place, what, path, needed)) from exc
