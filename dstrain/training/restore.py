"""A run's starting state: fresh, or continued from a checkpoint (same checkpoint on every rank, newer ones of
an abandoned timeline set aside, optimizer, scheduler and RNG restored into the new engine)."""

from __future__ import annotations

import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.checkpoint import layout
from dstrain.checkpoint.state import TrainerState
from dstrain.distributed.collectives import agreed, all_gather_bytes
from dstrain.errors import DistributedError

if TYPE_CHECKING:
    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.training.prepare import Prepared

# Versions recorded in every checkpoint: what produced the weights matters when they stop loading.
TRACKED_PACKAGES = ("dstrain", "torch", "deepspeed", "transformers", "peft", "safetensors")


def versions() -> dict[str, str]:
    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def agree_on_checkpoint(resume: ResumePoint) -> None:
    """Every rank must continue from the same checkpoint (each resolved PATH on its own)."""
    chosen = {blob.decode() for blob in all_gather_bytes(str(resume.ckpt.resolve()).encode())}
    if len(chosen) > 1:
        raise DistributedError(
            f"ranks chose different checkpoints to resume from ({', '.join(sorted(chosen))}): pass one "
            "checkpoint dir, or use `dstrain resume`, which picks it once for all ranks"
        )


def archive_newer_checkpoints(ckpt: Path, output_dir: Path) -> list[str]:
    """Resuming an older checkpoint of the same run rolls the run back: the newer checkpoints belong to the
    abandoned timeline, so they move to checkpoints/abandoned/ (never deleted), out of `latest`'s reach."""
    root = layout.checkpoints_dir(output_dir)
    if ckpt.parent.resolve() != root.resolve():
        return []
    newer = [p for p in layout.list_checkpoints(root) if p.name > ckpt.name]
    if not newer:
        return []
    aside = root / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for path in newer:
        path.rename(aside / path.name)
    layout.write_latest(root, ckpt.name)
    return [f"rolled back to {ckpt.name}: moved {', '.join(p.name for p in newer)} to {aside}"]


def new_state(world_size: int, prepared: Prepared) -> TrainerState:
    return TrainerState(
        world_size=world_size,
        global_batch=prepared.plan.global_batch,
        train_samples=len(prepared.train),
        config_digest=prepared.config_digest,
        versions=versions(),
    )


def restore(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Load optimizer, scheduler and RNG state into the new engine (a collective) and continue the state."""
    from dstrain.checkpoint import load, optim
    from dstrain.checkpoint.rng import restore_rng, seed_everything

    saved = resume.state
    with agreed(f"reading {resume.ckpt}"):  # before any collective: no rank left waiting
        tensors, sched = load.read_optimizer(resume.ckpt)
        rng = load.read_rng(resume.ckpt, rank) if world == saved.world_size else None
    optim.restore_optimizer_state(
        ds_engine, peft_model, tensors, sched, prepared.plan.accumulation, prepared.tokenizer.pad_token_id
    )
    if rng is not None:
        restore_rng(*rng)
    else:  # another world size: rank r's stream has no saved counterpart; derive one from seed and step
        seed_everything(prepared.cfg.train.seed + 1 + rank + 1_000_003 * saved.step)
    return replace(saved, world_size=world, config_digest=prepared.config_digest, versions=versions())
