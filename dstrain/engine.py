"""The one module that talks to DeepSpeed's engine API.

Everything else holds the engine as an opaque handle and calls these functions; only the checkpoint state
code (`checkpoint.optim`) reaches further, into the optimizer internals it must gather and scatter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    from dstrain.model.supervised import labelled_positions

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


@contextmanager
def evaluating(engine: DeepSpeedEngine) -> Iterator[None]:
    """Eval mode (dropout off) for the block, back to train mode after it, also when the block raises."""
    engine.eval()
    try:
        yield
    finally:
        engine.train()


def train_mode(engine: DeepSpeedEngine) -> None:
    engine.train()


def step_applied(engine: DeepSpeedEngine) -> bool:
    """Whether the last optimizer step changed the weights (DeepSpeed skips it on a non-finite grad norm)."""
    return bool(engine.was_step_applied())


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
