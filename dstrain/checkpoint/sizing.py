"""How many bytes a checkpoint takes, known before one is written: from the trainable parameters' names and
shapes and the world size alone (no engine, no process group, no weights).

What a checkpoint holds (`dstrain.checkpoint.save`) and how each part is sized here:
  adapter_model.safetensors    the fp32 master of every trainable tensor (fp32 whatever model.dtype: the
                               masters are what is saved)                                      exact
  optimizer.safetensors        per trainable tensor its fp32 master and Adam's two moments     exact
  rng_state_NNNNN.safetensors  one per rank: python, numpy, torch CPU (and CUDA) generators    measured in
                               this process (15,408 bytes on CPU with torch 2.13)
  trainer_state.json, scheduler.json, adapter_config.json, config.yaml, ds_config.json,
  ds_config.source.json, manifest.json                                                         estimated
The safetensors files are computed to the byte (8 bytes of length, the JSON header of names, dtypes, shapes
and offsets padded to 8 bytes, then the data); the small text files are estimated within about 1 KiB, which
is the whole error: tests/unit/checkpoint/test_sizing.py checks the estimate against real checkpoints.

Use `checkpoint_size(trainable_shapes(model), world_size)` with a model built on the meta device, or with
the shapes read from a checkpoint's own optimizer file (`shapes_in_checkpoint`, what `dstrain inspect` does).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.checkpoint.state import ADAPTER_WEIGHTS, OPTIMIZER

if TYPE_CHECKING:
    import torch

# The optimizer file's keys per trainable tensor, as dstrain.checkpoint.optim writes them ("{name}::{key}";
# a unit test keeps the two in step). Imported from there they would pull DeepSpeed into `dstrain inspect`.
MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
FLOAT32_BYTES = 4
ADAPTER_NAME = "default"  # PEFT's adapter name: in the parameter names, not in the adapter file's keys
# trainer_state.json (~500 B + ~200 B per training file), scheduler.json (~300 B), adapter_config.json (~1.6
# KiB): measured on dstrain 0.2 checkpoints of 1 and 2 ranks.
FIXED_TEXT_BYTES = 2400
DATA_FILE_RECORD_BYTES = 200
CONFIG_TEXT_BYTES = 3500  # config.yaml + ds_config.json + ds_config.source.json when their sizes are unknown
MANIFEST_ENTRY_BYTES = 110  # '"name": {"sha256": "<64 hex>", "size": N}' with the indentation, plus the name
# Per logged row: metrics.jsonl (~300 B) and TensorBoard (~600 B): 7.6 KiB for 9 rows of the tiny demo.
METRICS_ROW_BYTES = 1024
PLOT_BYTES = 64 * 1024  # loss.png (48 KiB measured) and the rank logs' few lines


@dataclass(frozen=True)
class CheckpointSize:
    adapter: int
    optimizer: int
    rng: int  # every rank's file together
    text: int  # the JSON/YAML files and the manifest

    @property
    def total(self) -> int:
        return self.adapter + self.optimizer + self.rng + self.text


def safetensors_bytes(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str], itemsize: int) -> int:
    """The size of a safetensors file of these tensors (one dtype), to the byte, as safetensors writes it."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(shapes):  # safetensors orders tensors of one dtype by name
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text.encode()) / 8) * 8 + offset


def adapter_key(name: str) -> str:
    """`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`: PEFT's key in the adapter file."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


@functools.cache
def measured_rng_bytes() -> int:
    """One rank's RNG file, serialised from this process's generators (as a checkpoint save does)."""
    from safetensors.torch import save

    from dstrain.checkpoint.rng import capture_rng

    tensors, meta = capture_rng()
    return len(save(tensors, metadata=meta))


def checkpoint_size(
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
    config_bytes: int | None = None,
    data_files: int = 1,
    rng_bytes: int | None = None,
) -> CheckpointSize:
    """The bytes of one checkpoint, per part.

    shapes: trainable parameter name -> shape, names as the PEFT model's `named_parameters()` gives them
      (`trainable_shapes`); the names matter only for the safetensors headers (~100 B per tensor).
    world_size: one RNG file per rank.
    config_bytes: config.yaml + ds_config.json + ds_config.source.json when known (estimated otherwise).
    data_files: training files recorded in the trainer state.
    rng_bytes: one rank's RNG file; measured in this process when not given.
    """
    opt_meta = {"format": "dstrain-optimizer/1"}
    moments = {f"{n}::{key}": s for n, s in shapes.items() for key in (MASTER, *MOMENTS)}
    adapter = safetensors_bytes(
        {adapter_key(n): s for n, s in shapes.items()}, {"format": "pt"}, FLOAT32_BYTES
    )
    optimizer = safetensors_bytes(moments, opt_meta, FLOAT32_BYTES)
    rng = (measured_rng_bytes() if rng_bytes is None else rng_bytes) * world_size
    names = [ADAPTER_WEIGHTS, OPTIMIZER, *(f"rng_state_{r:05d}.safetensors" for r in range(world_size))]
    names += ["adapter_config.json", "scheduler.json", "trainer_state.json", "config.yaml", "ds_config.json"]
    names += ["ds_config.source.json"]
    manifest = 110 + sum(MANIFEST_ENTRY_BYTES + len(name) for name in names)
    config = CONFIG_TEXT_BYTES if config_bytes is None else config_bytes
    text = FIXED_TEXT_BYTES + DATA_FILE_RECORD_BYTES * data_files + config + manifest
    return CheckpointSize(adapter, optimizer, rng, text)


def checkpoint_bytes(shapes: Mapping[str, Sequence[int]], world_size: int, **known: int | None) -> int:
    """The total of `checkpoint_size` (same arguments)."""
    return checkpoint_size(shapes, world_size, **known).total  # type: ignore[arg-type]


def trainable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every trainable parameter: on the meta device, or partitioned by ZeRO-3
    (whose parameters are empty placeholders that keep their full shape in `ds_shape`)."""
    return {
        name: tuple(getattr(param, "ds_shape", param.shape))
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def shapes_in_checkpoint(ckpt: Path) -> dict[str, tuple[int, ...]] | None:
    """The trainable shapes a checkpoint was written from, read from its optimizer file's header (no torch);
    None when that file is no safetensors file (`dstrain inspect`'s verify names it)."""
    path = Path(ckpt) / OPTIMIZER
    try:
        with path.open("rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length > path.stat().st_size:
                return None
            header = json.loads(fh.read(length))
        suffix = f"::{MASTER}"
        return {k[: -len(suffix)]: tuple(v["shape"]) for k, v in header.items() if k.endswith(suffix)}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return None


def logged_rows(total_steps: int, log_every: int, eval_every: int, has_eval: bool) -> int:
    """Rows metrics.jsonl and TensorBoard get over a run, at most: a train row every log_every steps and at
    the last step; eval rows at step 0, every eval_every steps and at the last step."""
    evals = (total_steps // eval_every + 2 if eval_every else 1) if has_eval else 0
    return total_steps // max(1, log_every) + 1 + evals


def run_bytes(checkpoint: int, keep_last: int, rows: int, existing: int = 0) -> int:
    """What a run still adds to its output filesystem at its fullest: keep_last + 1 checkpoints (the newest is
    written before the oldest is pruned) less the `existing` ones, plus its metrics and plot."""
    return max(0, keep_last + 1 - existing) * checkpoint + rows * METRICS_ROW_BYTES + PLOT_BYTES
