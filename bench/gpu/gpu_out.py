"""What the GPU call leaves in $OUT, within what the device tool brings back (its README): at most 8 files of
at most 16 MiB, no more than two folders deep, names of letters, digits, '.', '_' and '-'.

This run keeps well inside that, flat: at most MAX_FILES files, namely setup.txt (install, preflight, model,
summary), one results JSON per part (the first MAX_FILES - 2 parts; a later part's JSON goes into the tarball)
and logs.tar.gz (every launch log, each cut to its last LOG_TAIL bytes, and the overflow JSONs).
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

MAX_FILES = 6  # the tool brings back 8: two spare for anything unforeseen
MAX_BYTES = 16 * 2**20
LOG_TAIL = 2 * 2**20
TARBALL = "logs.tar.gz"
SETUP = "setup.txt"
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_SUFFIXES = (".log", ".txt", ".yaml", ".json")
SKIP_DIRS = ("model", "site")  # the model's weights and the installed wheels are not logs


def result_path(part: str, index: int, out: Path, work: Path) -> Path:
    """Where part number `index` (0-based, in run order) writes its results JSON."""
    if index < MAX_FILES - 2:
        return out / f"{part}.json"
    return work / "results" / f"{part}.json"  # packed into the tarball


def _wanted(path: Path, work: Path, out: Path) -> bool:
    rel = path.relative_to(work)
    if rel.parts[0] in SKIP_DIRS or path.suffix not in LOG_SUFFIXES or not path.is_file():
        return False
    return out.resolve() not in path.resolve().parents


def pack_logs(work: Path, out: Path) -> Path:
    """Write $OUT/logs.tar.gz of every log under `work` (each cut to its last LOG_TAIL bytes); atomic."""
    target = out / TARBALL
    partial = out / (TARBALL + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if not _wanted(path, work, out):
                continue
            data = path.read_bytes()
            if len(data) > LOG_TAIL:
                data = b"[... cut: only the last %d bytes kept ...]\n" % LOG_TAIL + data[-LOG_TAIL:]
            info = tarfile.TarInfo(str(path.relative_to(work)))
            info.size = len(data)
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    partial.replace(target)
    return target


def check_out(out: Path) -> list[str]:
    """What in `out` the device tool would not bring back (empty when all of it comes back)."""
    problems = []
    entries = sorted(out.rglob("*"))
    files = [p for p in entries if p.is_file() or p.is_symlink()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in OUT, over {MAX_FILES}: {', '.join(p.name for p in files)}")
    for path in entries:
        rel = path.relative_to(out)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file")
        elif any(not NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name the tool does not bring back")
        elif path.is_file() and len(rel.parts) > 3:
            problems.append(f"{rel}: over two folders deep")
        elif path.is_file() and path.stat().st_size > MAX_BYTES:
            problems.append(f"{rel}: {path.stat().st_size} bytes, over 16 MiB")
    return problems
