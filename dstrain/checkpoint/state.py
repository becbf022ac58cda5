"""Checkpoint file names and the trainer state (light: no torch or DeepSpeed import, for `dstrain inspect`)."""

from __future__ import annotations

from dataclasses import dataclass, field

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
DS_SOURCE = "ds_config.source.json"


# What a format-1 checkpoint holds (dstrain before the optimizer state: warm start, inspect, export).
REQUIRED_V1 = (ADAPTER_WEIGHTS, "adapter_config.json", TRAINER_STATE, CONFIG, DS_CONFIG)
# What a resumable checkpoint must hold besides the per-rank RNG files (checked on top of the manifest).
REQUIRED = (*REQUIRED_V1, OPTIMIZER, SCHEDULER, DS_SOURCE)


def rng_file(rank: int) -> str:
    return f"rng_state_{rank:05d}.safetensors"


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    tokens: int = 0
    world_size: int = 1
    global_batch: int = 0
    # Global data position: the next global batch starts at sample `cursor` of epoch `epoch`'s order.
    cursor: int = 0
    train_samples: int = 0  # usable training samples; a resume on changed data would see another order
    nonfinite_steps: int = 0  # optimizer steps skipped because the loss or a gradient was NaN/inf
    # Training records found bad at tokenisation and skipped (data.on_error=skip): their corpus indices, each
    # once however many epochs drew it, and how many times one was drawn and skipped. Absent before 0.2.0
    # (a resumed older run starts counting them afresh).
    bad_records: list[int] = field(default_factory=list)
    skipped_reads: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    config_digest: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # Per training file: path, size, mtime, fingerprint (dstrain.data.provenance); empty before 0.2.0.
    data_files: list[dict] = field(default_factory=list)
    # The run's data snapshot (dstrain.data.snapshot.record): mode and per file source, path, fingerprint;
    # empty without one (data.snapshot: off, and every checkpoint before 0.2.0).
    data_snapshot: dict = field(default_factory=dict)
    # A mixture (data.train as weighted sources), per source in data.train order: name, weight, format,
    # records, max_samples, epochs (its limit), samples (records it has given), epoch and cursor of its next
    # record, tokens trained on, and its files (provenance). Empty for a plain list of paths.
    sources: list[dict] = field(default_factory=list)
    # Where the mixture's plan starts: {"step": S, "drawn": {name: records given before S}}; empty: step 0.
    # A resume that changes the sources or weights (--set data.train=...) starts a new plan at its step.
    mixture_origin: dict = field(default_factory=dict)
