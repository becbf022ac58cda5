"""Find the checkpoint to resume from, verify it against its manifest, and read it back (no pickle).

A run dir resolves to its newest checkpoint that verifies; each broken newer one is reported by name with
what is wrong, so nothing is silently skipped. A checkpoint dir given explicitly must verify itself.
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
    CONFIG,
    DS_CONFIG,
    DS_SOURCE,
    OPTIMIZER,
    REQUIRED,
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


def verify(ckpt: Path) -> list[str]:
    """Manifest check plus the files a resume needs (a checkpoint of another layout lacks some)."""
    return layout.verify_checkpoint(ckpt, (*REQUIRED, rng_file(0)))


def is_checkpoint_dir(path: Path) -> bool:
    return layout.STEP_RE.match(path.name) is not None or (path / layout.MANIFEST).exists()


def find_checkpoint(path: Path) -> Found:
    """PATH is a run dir (newest valid checkpoint), its checkpoints/ dir, or one checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; give a run dir or a checkpoint dir")
    if is_checkpoint_dir(path):
        problems = verify(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is broken: " + "; ".join(problems))
        return Found(path, [])
    root = path if path.name == "checkpoints" else layout.checkpoints_dir(path)
    return newest_valid(root)


def newest_valid(root: Path) -> Found:
    notes = []
    named = layout.read_latest(root)
    if named is not None and not (root / named).is_dir():
        notes.append(f"{root / layout.LATEST} names {named}, which does not exist")
    candidates = layout.list_checkpoints(root)
    for candidate in reversed(candidates):
        problems = verify(candidate)
        if not problems:
            return Found(candidate, notes)
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
    return TrainerState(**{k: v for k, v in raw.items() if k in known})


def read_config_yaml(ckpt: Path) -> str:
    return (ckpt / CONFIG).read_text(encoding="utf-8")


def read_ds_source(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / DS_SOURCE)


def read_ds_resolved(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / DS_CONFIG)


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
