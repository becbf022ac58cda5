"""The learning-rate schedule a run follows: the ZeRO JSON's scheduler, as DeepSpeed defines it, run so that
no update trains at an LR the plan did not mean and the LR dstrain logs is the one each update used.

What differs from handing the JSON's "scheduler" block to DeepSpeed:
- DeepSpeed's schedulers start "before iteration 0" and the engine steps them after each update, so update
  1 uses `warmup_min_lr` and update 2 iteration 0's value, `warmup_min_lr` again for a linear warmup: two
  updates at LR 0 with the usual configs (and DeepSpeed warns "Attempting to get learning rate from
  scheduler before it has started"). A `PlannedSchedule` starts at iteration 1: update k uses iteration k,
  so a warmup from `warmup_min_lr` to the peak over W steps reaches the peak at update W, its first update
  already above the minimum, and "auto" `total_num_steps` ends the decay one iteration after the last update
  (config/zero.py), so the last update is above the minimum too.
- The schedule runs on a stand-in optimizer of one group; each real param group gets that value times its
  own initial LR over group 0's (1.0 for plain LoRA, LoRA+'s ratio for the B matrices), so per-group LRs keep
  their ratio through warmup and decay whatever the scheduler type.
- A resume may `stretch` the decay over a changed number of steps (`Stretch`): from the LR the checkpoint
  would use next to the plan's end value, continuous, never re-warming. It is part of the scheduler state
  that checkpoints carry, so a stretched run resumes exactly.

Checkpoints written before this module hold DeepSpeed's own iteration count (update k used iteration k - 2
there); restoring one loads that count and the saved group LRs, so such a run continues its own schedule,
bitwise. torch schedulers named in the JSON (which DeepSpeed allows) run as torch defines them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Decay shape of each DeepSpeed scheduler type a stretch can continue; WarmupLR is constant after warmup.
DECAY_SHAPES = {"WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
CONSTANT_AFTER_WARMUP = ("WarmupLR",)
UNSTARTED_WARNING = "before it has started"
FIRST_ITERATION = 1  # the iteration of update 1 (module docstring)


@dataclass(frozen=True)
class Stretch:
    """From iteration `anchor` on, the LR goes from `anchor_lr` to `end_lr` over `span` iterations in the
    plan's own decay `shape` (values of group 0; the other groups scale with it)."""

    anchor: int
    anchor_lr: float
    end_lr: float
    span: int
    shape: str  # linear | cosine

    def lr(self, iteration: int) -> float:
        progress = min(1.0, max(0.0, (iteration - self.anchor) / max(1, self.span)))
        fall = 1.0 - progress if self.shape == "linear" else (1.0 + math.cos(math.pi * progress)) / 2.0
        return self.end_lr + (self.anchor_lr - self.end_lr) * fall


class _QuietUnstarted(logging.Filter):
    """Drops DeepSpeed's "Attempting to get learning rate from scheduler before it has started"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return UNSTARTED_WARNING not in record.getMessage()


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    from deepspeed.utils import logger

    quiet = _QuietUnstarted()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def scheduler_class(name: str) -> Any:
    """The class a ZeRO JSON's scheduler "type" names: DeepSpeed's own, else torch's (as DeepSpeed allows)."""
    from deepspeed.runtime import lr_schedules

    if hasattr(lr_schedules, name):
        return getattr(lr_schedules, name)
    return getattr(torch.optim.lr_scheduler, name)


def stand_in_optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


