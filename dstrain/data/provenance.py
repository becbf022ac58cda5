"""Where a run's training data came from: per file its path, size, mtime and a cheap content fingerprint.

The fingerprint hashes the size and three fixed 64 KiB blocks (first, middle, last), so it costs three small
reads whatever the file's size (a 100 GB corpus included). It is no full-content hash: an edit that keeps the
size and misses the sampled blocks goes unseen; the sample count check on resume is the second guard. The
records live in every checkpoint's trainer state and in the run dir (`data_provenance.json`); `dstrain
resume` refuses a changed file naming both fingerprints, and `dstrain inspect` shows whether each matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 64 * 1024
SCHEME = "sampled-sha256"  # the fingerprint's name: a later scheme gets a new one, old records stay readable


def fingerprint(path: Path) -> str:
    """`sampled-sha256:<hex>` over the file size and its first, middle and last 64 KiB."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with Path(path).open("rb") as fh:
        for offset in sorted({0, max(0, size // 2 - BLOCK // 2), max(0, size - BLOCK)}):
            fh.seek(offset)
            digest.update(fh.read(BLOCK))
    return f"{SCHEME}:{digest.hexdigest()[:32]}"


def describe_file(path: Path) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime, "fingerprint": fingerprint(path)}


def describe_files(patterns: list[str], what: str = "data.train") -> list[dict[str, Any]]:
    """One record per file the patterns expand to, in the order the corpus reads them."""
    from dstrain.data.records import expand_paths

    return [describe_file(path) for path in expand_paths(patterns, what)]


def changed_files(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """One line per difference between the recorded files and today's, in corpus order.

    Files are matched by position (a moved or copied corpus keeps its order, not its paths); a file whose
    fingerprint is unchanged counts as the same whatever its path or mtime. Nothing recorded: nothing to say.
    """
    if not saved:
        return []
    lines = []
    for old, new in zip(saved, now, strict=False):
        if old.get("fingerprint") != new["fingerprint"]:
            lines.append(
                f"{new['path']}: fingerprint {old.get('fingerprint')} (size {old.get('size')}) when saved, "
                f"{new['fingerprint']} (size {new['size']}) now"
            )
    lines += [f"{old.get('path')}: trained on, no longer in data.train" for old in saved[len(now) :]]
    lines += [f"{new['path']}: in data.train now, not trained on" for new in now[len(saved) :]]
    return lines


def file_status(record: dict[str, Any], base: Path | None = None) -> str:
    """Whether the recorded file still matches: `matches`, `missing`, or `changed (... -> ...)`.

    A relative path is looked up under `base` when given (where the run was started), else the cwd.
    """
    path = Path(record.get("path", ""))
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    if not path.is_file():
        return "missing"
    now = fingerprint(path)
    if now != record.get("fingerprint"):
        return f"changed ({record.get('fingerprint')} -> {now})"
    return "matches"
