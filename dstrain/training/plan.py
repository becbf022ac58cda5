"""`dstrain train --dry-run`: what a run would do, worked out the way the run works it out, without doing it.

The config and the ZeRO JSON are resolved for the world size the job will launch with (`--num-gpus`,
`--hostfile`: the sum of its slots, or `--world-size`), the data is indexed and checked (training.prepare, as
every rank does at start-up), the LR comes from DeepSpeed's own scheduler class, and the memory per rank from
model/memory.py on the model built on the meta device (model/meta.py). One process, whatever the world size;
no engine, no process group, no weights, no run dir.

Each section of the report is one field of `DryRun`: a new one is a field, a key in `to_json` and a line in
training/dry_run.py.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain.config.run import RunConfig, config_to_dict
from dstrain.config.zero import zero_stage
from dstrain.errors import DstrainError

if TYPE_CHECKING:
    from dstrain.data.summary import DataSummary
    from dstrain.model.memory import Term
    from dstrain.training.prepare import Prepared


@dataclass(frozen=True)
class Launch:
    """How many ranks the job starts, and what said so."""

    world: int
    how: str  # "--num-gpus 2", "hostfile hostfiles/a100 (2 hosts, 16 slots)", ...
    local_ranks: int  # ranks on one host (this machine's share of its memory, when it runs here)
    here: bool  # the job runs on this machine (capacity can be compared)


@dataclass(frozen=True)
class StepPlan:
    micro: int
    accumulation: int
    data_parallel: int  # ranks reading different micro batches
    sequence_parallel: int
    global_batch: int
    train_samples: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int  # as the scheduler counts them (DeepSpeed's warmup is at least 2 steps)
    decay_steps: int
    lr: dict[int, float]  # step -> the learning rate that step's update uses
    eval_steps: list[int]
    save_steps: list[int]


@dataclass(frozen=True)
class MemoryPlan:
    terms: list[Term]
    totals: dict[str, int]  # per place: "device" (one total on a CPU-only machine) and "host"
    build_peak: int
    cuda: bool  # estimated for a CUDA device (else: everything in host RAM)
    capacity: dict[str, int] | None  # this machine's, per rank, when the job runs here
    over: str | None  # the memory check's message when the estimate exceeds that capacity
    checkpoint_bytes: int  # one checkpoint on disk (checkpoint/sizing.py), at launch.world ranks
    disk_bytes: int  # the most the run keeps in output_dir: keep_last + 1 checkpoints, metrics and plot


@dataclass
class DryRun:
    launch: Launch
    cfg: RunConfig
    ds: dict[str, Any]  # resolved for launch.world
    plan: StepPlan
    data: DataSummary
    memory: MemoryPlan
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        memory = asdict(self.memory)
        return {
            "launch": asdict(self.launch),
            "plan": {**asdict(self.plan), "lr": [{"step": s, "lr": v} for s, v in self.plan.lr.items()]},
            "data": self.data.to_json(),
            "memory": memory,
            "notes": self.notes,
            "config": config_to_dict(self.cfg),
            "ds_config": self.ds,
        }


def launch_world(num_gpus: int | None, hostfile: Path | None, world_size: int | None) -> Launch:
    """The world size `dstrain train` would start with these flags (deepspeed's reading of a hostfile)."""
    if world_size is not None and (num_gpus is not None or hostfile is not None):
        raise DstrainError("--world-size stands for --num-gpus/--hostfile in a dry run: give one of them")
    for flag, value in (("--num-gpus", num_gpus), ("--world-size", world_size)):
        if value is not None and value < 1:
            raise DstrainError(f"{flag} must be at least 1, got {value}")
    if hostfile is not None:
        slots = read_hostfile(hostfile)
        per_host = [min(n, num_gpus) if num_gpus else n for n in slots.values()]
        how = f"hostfile {hostfile} ({len(per_host)} host(s), {sum(per_host)} ranks)"
        return Launch(sum(per_host), how, max(per_host), here=False)
    if num_gpus is not None:
        return Launch(num_gpus, f"--num-gpus {num_gpus}", num_gpus, here=True)
    if world_size is not None:
        return Launch(world_size, f"--world-size {world_size}", world_size, here=False)
    return Launch(1, "one local process: no --num-gpus or --hostfile", 1, here=True)


def read_hostfile(path: Path) -> dict[str, int]:
    """host -> slots, parsed by DeepSpeed's own launcher code."""
    if not path.is_file():
        raise DstrainError(f"--hostfile {path}: no such file")
    from deepspeed.launcher.runner import fetch_hostfile

    try:
        with quiet_deepspeed():  # it logs the bad text before raising; the message below says it once
            pool = fetch_hostfile(str(path))
    except ValueError as exc:
        raise DstrainError(f"--hostfile {path}: {exc} (each line: `HOST slots=N`)") from None
    return dict(pool)


@contextlib.contextmanager
def quiet_deepspeed() -> Any:
    """DeepSpeed's logger below errors, for calls whose warnings say nothing to a planning user."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def lr_at(ds: dict[str, Any], steps: list[int]) -> tuple[dict[int, float], int]:
    """(step -> the LR its update uses, warmup steps), from the schedule the run itself builds
    (training/schedule.py: the JSON's scheduler with update k at iteration k) on a stand-in optimizer."""
    from dstrain.training.schedule import PlannedSchedule, lr_path, stand_in_optimizer

    base_lr = float(ds["optimizer"]["params"]["lr"])
    spec = ds.get("scheduler")
    if not spec:
        return dict.fromkeys(steps, base_lr), 0
    warmup = int(getattr(PlannedSchedule(stand_in_optimizer(base_lr), spec).base, "warmup_num_steps", 0))
    return lr_path(spec, base_lr, steps), warmup


def key_steps(total: int, warmup: int) -> list[int]:
    """Where the schedule turns: the first steps, the end of warmup, the quarters, the last step."""
    marks = {1, 2, warmup, warmup + 1, total // 4, total // 2, 3 * total // 4, total}
    return sorted(s for s in marks if 1 <= s <= total)


def scheduled(every: int, total: int) -> list[int]:
    """The steps training.loop.due picks: every `every` steps, and the last."""
    return sorted({*range(every, total + 1, every), total} if every > 0 else {total})


def step_plan(prepared: Prepared) -> StepPlan:
    cfg, plan, total = prepared.cfg, prepared.plan, prepared.total_steps
    _, warmup = lr_at(prepared.ds, [])
    lr, _ = lr_at(prepared.ds, key_steps(total, warmup))
    scheduler = (prepared.ds.get("scheduler") or {}).get("type", "")
    decays = "Decay" in scheduler or "Cosine" in scheduler
    evals = ([0] if cfg.train.eval_every else []) + scheduled(cfg.train.eval_every, total)
    return StepPlan(
        micro=plan.micro,
        accumulation=plan.accumulation,
        data_parallel=plan.world,
        sequence_parallel=plan.sequence,
        global_batch=plan.global_batch,
        train_samples=len(prepared.train),
        steps_per_epoch=prepared.steps_per_epoch,
        total_steps=total,
        epochs=round(total / prepared.steps_per_epoch, 3),
        warmup_steps=min(warmup, total),
        decay_steps=max(0, total - warmup) if decays else 0,
        lr=lr,
        eval_steps=evals if prepared.eval else [],
        save_steps=scheduled(cfg.train.save_every, total),
    )


def memory_plan(prepared: Prepared, launch: Launch) -> MemoryPlan:
    """memory.check's numbers for the model the run would build (model/meta.py), at `launch.world` ranks."""
    from dstrain.checkpoint import sizing
    from dstrain.model import memory
    from dstrain.model.meta import meta_model, planned_shape

    cfg = prepared.cfg
    peft_model = meta_model(cfg.model, cfg.lora)
    shape, attention = planned_shape(cfg.model, cfg.lora, zero_stage(prepared.ds), peft_model)
    setup = memory.setup_from(cfg, prepared.ds, prepared.plan.micro, launch.world, attention)
    terms = memory.estimate(shape, setup)
    capacity = over = None
    if launch.here:
        capacity = this_machine(launch.local_ranks, setup.cuda)
        over = memory.overflow_message(terms, capacity, setup.cuda)
    totals = memory.merged_totals(terms, setup.cuda)
    peak = memory.build_peak_bytes(shape, setup)
    train = cfg.train
    one = sizing.checkpoint_bytes(
        sizing.trainable_shapes(peft_model), launch.world, data_files=len(prepared.train.corpus.files)
    )
    rows = sizing.logged_rows(prepared.total_steps, train.log_every, train.eval_every, bool(prepared.eval))
    disk = sizing.run_bytes(one, train.keep_last, rows)
    return MemoryPlan(terms, totals, peak, setup.cuda, capacity, over, one, disk)


def this_machine(local_ranks: int, cuda: bool) -> dict[str, int]:
    """Bytes per rank here: available host RAM shared by the local ranks, and the GPU's memory."""
    import psutil
    import torch

    host = psutil.virtual_memory().available // local_ranks
    if not cuda:
        return {"device": host, "host": host}
    return {"device": int(torch.cuda.get_device_properties(0).total_memory), "host": host}


def precision_note(ds: dict[str, Any]) -> str | None:
    """The dry run resolves precision as if the job's accelerator had it; say so when this one has not."""
    from dstrain.training.prepare import device_precision

    bf16_ok, fp16_ok = device_precision()
    for key, ok in (("bf16", bf16_ok), ("fp16", fp16_ok)):
        if (ds.get(key) or {}).get("enabled") and not ok:
            return f"this machine's accelerator has no {key} training support: the job must run where it has"
    return None


def build_report(cfg: RunConfig, launch: Launch) -> DryRun:
    from dstrain.data.summary import summarize
    from dstrain.training.prepare import prepare

    prepared = prepare(cfg, launch.world, planning=True)
    plan = step_plan(prepared)
    data = summarize(prepared.train, sum(len(s.examples) for s in prepared.eval))
    memory = memory_plan(prepared, launch)
    notes = [note] if (note := precision_note(prepared.ds)) else []
    if memory.over:
        notes.append(f"on this machine: {memory.over}")
    return DryRun(launch, cfg, prepared.ds, plan, data, memory, notes)