class PlannedSchedule:
    """What DeepSpeed's engine steps after each applied update (see the module docstring)."""

    def __init__(self, optimizer: Any, spec: dict[str, Any], start: bool = True) -> None:
        from deepspeed.runtime.lr_schedules import get_torch_optimizer

        self.optimizer = get_torch_optimizer(optimizer)
        self.spec = spec
        first = float(self.optimizer.param_groups[0]["lr"])
        self.scales = [float(g["lr"]) / first if first else 1.0 for g in self.optimizer.param_groups]
        self.stand_in = stand_in_optimizer(first)
        with quiet_deepspeed():
            self.base = scheduler_class(spec["type"])(self.stand_in, **spec.get("params", {}))
        self.stretch: Stretch | None = None
        deepspeeds = hasattr(self.base, "last_batch_iteration")  # DeepSpeed's begin at -1; torch's at 0
        while start and deepspeeds and self.iteration < FIRST_ITERATION:
            self.step()
        self._apply()

    @property
    def iteration(self) -> int:
        """The iteration whose LR the next update uses."""
        base = self.base
        return int(base.last_batch_iteration if hasattr(base, "last_batch_iteration") else base.last_epoch)

    def value(self) -> float:
        """Group 0's LR for the next update."""
        if self.stretch is not None and self.iteration >= self.stretch.anchor:
            return self.stretch.lr(self.iteration)
        return float(self.stand_in.param_groups[0]["lr"])

    def _apply(self) -> None:
        value = self.value()
        for group, scale in zip(self.optimizer.param_groups, self.scales, strict=True):
            lr = value * scale
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        with quiet_deepspeed():
            self.base.step()
        self._apply()

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.base.state_dict())
        state["stretch"] = asdict(self.stretch) if self.stretch is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's scheduler state; one written before dstrain planned schedules holds DeepSpeed's
        count only (no "stretch"), which is loaded as it was. The real groups' LRs are restored by the
        caller (checkpoint.optim); the stand-in's is recomputed here, so `value()` is the loaded iteration's."""
        self.base.load_state_dict({k: v for k, v in state.items() if k != "stretch"})
        stretch = state.get("stretch")
        self.stretch = Stretch(**stretch) if stretch else None
        with quiet_deepspeed():
            if hasattr(self.base, "last_batch_iteration"):
                if self.iteration >= 0:
                    self.base.step(self.iteration)  # DeepSpeed's: sets the iteration and its LR again
            elif getattr(self.base, "_last_lr", None):
                self.stand_in.param_groups[0]["lr"] = float(self.base._last_lr[0])

    def copy(self) -> PlannedSchedule:
        """The same schedule and position on a stand-in optimizer: for looking ahead without touching the run."""
        twin = PlannedSchedule(stand_in_optimizer(self.stand_in.defaults["lr"]), self.spec, start=False)
        twin.load_state_dict(self.state_dict())
        twin._apply()
        return twin

    def preview(self, updates: list[int], done: int = 0) -> dict[int, float]:
        """Group 0's LR at each of `updates` (1-based update numbers), this schedule's next update being
        `done` + 1. The run's own schedule does not move."""
        twin = self.copy()
        found: dict[int, float] = {}
        for update in range(done + 1, max(updates, default=done) + 1):
            if update in updates:
                found[update] = twin.value()
            twin.step()
        return found

    def end_value(self) -> float:
        """Group 0's LR where the plan ends (iteration total_num_steps): what a decay arrives at."""
        total = int(self.spec.get("params", {}).get("total_num_steps", max(self.iteration, 0)))
        return self._base_value_at(total)

    def _base_value_at(self, iteration: int) -> float:
        probe = PlannedSchedule(stand_in_optimizer(self.stand_in.defaults["lr"]), self.spec, start=False)
        with quiet_deepspeed():
            probe.base.step(iteration)
        return float(probe.stand_in.param_groups[0]["lr"])

    def stretch_to(self, remaining: int) -> Stretch | None:
        """Continue the decay over `remaining` more updates, from the next update's LR to the end value,
        without re-warming; None where the scheduler has no decay to continue."""
        shape = DECAY_SHAPES.get(self.spec.get("type", ""))
        if shape is None:
            return None
        warmup = int(getattr(self.base, "warmup_num_steps", 0))
        anchor = max(self.iteration, warmup)  # inside warmup: warm up as planned, then the new decay
        anchor_lr = self.value() if anchor == self.iteration else self._base_value_at(anchor)
        span = remaining - (anchor - self.iteration)
        self.stretch = Stretch(anchor, anchor_lr, self.end_value(), max(1, span), shape)
        self._apply()
        return self.stretch


def schedule_factory(spec: dict[str, Any] | None) -> Callable[[Any], PlannedSchedule] | None:
    """What `deepspeed.initialize(lr_scheduler=...)` calls with the engine's optimizer; None: constant LR."""
    if not spec:
        return None
    return lambda optimizer: PlannedSchedule(optimizer, spec)


def lr_path(spec: dict[str, Any] | None, lr: float, updates: list[int]) -> dict[int, float]:
    """Group 0's LR at each of `updates` (1-based) of a fresh run with the resolved scheduler `spec`."""
    if not spec:
        return dict.fromkeys(updates, lr)
    return PlannedSchedule(stand_in_optimizer(lr), spec).preview(updates)


def apply_on_resume(
    schedule: PlannedSchedule | None, policy: str, done: int, planned: int, total: int
) -> str:
    """Keep or stretch a restored `schedule` for a resume at update `done` of a run planned for `planned`
    steps that now runs to `total`; returns the start-up line that says what happens to the LR."""
    if schedule is None:
        return "LR schedule: constant (the ZeRO JSON names no scheduler)"
    changed = planned and planned != total
    kind = schedule.spec.get("type", "")
    if policy == "auto":
        policy = "stretch" if changed and kind in DECAY_SHAPES else "keep"
    if policy == "stretch" and changed and kind in DECAY_SHAPES:
        schedule.stretch_to(total - done)
        lrs = schedule.preview([done + 1, total], done)
        return (
            f"LR schedule: stretch (length {planned} -> {total} steps): the {DECAY_SHAPES[kind]} decay continues "
            f"from {lrs[done + 1]:.3g} at step {done + 1} to {lrs[total]:.3g} at step {total}, no re-warm "
            "(train.resume_schedule=keep keeps the original plan)"
        )
    return keep_line(schedule, done, planned, total, policy == "stretch")


def keep_line(schedule: PlannedSchedule, done: int, planned: int, total: int, asked_stretch: bool) -> str:
    if done >= total:
        return f"LR schedule: kept (the run is already at step {done} of {total})"
    lrs = schedule.preview([done + 1, total], done)
    head = f"LR schedule: kept, {lrs[done + 1]:.3g} at step {done + 1} and {lrs[total]:.3g} at step {total}"
    if asked_stretch and planned != total:
        kind = schedule.spec.get("type", "")
        return f"{head} (train.resume_schedule=stretch: {kind} has no decay to stretch)"
    if not planned or planned == total:
        return f"{head} (the run's length is unchanged)"
    if total > planned:
        end = (
            schedule.preview([planned + 1], done).get(planned + 1, lrs[total])
            if planned >= done
            else lrs[total]
        )
        return (
            f"{head}: the original plan ends at step {planned}, so steps {max(planned, done) + 1}-{total} train "
            f"at about {end:.3g} (train.resume_schedule=stretch spreads the decay over the new length)"
        )
    return (
        f"{head}: the run stops at step {total}, before the original plan's end at step {planned} "
        "(train.resume_schedule=stretch finishes the decay by then)"
    )
