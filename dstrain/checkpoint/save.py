"""Write a checkpoint from a running engine: gather on every rank, write on rank 0, agree on the outcome."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import save_file

from dstrain import distributed, engine
from dstrain.checkpoint import layout
from dstrain.checkpoint.atomic import atomic_dir
from dstrain.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"


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
    best_metric: float | None = None
    best_checkpoint: str | None = None
    config_digest: str = ""
    versions: dict[str, str] | None = None


def write_checkpoint_dir(
    tmp: Path, adapter: dict, peft_model: PeftModel, state: TrainerState, config_yaml: str, ds: dict[str, Any]
) -> None:
    save_file(
        {k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"}
    )
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    (tmp / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    # The manifest is written last: its presence marks the directory as complete.
    (tmp / layout.MANIFEST).write_text(json.dumps(layout.build_manifest(tmp), indent=2) + "\n")


def save_checkpoint(
    output_dir: Path,
    peft_model: PeftModel,
    state: TrainerState,
    config_yaml: str,
    ds: dict[str, Any],
    keep_last: int,
    is_main: bool,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint dir once every rank agrees it is written."""
    root = layout.checkpoints_dir(output_dir)
    final = root / layout.step_name(state.step)
    adapter = engine.gather_adapter(peft_model)  # collective under ZeRO-3: before any rank-0-only branch
    with distributed.agreed(f"saving checkpoint {final}"):
        if is_main:
            try:
                _write(root, final, adapter, peft_model, state, config_yaml, ds, keep_last)
            except OSError as exc:
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
    adapter: dict,
    peft_model: PeftModel,
    state: TrainerState,
    config_yaml: str,
    ds: dict[str, Any],
    keep_last: int,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    layout.remove_stale_temp(root)
    with atomic_dir(final) as tmp:
        write_checkpoint_dir(tmp, adapter, peft_model, state, config_yaml, ds)
    layout.write_latest(root, final.name)
    protect = {final.name} | ({state.best_checkpoint} if state.best_checkpoint else set())
    layout.prune(root, keep_last, protect)
