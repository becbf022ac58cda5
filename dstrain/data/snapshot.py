"""Data snapshots (`data.snapshot: off | link | copy`): the bytes a run trains on, kept under its run dir.

    RUN_DIR/data_snapshot/train/00-train.jsonl, 01-..., eval/00-eval.jsonl

- `link`: a reflink (a copy-on-write clone, on Btrfs, XFS, ZFS 2.2, ...) where the filesystem makes one: no
  space until a source changes. Elsewhere a hard link: no space either, but the snapshot *is* the source
  file, so a file replaced by a new one (written beside it and renamed, as `dstrain convert` and most tools
  write) keeps its snapshot, while one edited in place changes it too. Either needs the data on the run
  dir's filesystem.
- `copy`: a full copy (the data's size, checked against the free space first), with a progress bar.

The snapshot is recorded (`record`) in data_provenance.json and in every checkpoint's trainer state: per
file its source, its path in the run dir, size and fingerprint. When a source has changed since the run
began, `dstrain resume` trains on the snapshot instead (`redirect`), which resumes bitwise: same bytes, same
order. Without a snapshot such a resume is refused as before (`checkpoint.resume.check_same_data`).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain import storage
from dstrain.data.provenance import changed_files, describe_files, fingerprint
from dstrain.errors import DataError, StorageError

if TYPE_CHECKING:
    from dstrain.checkpoint.state import TrainerState
    from dstrain.config.run import RunConfig

SNAPSHOT_DIR = "data_snapshot"
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int), clone a whole file (what `cp --reflink` does)
CHUNK = 16 << 20
HARD_LINK_CAVEAT = (
    "data.snapshot=link: this filesystem has no reflinks, so the snapshot is made of hard links: a training "
    "file replaced by a new file (written beside it and renamed, as `dstrain convert` does) keeps its "
    "snapshot, but one edited in place changes its snapshot too. data.snapshot=copy is safe against both"
)


def record(mode: str, train: list[dict[str, Any]], eval_files: list[dict[str, Any]]) -> dict[str, Any]:
    """What a snapshot of these files holds (from `provenance.describe_files` records): the same on every
    rank, so every rank's trainer state carries it without any I/O of the snapshot itself."""

    def entries(split: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "source": f["path"],
                "path": f"{SNAPSHOT_DIR}/{split}/{i:02d}-{Path(f['path']).name}",
                "size": f["size"],
                "fingerprint": f["fingerprint"],
            }
            for i, f in enumerate(files)
        ]

    return {"mode": mode, "train": entries("train", train), "eval": entries("eval", eval_files)}


