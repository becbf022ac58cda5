"""Find the checkpoint to resume from, verify it against its manifest, and read it back (no pickle).

A run dir resolves to its newest checkpoint that verifies; each broken newer one is reported by name with
what is wrong, so nothing is silently skipped. A checkpoint dir given explicitly must verify itself.

Every format dstrain has written is read (`layout.FORMATS`): format 1 (adapter only) for inspect, export and
a warm start; format 2 on for an exact resume. A format newer than this dstrain knows is one error that
names both and says to upgrade, never a fall-back to an older checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dstrain.checkpoint import layout
from dstrain.checkpoint.state import (
    ADAPTER_WEIGHTS,
    CONFIG,
    DS_CONFIG,
    DS_SOURCE,
    OPTIMIZER,
    REQUIRED,
    REQUIRED_V1,
    SCHEDULER,
    TRAINER_STATE,
    TrainerState,
    rng_file,
)
from dstrain.errors import CheckpointError


@dataclass
class Found:
    path: Path
    notes: list[str]  # broken newer checkpoints passed over, a stale `latest`, ...
    format: int = layout.FORMAT_VERSION


def checkpoint_format(ckpt: Path) -> int:
    """The format number in the manifest (the current one when it cannot be read: verify says why)."""
    manifest = layout.read_manifest(ckpt) or {}
    return layout.format_version(manifest.get("format")) or layout.FORMAT_VERSION


def check_readable_format(ckpt: Path) -> None:
    """Raise the one clear error for a checkpoint written in a format newer than this dstrain reads."""
    manifest = layout.read_manifest(ckpt)
    number = layout.format_version(manifest.get("format")) if manifest else None
    if number is not None and number > layout.FORMAT_VERSION:
        raise CheckpointError(str(layout.format_problem(ckpt / layout.MANIFEST, manifest)))


def required_files(fmt: int) -> tuple[str, ...]:
    return REQUIRED_V1 if fmt == 1 else (*REQUIRED, rng_file(0))


def verify(ckpt: Path) -> list[str]:
    """Manifest check plus the files its format must hold (a checkpoint of another layout lacks some)."""
    return layout.verify_checkpoint(ckpt, required_files(checkpoint_format(ckpt)))


def is_checkpoint_dir(path: Path) -> bool:
    return layout.STEP_RE.match(path.name) is not None or (path / layout.MANIFEST).exists()


def find_checkpoint(path: Path) -> Found:
    """PATH is a run dir (newest valid checkpoint), its checkpoints/ dir, or one checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; give a run dir or a checkpoint dir")
    if is_checkpoint_dir(path):
        check_readable_format(path)
        problems = verify(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is broken: " + "; ".join(problems))
        return Found(path, [], checkpoint_format(path))
    root = path if path.name == "checkpoints" else layout.checkpoints_dir(path)
    return newest_valid(root)


def newest_valid(root: Path) -> Found:
    notes = []
    named = layout.read_latest(root)
    if named is not None and not (root / named).is_dir():
        notes.append(f"{root / layout.LATEST} names {named}, which does not exist")
    candidates = layout.list_checkpoints(root)
    for candidate in reversed(candidates):
        check_readable_format(candidate)  # falling back past a newer format would roll the run back
        problems = verify(candidate)
        if not problems:
            return Found(candidate, notes, checkpoint_format(candidate))
        notes.append(f"skipping broken checkpoint {candidate.name}: " + "; ".join(problems))
    if not candidates:
        raise CheckpointError(
            f"{root.parent}: no checkpoints under {root}; start the run with `dstrain train` instead"
        )
    raise CheckpointError(f"{root.parent}: no valid checkpoint. " + " | ".join(notes))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def read_trainer_state(ckpt: Path) -> TrainerState:
    raw = read_json(ckpt / TRAINER_STATE)
    needed = ("step", "epoch", "cursor", "samples", "tokens", "world_size", "global_batch")
    bad = [k for k in needed if not isinstance(raw, dict) or not isinstance(raw.get(k), int) or raw[k] < 0]
    if bad:
        raise CheckpointError(
            f"{ckpt / TRAINER_STATE}: {', '.join(bad)} missing or not a non-negative integer; the checkpoint "
            "was not written by this version of dstrain or was edited. Resume from another checkpoint."
        )
    known = {f.name for f in fields(TrainerState)}
    # Format 1 wrote `versions: null`; fields added since are absent and keep their defaults.
    values = {k: v for k, v in raw.items() if k in known and v is not None}
    return TrainerState(**values)


def read_config_yaml(ckpt: Path) -> str:
    return (ckpt / CONFIG).read_text(encoding="utf-8")


def read_ds_source(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / DS_SOURCE)


def read_ds_resolved(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / DS_CONFIG)


def read_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's file layout (keys as PEFT saves them)."""
    try:
        return load_file(str(ckpt / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{ckpt / ADAPTER_WEIGHTS}: unreadable ({exc})") from exc


def read_optimizer(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_file(str(ckpt / OPTIMIZER))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{ckpt / OPTIMIZER}: unreadable ({exc})") from exc
    return tensors, read_json(ckpt / SCHEDULER)


def read_rng(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """This rank's saved generator state, or None when the checkpoint had fewer ranks."""
    path = ckpt / rng_file(rank)
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:  # verified against the manifest before it is read
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
        return tensors, fh.metadata() or {}
