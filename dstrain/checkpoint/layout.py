"""Checkpoint names, the manifest, the `latest` pointer and pruning.

checkpoints/step-00000120/   the files listed in `dstrain.checkpoint.save`, manifest.json written last
checkpoints/latest           text file naming the newest complete checkpoint
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from dstrain import __version__
from dstrain.checkpoint.atomic import TMP_PREFIX, write_text_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_PREFIX = "dstrain-checkpoint/"
# Every format dstrain has written, and what it added. The loader reads all of them (never drop one):
# a format change bumps FORMAT_VERSION, adds a line here and a golden fixture under tests/fixtures/golden/.
FORMATS = {
    1: "adapter, adapter config, trainer state, config, ZeRO JSON (no optimizer state: warm start only)",
    2: "optimizer, scheduler and per-rank RNG state added (exact resume)",
}
FORMAT_VERSION = max(FORMATS)
FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"
STEP_RE = re.compile(r"^step-(\d{8})$")
OLD_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}old-(step-\d{{8}})\.\d+$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: Path) -> dict:
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    return {"format": FORMAT, "dstrain": __version__, "files": files}


def format_version(name: object) -> int | None:
    """2 for "dstrain-checkpoint/2"; None for anything that is not a dstrain checkpoint format."""
    if not isinstance(name, str) or not name.startswith(FORMAT_PREFIX):
        return None
    number = name[len(FORMAT_PREFIX) :]
    return int(number) if number.isdigit() else None


def format_problem(manifest_path: Path, manifest: dict) -> str | None:
    """Why this dstrain cannot read the checkpoint's format (None when it can)."""
    name, number = manifest.get("format"), format_version(manifest.get("format"))
    if number is not None and number > FORMAT_VERSION:
        writer = manifest.get("dstrain")
        by = f" by dstrain {writer}" if isinstance(writer, str) else " by a newer dstrain"
        return (
            f"{manifest_path}: format {name!r} was written{by}; this dstrain {__version__} reads formats up to "
            f"{FORMAT!r}. Upgrade dstrain (pip install -U dstrain) to load it"
        )
    if number is None or number not in FORMATS:
        return f"{manifest_path}: format {name!r} is not a dstrain checkpoint format this dstrain knows"
    return None


def read_manifest(directory: Path) -> dict | None:
    """The parsed manifest.json of `directory`, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_checkpoint(directory: Path, required: tuple[str, ...] = ()) -> list[str]:
    """Every way `directory` differs from its manifest, as 'file: problem' lines (empty when intact).

    `required` names files that must be listed too (a manifest only vouches for what it lists).
    """
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (the checkpoint was not completed)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("bad file entries")
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return [f"{manifest_path}: unreadable manifest"]
    if (problem := format_problem(manifest_path, manifest)) is not None:
        return [problem]
    problems = [
        f"{directory / name}: missing (not in the manifest)" for name in required if name not in files
    ]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size} != {entry['size']} in the manifest")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 does not match the manifest")
    return problems


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint dirs, oldest first (temporary dirs are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def write_latest(root: Path, name: str) -> None:
    write_text_atomic(root / LATEST, name + "\n")


def read_latest(root: Path) -> str | None:
    path = root / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def prune(root: Path, keep_last: int, protect: set[str] | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never a protected one); return what was removed."""
    protect = protect or set()
    doomed = [p for p in list_checkpoints(root)[:-keep_last] if p.name not in protect]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale_temp(root: Path) -> list[Path]:
    """Temporary dirs left by a save that was killed; safe to delete before a new save starts.

    One kind is not garbage: a complete checkpoint moved aside while the same step was being re-saved
    (`atomic._swap_in`). If the kill came before the new copy took its name, the old one is put back.
    """
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    for path in stale:
        original = OLD_RE.match(path.name)
        if original and not (root / original.group(1)).exists() and not verify_checkpoint(path):
            path.rename(root / original.group(1))
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale
