"""The one module that talks to DeepSpeed's engine API."""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn


def create_engine(module: nn.Module, ds_config: dict[str, Any]) -> DeepSpeedEngine:
    """deepspeed.initialize over the trainable (LoRA) parameters; optimizer and schedule come from the JSON."""
    import deepspeed

    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=ds_config)
    return engine


def forward(engine: DeepSpeedEngine, batch: dict[str, Any], **flags: bool) -> tuple[torch.Tensor, ...]:
    """The wrapped module's forward on `batch` (tensors moved to the engine's device) and `flags`.

    The labelled positions are found here, on the host, so the device never reports their number.
    """
    from dstrain.supervised import labelled_positions

    if "labels" in batch and "label_index" not in batch:
        batch = {**batch, "label_index": labelled_positions(batch["labels"])}
    device = engine.device
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return engine(**moved, **flags)


def backward(engine: DeepSpeedEngine, loss: torch.Tensor) -> None:
    engine.backward(loss)


def step(engine: DeepSpeedEngine) -> None:
    """Optimizer step at the accumulation boundary, gradient accumulation otherwise (DeepSpeed decides)."""
    engine.step()


def current_lr(engine: DeepSpeedEngine) -> float:
    lrs = engine.get_lr()
    return float(lrs[0]) if lrs else 0.0


def grad_norm(engine: DeepSpeedEngine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def full_fp32_param(param: nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of a trainable parameter. A collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is None:  # no ZeRO optimizer holds a master copy (stage 0): the module weight is the value
        value = param.detach()
    return value.detach().float().cpu().clone()


def adapter_state(peft_model: PeftModel, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's adapter file names and layout for full trainable tensors keyed by parameter name.

    `full` must be gathered from the ZeRO partitions on every rank first (checkpoint.optim does it), which
    is what keeps ZeRO-3 from saving empty or [0]-shaped adapters.
    """
    return get_peft_model_state_dict(peft_model, state_dict=full)