def plan(cfg: RunConfig, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The snapshot a run has: the one its checkpoint recorded, else a new one when data.snapshot asks."""
    if saved:
        return saved
    if cfg.data.snapshot == "off":
        return {}
    evals = describe_files(cfg.data.eval, "data.eval") if cfg.data.eval else []
    return record(cfg.data.snapshot, describe_files(cfg.data.train), evals)


def take(run_dir: Path, snap: dict[str, Any], say: Any = print) -> None:
    """Write the snapshot under `run_dir` (rank 0); files already there with the right content are kept.
    `say` prints a line (the hard-link caveat)."""
    todo = [e for e in snap["train"] + snap["eval"] if not matches(run_dir, e)]
    if not todo:
        return
    place = storage.run_place(run_dir)
    needed = sum(e["size"] for e in todo)
    if snap["mode"] == "copy":
        check_room(run_dir, needed)
    methods = set()
    with storage.guard(place, "the data snapshot", run_dir / SNAPSHOT_DIR, needed):
        (run_dir / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
        if snap["mode"] == "copy":
            copy_all(run_dir, todo, needed)
            methods.add("copy")
        else:
            methods.update(link(Path(e["source"]), run_dir / e["path"]) for e in todo)
    for entry in todo:
        if not matches(run_dir, entry):
            raise DataError(f"{entry['source']}: changed while it was being snapshotted; start the run again")
    if "hard link" in methods:
        say(f"warning: {HARD_LINK_CAVEAT}")


def matches(run_dir: Path, entry: dict[str, Any]) -> bool:
    path = run_dir / entry["path"]
    return path.is_file() and fingerprint(path) == entry["fingerprint"]


def check_room(run_dir: Path, needed: int) -> None:
    free = storage.free_bytes(run_dir)
    if free is not None and free < needed:
        raise StorageError(
            f"data.snapshot=copy: the training and eval files take {storage.human(needed)}, but only "
            f"{storage.human(free)} is free on the filesystem of {run_dir}; free space there, use "
            "data.snapshot=link (no space on the same filesystem), or move output_dir"
        )


def link(source: Path, target: Path) -> str:
    """A reflink of `source` at `target`, else a hard link; returns which. Never crosses filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        with source.open("rb") as src, target.open("xb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return "reflink"
    except OSError as exc:
        target.unlink(missing_ok=True)
        if exc.errno == errno.EXDEV:
            raise cross_device(source, target.parents[2]) from None
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise cross_device(source, target.parents[2]) from None
        raise
    return "hard link"


def cross_device(source: Path, run_dir: Path) -> DataError:
    return DataError(
        f"data.snapshot=link: {source} is on another filesystem than output_dir {run_dir}, and a link cannot "
        "cross filesystems; use data.snapshot=copy, or put output_dir on the data's filesystem"
    )


def copy_all(run_dir: Path, todo: list[dict[str, Any]], total: int) -> None:
    """Copy each file into a temporary sibling, then rename it into place, with one progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("[bold]data snapshot"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("copy", total=total)
        for entry in todo:
            target = run_dir / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            try:
                with Path(entry["source"]).open("rb") as src, tmp.open("wb") as dst:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        progress.advance(task, len(chunk))
                    os.fsync(dst.fileno())
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)


def redirect(
    cfg: RunConfig, state: TrainerState, run_dir: Path, eval_overridden: bool
) -> tuple[RunConfig, str | None]:
    """On resume: when a training (or eval) source changed since the run began and the run has a snapshot,
    the config reads the snapshot instead; returns the config and the one line that says so."""
    snap = state.data_snapshot
    if not snap or not snap.get("train"):
        return cfg, None
    train_changes = changes(cfg.data.train, state.data_files, "data.train")
    eval_changes = [] if eval_overridden else changes(cfg.data.eval, snap.get("eval", []), "data.eval")
    if not (train_changes or eval_changes):
        return cfg, None
    data = cfg.data
    for split, changed in (("train", train_changes), ("eval", eval_changes)):
        if changed:
            data = replace(data, **{split: usable(run_dir, snap, split, changed)})
    what = " and ".join(f"data.{s}" for s, c in (("train", train_changes), ("eval", eval_changes)) if c)
    note = (
        f"{what} changed since the run began ({'; '.join(train_changes + eval_changes)}); resuming on the run's "
        f"data snapshot in {run_dir / SNAPSHOT_DIR} (data.snapshot={snap.get('mode')})"
    )
    return replace(cfg, data=data), note


def changes(patterns: list[str], recorded: list[dict[str, Any]], what: str) -> list[str]:
    """How today's files differ from the recorded ones (`provenance.changed_files`); all missing counts."""
    if not recorded:
        return []
    try:
        now = describe_files(patterns, what) if patterns else []
    except DataError as exc:  # a file that is gone
        return [str(exc)]
    # snapshot entries name their source under "source" (their "path" is the copy's)
    saved = [{**r, "path": r.get("source", r.get("path"))} for r in recorded]
    return changed_files(saved, now)


def usable(run_dir: Path, snap: dict[str, Any], split: str, changed: list[str]) -> list[str]:
    """The snapshot's paths of a split (glob-escaped: data.train takes globs), after checking each still
    holds the bytes it was taken with (a hard link edited in place does not)."""
    entries = snap.get(split, [])
    broken = [e for e in entries if not matches(run_dir, e)]
    if broken:
        why = "; ".join(f"{run_dir / e['path']}: missing or changed" for e in broken)
        raise DataError(
            f"data.{split} changed since the checkpoint ({'; '.join(changed)}), and so did its snapshot "
            f"({why}; a hard link changes with a source edited in place): restore the original files, or "
            "start a new run with `dstrain train`"
        )
    return [glob.escape(str(run_dir / e["path"])) for e in entries]
