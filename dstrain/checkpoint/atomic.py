"""Crash-safe writes: write beside the target, fsync, rename, fsync the parent.

A reader sees either the old state or the complete new one, never a half-written file or directory,
whatever kills the process and whenever.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (by any writer: text, safetensors, ...); on success fsync it
    and rename it to `path`. On failure the temporary file is removed and `path` is left untouched."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling dir to fill; on success fsync everything and rename it to `final`.

    On failure the temporary dir is removed and `final` (if it existed) is left untouched.
    """
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` (re-saving a step) is moved aside first and deleted only
    after the new one is in place, so a crash at any point leaves one complete copy under a known name."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}.{os.getpid()}") if final.exists() else None
    if old is not None:
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
