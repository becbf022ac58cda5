"""Write a checkpoint from a running engine: gather on every rank, write on rank 0, agree on the outcome.

checkpoints/step-00000120/
  adapter_model.safetensors, adapter_config.json   what `PeftModel.from_pretrained(base, dir)` loads
  optimizer.safetensors                            fp32 master weights + Adam moments, full (unpartitioned)
  scheduler.json                                   optimizer step, engine counters, LR scheduler, group LRs
  rng_state_00000.safetensors ...                  one per rank: python, numpy, torch generator states
  trainer_state.json                               step, epoch, data cursor, tokens, best metric, versions
  config.yaml, ds_config.json, ds_config.source.json   the run config and ZeRO JSON (resolved and as given)
  manifest.json                                    written last: format, dstrain version, size and sha256
                                                   of every other file
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from peft import PeftModel
from safetensors.torch import save, save_file

from dstrain import engine, storage
from dstrain.checkpoint import layout, optim
from dstrain.checkpoint.atomic import atomic_dir
from dstrain.checkpoint.rng import capture_rng
from dstrain.checkpoint.state import (
    ADAPTER_WEIGHTS,
    CONFIG,
    DS_CONFIG,
    DS_SOURCE,
    OPTIMIZER,
    SCHEDULER,
    TRAINER_STATE,
    TrainerState,
    rng_file,
)
from dstrain.distributed import collectives
from dstrain.errors import CheckpointError
from dstrain.model import variants


@dataclass
class RunFiles:
    """The run's config texts, stored in every checkpoint so `dstrain resume` needs nothing else."""

    config_yaml: str
    ds: dict[str, Any]
    ds_source: dict[str, Any]


@dataclass
class Payload:
    """Everything gathered from the ranks for one checkpoint (full tensors, rank 0 writes them)."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    scheduler: dict[str, Any]
    rng: list[bytes]


def gather_payload(ds_engine: DeepSpeedEngine, peft_model: PeftModel) -> Payload:
    """A collective under ZeRO: every rank calls it, before any rank-0-only branch."""
    tensors, meta = capture_rng()
    state = optim.gather_optimizer_state(ds_engine, peft_model)
    masters = {name: state[f"{name}::{optim.MASTER}"] for name, _ in optim.trainable(peft_model)}
    adapter = engine.adapter_state(peft_model, masters)
    return Payload(
        # PiSSA/OLoRA: as a plain LoRA of the original base (model/variants.py)
        adapter=variants.plain_lora_state(adapter, variants.initial_adapter(peft_model)),
        optimizer=state,
        scheduler=optim.scheduler_state(ds_engine),
        rng=collectives.all_gather_bytes(save(tensors, metadata=meta)),
    )


def payload_bytes(payload: Payload, run: RunFiles) -> int:
    """What the checkpoint's files take: the tensors exactly, the JSON/YAML files about (for messages)."""
    tensors = [*payload.adapter.values(), *payload.optimizer.values()]
    texts = len(run.config_yaml) + 2 * len(json.dumps(run.ds, indent=2)) + 8 * 1024
    return sum(t.numel() * t.element_size() for t in tensors) + sum(map(len, payload.rng)) + texts


def write_json(path: Path, value: Any) -> None:
    try:
        text = json.dumps(value, indent=2, allow_nan=True)
    except TypeError as exc:
        raise CheckpointError(f"{path.name}: state is not JSON-serialisable ({exc})") from exc
    path.write_text(text + "\n", encoding="utf-8")


def write_checkpoint_dir(
    tmp: Path, payload: Payload, peft_model: PeftModel, state: TrainerState, run: RunFiles
) -> None:
    contiguous = {k: v.contiguous() for k, v in payload.adapter.items()}
    save_file(contiguous, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    if variants.initial_adapter(peft_model) is not None:  # PiSSA/OLoRA: the config of the converted adapter
        config = tmp / "adapter_config.json"
        write_json(config, variants.plain_lora_config(json.loads(config.read_text(encoding="utf-8"))))
    save_file(payload.optimizer, str(tmp / OPTIMIZER), metadata={"format": "dstrain-optimizer/1"})
    write_json(tmp / SCHEDULER, payload.scheduler)
    for rank, blob in enumerate(payload.rng):
        (tmp / rng_file(rank)).write_bytes(blob)
    write_json(tmp / TRAINER_STATE, asdict(state))
    (tmp / CONFIG).write_text(run.config_yaml, encoding="utf-8")
    write_json(tmp / DS_CONFIG, run.ds)
    write_json(tmp / DS_SOURCE, run.ds_source)
    # The manifest is written last: its presence marks the directory as complete.
    write_json(tmp / layout.MANIFEST, layout.build_manifest(tmp))


def save_checkpoint(
    output_dir: Path,
    ds_engine: DeepSpeedEngine,
    peft_model: PeftModel,
    state: TrainerState,
    run: RunFiles,
    keep_last: int,
    is_main: bool,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint dir once every rank agrees it is written."""
    root = layout.checkpoints_dir(output_dir)
    final = root / layout.step_name(state.step)
    payload = gather_payload(ds_engine, peft_model)  # no I/O: nothing here fails on one rank alone
    if state.best_step == state.step:
        state.best_checkpoint = final.name
    with collectives.agreed(f"saving checkpoint {final}"):
        if is_main:
            try:
                # a full disk or a permission: one message with the bytes needed and free (dstrain.storage)
                place = storage.run_place(output_dir)
                with storage.guard(place, "checkpoint", final, payload_bytes(payload, run)):
                    _write(root, final, payload, peft_model, state, run, keep_last)
            except OSError as exc:  # anything else, e.g. a file where checkpoints/ should be
                previous = layout.read_latest(root) or "none"
                raise CheckpointError(
                    f"could not write checkpoint {final}: {exc.strerror or exc} ({exc.filename or root}). "
                    f"The previous checkpoint ({previous}) is untouched; free disk space or fix permissions "
                    "of output_dir, then `dstrain resume`."
                ) from exc
    return final


def _write(
    root: Path,
    final: Path,
    payload: Payload,
    peft_model: PeftModel,
    state: TrainerState,
    run: RunFiles,
    keep_last: int,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    layout.remove_stale_temp(root)
    with atomic_dir(final) as tmp:
        write_checkpoint_dir(tmp, payload, peft_model, state, run)
    layout.write_latest(root, final.name)
    protect = {final.name} | ({state.best_checkpoint} if state.best_checkpoint else set())
    layout.prune(root, keep_last, protect)
