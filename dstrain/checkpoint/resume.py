"""`dstrain resume`: the run config comes from the checkpoint's snapshot; only non-structural keys may change.

Structural keys decide what the saved state means (model, adapter shape, data order, global batch, seeds,
objective); changing one would make "exact resume" a lie, so it is refused with the list of what may change.
The world size may change: the global batch is pinned to the saved one and accumulation is re-planned.
A format-1 checkpoint (adapter only, before dstrain saved optimizer state) continues as a warm start: its
weights, step and data position, with Adam's moments starting from zero (`training.restore`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dstrain.checkpoint import load
from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import RunConfig, apply_overrides, config_from_dict
from dstrain.data.snapshot import redirect
from dstrain.errors import ConfigError, DataError

# Keys `--set` may change on resume, each a whole dotted key (a section name allows nothing). Every other key
# is structural. tests/unit/config/test_config.py checks that each one names a field of RunConfig.
MUTABLE = (
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.max_nonfinite_steps",
    "train.resume_schedule",  # what a changed length does to the LR schedule (said at start-up)
    "train.wandb_project",
    "train.mlflow.tracking_uri",  # where the metrics go, not what is trained
    "train.mlflow.experiment",
    "train.mlflow.run_name",
    "data.snapshot",  # a snapshot taken at a resume holds the files the checkpoint was verified against
    "train.eval_generate",
    "train.eval_max_new_tokens",
    "data.eval",
    # a mixture's weights and epochs limits, sources added or dropped: a new plan from each source's position
    # (checkpoint/mixture_resume.py, said at start-up); what a kept source reads, and a plain list's files,
    # are checked unchanged
    "data.train",
    "data.num_workers",
    # the same samples per step with any N (the global batch counts samples); the checkpoint is gathered
    "train.sequence_parallel_size",
    "data.packing",  # packing re-lays out the same micro batches: same samples, same loss
    "data.share_prompt",  # so does sharing a pair's prompt
    "data.prefetch",
    "model.logits_chunk_tokens",  # the same loss, computed in pieces
    "train.memory_check",
    "data.on_error",
    "data.max_bad_fraction",
    "data.max_eval_samples",
    "output_dir",
    "distributed.rendezvous_timeout_s",  # how long to wait for ranks is about the cluster, not the run
    "distributed.collective_timeout_s",
    "distributed.heartbeat_timeout_s",
)


@dataclass
class ResumePoint:
    ckpt: Path
    state: TrainerState
    ds_source: dict[str, Any]
    notes: list[str]
    format: int = 2  # the checkpoint's format: 1 holds no optimizer state (warm start)
    optimizer: str | None = None  # the Adam implementation the run used (dstrain.engine); None: choose anew
    planned_steps: int = 0  # the run's length before this resume's overrides (0: unknown)
    schedule_note: str = ""  # what the resume does with the LR schedule (training.restore), said at start-up

    @property
    def warm_start(self) -> bool:
        return self.format == 1


WARM_START_NOTE = (
    "{ckpt} is a format-1 checkpoint (written before dstrain saved optimizer state): warm start from its "
    "adapter weights at step {step}; Adam's moments start from zero, so the losses will not match an "
    "uninterrupted run"
)


def override_key(item: str) -> str:
    """The key of a `--set KEY=VALUE` item."""
    return item.partition("=")[0].strip()


def mutable_on_resume(item: str) -> bool:
    """Whether the `--set KEY=VALUE` item may change on resume."""
    return override_key(item) in MUTABLE


def check_overrides(overrides: list[str]) -> None:
    bad = [override_key(item) for item in overrides if not mutable_on_resume(item)]
    if bad:
        raise ConfigError(
            [
                f"--set {key}: fixed by the checkpoint, cannot change on resume (keys that may change: "
                f"{', '.join(MUTABLE)}); to change it, start a new run with `dstrain train`"
                for key in bad
            ],
            source="resume overrides",
        )


def resume_config(path: Path, overrides: list[str]) -> tuple[RunConfig, ResumePoint]:
    """The run config to continue with and the verified checkpoint to continue from."""
    check_overrides(overrides)
    found = load.find_checkpoint(path)
    ckpt = found.path
    state = load.read_trainer_state(ckpt)
    try:
        raw = yaml.safe_load(load.read_config_yaml(ckpt)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{ckpt}/config.yaml: not valid YAML ({exc})"]) from None
    # The run continues where its checkpoint lives, also when the run dir was moved or copied.
    forked = any(override_key(item) == "output_dir" for item in overrides)
    if ckpt.parent.name != "checkpoints" and not forked:
        raise ConfigError(
            [
                f"{ckpt} is not inside a run's checkpoints/ dir: pass --set output_dir=DIR for the continued run"
            ],
            source="resume",
        )
    raw["output_dir"] = str(ckpt.parent.parent)
    keep_written_behaviour(raw)
    snapshot = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    # Elastic resume keeps the global batch: pin it, so a new world size changes only the accumulation.
    raw.setdefault("train", {})["global_batch_size"] = state.global_batch
    cfg = config_from_dict(raw, source=f"{ckpt}/config.yaml")
    resolved = load.read_ds_resolved(ckpt)
    given = resolved if found.format == 1 else load.read_ds_source(ckpt)  # /1 kept the resolved JSON only
    notes = list(found.notes)
    # data changed since the run began: its snapshot (if it has one) is read instead, said in one line
    cfg, snapshot_note = redirect(cfg, state, ckpt.parent.parent, "data.eval" in map(override_key, overrides))
    notes += [snapshot_note] if snapshot_note else []
    if found.format == 1:
        notes.append(WARM_START_NOTE.format(ckpt=ckpt, step=state.step))
        if any(override_key(item) in ("train.max_steps", "train.epochs") for item in overrides):
            # Format 1 kept only the resolved ZeRO JSON: its scheduler's step counts are numbers, not "auto".
            notes.append(
                f"{ckpt} (format 1) keeps the LR schedule it was written with (ds_config.json in the checkpoint); "
                "a new train.max_steps/epochs does not stretch it"
            )
    optimizer = None if found.format == 1 else recorded_optimizer(ckpt)
    ds_source = elastic_ds_source(given, resolved)
    point = ResumePoint(
        ckpt, state, ds_source, notes, found.format, optimizer, planned_length(snapshot, state)
    )
    return cfg, point


def planned_length(snapshot: dict[str, Any], state: TrainerState) -> int:
    """The run's length in steps as its checkpoint's config planned it (max_steps, else epochs of the
    usable samples it recorded); 0 where the snapshot cannot tell."""
    train = snapshot.get("train") or {}
    if train.get("max_steps"):
        return int(train["max_steps"])
    per_epoch = state.train_samples // state.global_batch if state.global_batch else 0
    return int(train.get("epochs") or 0) * per_epoch


def recorded_optimizer(ckpt: Path) -> str:
    """The Adam implementation the checkpoint's run used: the same one continues its losses bitwise.
    Checkpoints from before dstrain recorded it ran DeepSpeed's optimizer."""
    from dstrain.checkpoint.optim import OPTIMIZER_KEY
    from dstrain.checkpoint.state import SCHEDULER
    from dstrain.engine import DEEPSPEED

    return str(load.read_json(ckpt / SCHEDULER).get(OPTIMIZER_KEY, DEEPSPEED))


