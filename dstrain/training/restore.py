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
    from dstrain.config.sources import train_patterns
    from dstrain.data.provenance import describe_files
    from dstrain.training.sources import initial_sources

    mixture = prepared.mixture
    return TrainerState(
        world_size=world_size,
        global_batch=prepared.plan.global_batch,
        train_samples=len(prepared.train),
        config_digest=prepared.config_digest,
        versions=versions(),
        data_files=describe_files(train_patterns(prepared.cfg.data)),
        sources=initial_sources(mixture, mixture.describe_files()) if mixture is not None else [],
    )


def restore(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Load optimizer, scheduler and RNG state into the new engine (a collective) and continue the state;
    the LR schedule is then kept or stretched for the run's (new) length."""
    if resume.warm_start:
        state = warm_start(resume, ds_engine, peft_model, prepared, rank, world)
    else:
        state = restore_full(resume, ds_engine, peft_model, prepared, rank, world)
    resume.schedule_note = plan_schedule(resume, ds_engine, prepared)
    return state


def plan_schedule(resume: ResumePoint, ds_engine: object, prepared: Prepared) -> str:
    """Keep or stretch the restored LR schedule (train.resume_schedule); the line that says which."""
    from dstrain import engine
    from dstrain.training.schedule import apply_on_resume

    return apply_on_resume(
        engine.lr_schedule(ds_engine),
        prepared.cfg.train.resume_schedule,
        resume.state.step,
        resume.planned_steps,
        prepared.total_steps,
    )


def restore_full(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Format 2: optimizer moments, scheduler, counters and per-rank RNG, exactly as saved."""
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
    return continued(saved, prepared, world)


def continued(saved: TrainerState, prepared: Prepared, world: int) -> TrainerState:
    """The saved state, re-stamped with this run's world size, config digest, versions and data records
    (a mixture's sources and the start of its plan: training/sources.py)."""
    from dstrain.config.sources import train_patterns
    from dstrain.data.provenance import describe_files
    from dstrain.training.sources import continued_sources, origin_record

    files = describe_files(train_patterns(prepared.cfg.data))
    state = replace(
        saved, world_size=world, config_digest=prepared.config_digest, versions=versions(), data_files=files
    )
    mixture = prepared.mixture
    if mixture is not None:
        state.sources = continued_sources(saved, mixture, mixture.describe_files())
        state.mixture_origin = origin_record(mixture.plan.origin, mixture.names)
    return state


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
    """The scheduler state of a fresh engine moved to `saved.step`: the run's schedule (training/schedule.py),
    stepped as many times on a stand-in optimizer, gives the LR an uninterrupted run would use next."""
    import torch

    from dstrain.training.schedule import PlannedSchedule

    sched = dict(fresh, optimizer_step=0, global_steps=saved.step, global_samples=saved.samples)
    spec = ds.get("scheduler")
    if not spec or fresh.get("scheduler") is None:
        return sched
    stand_in = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in fresh["param_group_lr"]]
    )
    scheduler = PlannedSchedule(stand_in, spec, start=False)
    scheduler.load_state_dict(fresh["scheduler"])
    for _ in range(saved.step):
        scheduler.step()
    sched["scheduler"] = scheduler.state_dict()
    sched["param_group_lr"] = [float(g["lr"]) for g in stand_in.param_groups]
    return sched
