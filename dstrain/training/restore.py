"""A run's starting state: fresh, or continued from a checkpoint (same checkpoint on every rank, newer ones of
an abandoned timeline set aside, optimizer, scheduler and RNG restored into the new engine). A format-1
checkpoint (adapter only) is a warm start: its weights, step and data position, a fresh Adam."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain import package_versions
from dstrain.checkpoint import layout
from dstrain.checkpoint.state import TrainerState
from dstrain.distributed.collectives import agreed, all_gather_bytes
from dstrain.errors import DistributedError

if TYPE_CHECKING:
    import torch

    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.config.run import RunConfig
    from dstrain.training.prepare import Prepared


def versions() -> dict[str, str]:
    """Recorded in every checkpoint: what produced the weights matters when they stop loading."""
    return package_versions()


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


def initial_adapter(resume: ResumePoint | None, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """A resumed PiSSA/OLoRA run's initial adapter, read back out of the checkpoint's converted adapter: the
    residual base is rebuilt from it (model/variants.py). None for a fresh run or any other init."""
    from dstrain.checkpoint import load
    from dstrain.model import variants

    if resume is None or not variants.mutates_base(cfg.lora.init_lora_weights):
        return None
    with agreed(f"reading {resume.ckpt}"):  # the build after it is a collective under ZeRO-3
        adapter = load.read_adapter(resume.ckpt)
    return variants.initial_from_plain_lora(adapter)


def new_state(world_size: int, prepared: Prepared) -> TrainerState:
    from dstrain.data.provenance import describe_files

    return TrainerState(
        world_size=world_size,
        global_batch=prepared.plan.global_batch,
        train_samples=len(prepared.train),
        config_digest=prepared.config_digest,
        versions=versions(),
        data_files=describe_files(prepared.cfg.data.train),
    )


def restore(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Load optimizer, scheduler and RNG state into the new engine (a collective) and continue the state."""
    from dstrain.checkpoint import load, optim
    from dstrain.checkpoint.rng import restore_rng, seed_everything

    saved = resume.state
    if resume.warm_start:
        return warm_start(resume, ds_engine, peft_model, prepared, rank, world)
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
    return continued(saved, prepared, world)


def continued(saved: TrainerState, prepared: Prepared, world: int) -> TrainerState:
    """The saved state, re-stamped with this run's world size, config digest, versions and data records."""
    from dstrain.data.provenance import describe_files

    files = describe_files(prepared.cfg.data.train)
    return replace(
        saved, world_size=world, config_digest=prepared.config_digest, versions=versions(), data_files=files
    )


def warm_start(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Format 1: the saved adapter weights, step and data position, with Adam's moments and step count at zero
    and the LR schedule where an uninterrupted run would be. A collective: every rank calls it."""
    from dstrain import engine
    from dstrain.checkpoint import load, optim
    from dstrain.checkpoint.rng import seed_everything

    saved = resume.state
    with agreed(f"reading {resume.ckpt}"):
        adapter = load.read_adapter(resume.ckpt)
    seed_everything(prepared.cfg.train.seed + 1 + rank + 1_000_003 * saved.step)  # no saved RNG in format 1
    params = optim.trainable(peft_model)
    # PEFT's file names for the model's parameter names (adapter_state maps them; the index marks each).
    marks = engine.adapter_state(peft_model, {name: torch_scalar(i) for i, (name, _) in enumerate(params)})
    by_param = {params[int(mark)][0]: key for key, mark in marks.items()}
    tensors = {}
    for name, _ in params:
        master = adapter.get(by_param.get(name, name))
        if master is None:
            continue  # check_matches names it
        tensors[f"{name}::{optim.MASTER}"] = master.float()
        for key in optim.MOMENTS:
            tensors[f"{name}::{key}"] = master.float().new_zeros(master.shape)
    sched = warm_schedule(optim.scheduler_state(ds_engine), prepared.ds, saved)
    plan = prepared.plan
    optim.restore_optimizer_state(
        ds_engine, peft_model, tensors, sched, plan.accumulation, prepared.tokenizer.pad_token_id
    )
    return continued(saved, prepared, world)


def torch_scalar(value: int) -> Any:
    import torch

    return torch.tensor(value)


def warm_schedule(fresh: dict[str, Any], ds: dict[str, Any], saved: TrainerState) -> dict[str, Any]:
    """The scheduler state of a fresh engine moved to `saved.step`: the same DeepSpeed scheduler, stepped as
    many times on a stand-in optimizer, gives the learning rate an uninterrupted run would use next."""
    import torch
    from deepspeed.runtime import lr_schedules

    sched = dict(fresh, optimizer_step=0, global_steps=saved.step, global_samples=saved.samples)
    spec = ds.get("scheduler")
    if not spec or fresh.get("scheduler") is None:
        return sched
    groups = len(fresh["param_group_lr"])
    stand_in = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=0
    )
    scheduler = getattr(lr_schedules, spec["type"])(stand_in, **spec.get("params", {}))
    scheduler.load_state_dict(fresh["scheduler"])
    for _ in range(saved.step):
        scheduler.step()
    sched["scheduler"] = scheduler.state_dict()
    sched["param_group_lr"] = [float(g["lr"]) for g in stand_in.param_groups]
    return sched