def keep_written_behaviour(raw: dict[str, Any]) -> None:
    """Keys added or changed since a snapshot was written keep the behaviour it was written with, so its run
    resumes exactly (a fresh config gets today's defaults). Without `version:` it was written by dstrain
    0.1.0, which read text as it was."""
    if not isinstance(raw.get("data", {}), dict):
        return
    if "version" not in raw:
        raw.setdefault("data", {}).setdefault("clean", False)
    # Before objective.loss_normalization existed, each micro batch's loss was its own mean.
    if isinstance(raw.get("objective", {}), dict):
        raw.setdefault("objective", {}).setdefault("loss_normalization", "micro_batch")
    # Every snapshot names every key; one without group_by_length predates it, when records ran in
    # shuffled order (the default became true later): its data order, and so its losses, stay as they were.
    raw.setdefault("data", {}).setdefault("group_by_length", False)


def elastic_ds_source(ds_source: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO JSON as first given, with the micro batch the run used and accumulation left to the planner
    (the global batch is pinned): a new world size changes only the accumulation. The scheduler keeps the
    numbers its "auto" entries were given at the start: a new length re-plans nothing silently
    (train.resume_schedule decides, training.restore says it)."""
    raw = copy.deepcopy(ds_source)
    raw["train_micro_batch_size_per_gpu"] = resolved.get("train_micro_batch_size_per_gpu", "auto")
    raw["gradient_accumulation_steps"] = "auto"
    params = (raw.get("scheduler") or {}).get("params") or {}
    planned = ((resolved.get("scheduler") or {}).get("params")) or {}
    for key, value in params.items():
        if value == "auto" and key in planned:
            params[key] = planned[key]
    return raw


def check_same_data(state: TrainerState, train_samples: int, files: list[dict] | None = None) -> None:
    """Refuse to continue on other data: the saved position would point at other samples.

    `files` are the training files' records now (`data.provenance.describe_files`); compared with those in
    the checkpoint (none before 0.2.0), each changed file is named with its old and new fingerprint.
    """
    from dstrain.data.provenance import changed_files

    changes = changed_files(state.data_files, files) if files is not None else []
    count_changed = bool(state.train_samples) and state.train_samples != train_samples
    if not (changes or count_changed):
        return
    what = (
        f"data.train now yields {train_samples} usable samples, but the checkpoint was trained on "
        f"{state.train_samples}"
        if count_changed
        else "data.train changed since the checkpoint"
    )
    detail = "".join(f"; {line}" for line in changes)
    raise DataError(
        f"{what}{detail}: the data changed, so the saved position would point at other samples. "
        "Restore the original files, or start a new run with `dstrain train`."
    )
