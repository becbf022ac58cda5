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

# How Adam runs: "torch" = torch.optim.AdamW handed to DeepSpeed as its client optimizer; "deepspeed" = the
# optimizer DeepSpeed builds from the JSON (FusedAdam, or DeepSpeedCPUAdam with offload). A run keeps the one
# it started with across resumes (checkpoint.optim records it): the two agree to fp32 rounding, not bitwise.
TORCH, DEEPSPEED = "torch", "deepspeed"
# JSON optimizer params the torch optimizer reproduces; any other (amsgrad, bias_correction, ...) keeps
# DeepSpeed's own optimizer, which reads them. torch_adam asks DeepSpeed for torch's AdamW: it is this one.
TORCH_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam"}


def choose_optimizer(ds_config: dict[str, Any], recorded: str | None = None) -> str:
    """TORCH where DeepSpeed's own Adam brings nothing (no optimizer offload), DEEPSPEED otherwise.

    DeepSpeed's FusedAdam loads a JIT op: a CPU-feature probe in a subprocess on every start (~2 s) and a
    compile on the first run on a machine (~50 s), for the same update torch's fused/foreach AdamW makes.
    With offload the optimizer steps on the CPU, where DeepSpeedCPUAdam's vectorised kernel pays.
    `recorded`: the implementation a resumed run started with, kept so its losses continue bitwise.
    """
    if recorded in (TORCH, DEEPSPEED):
        return recorded
    spec = ds_config.get("optimizer") or {}
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device", "none") not in (None, "none"):
        return DEEPSPEED
    if str(spec.get("type", "")).lower() not in ("adam", "adamw"):
        return DEEPSPEED
    return TORCH if set(spec.get("params") or {}) <= TORCH_PARAMS else DEEPSPEED


def torch_adamw(ds_config: dict[str, Any]) -> Any:
    """A factory DeepSpeed calls with the trainable parameters once they are on the engine's device.

    DeepSpeed's "Adam" decouples weight decay (AdamW) unless `adam_w_mode` is false: torch's Adam then.
    Fused on CUDA (one kernel for all tensors); foreach elsewhere.
    """
    params = dict(ds_config["optimizer"].get("params") or {})
    decoupled = str(ds_config["optimizer"]["type"]).lower() == "adamw" or params.pop("adam_w_mode", True)
    params.pop("adam_w_mode", None)
    params.pop("torch_adam", None)
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam

    def build(model_parameters: Any) -> torch.optim.Optimizer:
        listed = list(model_parameters)
        tensors = [p for group in listed for p in (group["params"] if isinstance(group, dict) else [group])]
        on_cuda = bool(tensors) and all(p.is_cuda for p in tensors)
        speed = {"fused": True} if on_cuda else {"foreach": True}
        betas = tuple(params.get("betas", (0.9, 0.999)))
        options = {"lr": params.get("lr", 1e-3), "eps": params.get("eps", 1e-8), "betas": betas}
        return kind(listed, weight_decay=params.get("weight_decay", 0.0), **options, **speed)

    return build


def optimizer_op(ds_config: dict[str, Any], implementation: str) -> str | None:
    """The DeepSpeed op the engine's optimizer loads (and on a fresh machine compiles), None for torch's."""
    if implementation == TORCH:
        return None
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device", "none") not in (None, "none"):
        return "cpu_adam"
    spec = ds_config.get("optimizer") or {}
    torch_adam = (spec.get("params") or {}).get("torch_adam", False)
    return "fused_adam" if str(spec.get("type", "")).lower() in ("adam", "adamw") and not torch_adam else None


def create_engine(
    module: nn.Module,
    ds_config: dict[str, Any],
    implementation: str,
    mpu: Any = None,
    param_groups: list[Any] | None = None,
) -> DeepSpeedEngine:
    """deepspeed.initialize over the trainable (LoRA) parameters; with DEEPSPEED the optimizer from the JSON,
    with TORCH the JSON's optimizer block replaced by the client optimizer. The JSON's scheduler runs as a
    `PlannedSchedule` (training/schedule.py: update k uses iteration k, per-group LR ratios kept).
    `mpu`: the sequence-parallel groups (distributed/sequence.py), None without sequence parallelism.
    `param_groups`: the optimizer's groups, each with its own initial LR (LoRA+, model/variants.py), whose
    ratios the schedule keeps; default: one group of every trainable parameter."""
    import deepspeed

    from dstrain.training.schedule import quiet_deepspeed, schedule_factory

    trainable = param_groups or [p for p in module.parameters() if p.requires_grad]
    schedule = schedule_factory(ds_config.get("scheduler"))
    dropped = {"scheduler"} | ({"optimizer"} if implementation == TORCH else set())
    config = {k: v for k, v in ds_config.items() if k not in dropped}
    optimizer = torch_adamw(ds_config) if implementation == TORCH else None
    with quiet_deepspeed():
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=trainable,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=config,
            mpu=mpu,
        )
    return engine


class LocalEngine(nn.Module):
    """The module alone, run as the engine runs it, for evaluation without DeepSpeed (`dstrain eval`): its
    floating-point parameters cast to the run's fp16/bf16 (buffers kept, as DeepSpeed 0.19's engine casts
    them) and moved to this rank's device. `forward` and `evaluating` take it in the engine's place."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.engine import CASTABLE_DTYPES

        super().__init__()
        self.module = module
        if dtype in (torch.float16, torch.bfloat16):
            for param in module.parameters():
                if param.dtype in CASTABLE_DTYPES and param.dtype != dtype:
                    param.data = param.data.to(dtype)
        self.device = torch.device(get_accelerator().current_device_name())
        module.to(self.device)

    def forward(self, **inputs: Any) -> Any:
        return self.module(**inputs)


def optimizer_implementation(engine: DeepSpeedEngine) -> str:
    """TORCH or DEEPSPEED: which one this engine's (ZeRO-wrapped) optimizer is."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return TORCH if type(base) in (torch.optim.AdamW, torch.optim.Adam) else DEEPSPEED


def describe_optimizer(engine: DeepSpeedEngine) -> str:
    """The optimizer as the start-up line names it, e.g. "torch AdamW (foreach)", "DeepSpeed FusedAdam"."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if optimizer_implementation(engine) == DEEPSPEED:
        return f"DeepSpeed {type(base).__name__}"
    defaults = base.defaults
    mode = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    return f"torch {type(base).__name__} ({mode})"


def forward(engine: DeepSpeedEngine, batch: dict[str, Any], **flags: bool | int) -> tuple[torch.Tensor, ...]:
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
    """The LR of the first param group, which the engine's next update will use."""
    lrs = engine.get_lr()
    return float(lrs[0]) if lrs else 0.0


def current_lrs(engine: DeepSpeedEngine) -> list[float]:
    """Every param group's LR, as the engine's next update will use them."""
    return [float(lr) for lr in engine.get_lr()]


def lr_schedule(engine: DeepSpeedEngine) -> Any:
    """The engine's `training.schedule.PlannedSchedule`, None when the ZeRO JSON names no scheduler."""
    return engine.lr_scheduler


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
