"""Optimizer and LR-scheduler state in a world-size independent form, gathered from and scattered back into
DeepSpeed's ZeRO partitions.

Saved per trainable parameter (full, unpartitioned, fp32): the master weight and Adam's two moments, plus
the optimizer step, the engine's step counters, the scheduler state and each param group's learning rate.
DeepSpeed's own `save_checkpoint` writes one pickle per rank instead, which ties the files to the world size.

Restoring follows a sequence checked on CPU to continue bitwise-identically (ZeRO-2 and ZeRO-3, with and
without CPU offload): DeepSpeed creates optimizer states lazily, so first one optimizer step with learning
rate 0 and a zero loss creates them and changes nothing; then the saved values overwrite master weights,
moments, module weights, step counters and the scheduler.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from peft import PeftModel

from dstrain import engine as eng
from dstrain.errors import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"
OPTIMIZER_KEY = "optimizer_implementation"  # in scheduler.json


def trainable(peft_model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]


def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (torch AdamW, FusedAdam, DeepSpeedCPUAdam)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_step(engine: DeepSpeedEngine) -> int:
    """Adam's step count, wherever this optimizer keeps it (per-state tensor/int or per param group)."""
    opt = base_optimizer(engine)
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    for group in opt.param_groups:
        if "step" in group:
            return int(group["step"])
    return 0


def set_optimizer_step(engine: DeepSpeedEngine, step: int) -> None:
    opt = base_optimizer(engine)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    for group in opt.param_groups:
        if "step" in group:
            group["step"] = step


def gather_optimizer_state(engine: DeepSpeedEngine, peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """{f"{param}::{fp32|exp_avg|exp_avg_sq}": full fp32 tensor}. A collective: every rank calls it."""
    params = trainable(peft_model)
    if all(hasattr(p, "_hp_mapping") for _, p in params):  # ZeRO-1/2: one all-reduce for everything
        return gather_zero12(params, engine)
    from deepspeed.utils import safe_get_full_optimizer_state

    tensors = {}
    for name, param in params:
        tensors[f"{name}::{MASTER}"] = eng.full_fp32_param(param)
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None and not zero_managed(param):  # stage 0: the torch optimizer holds the state
                value = base_optimizer(engine).state.get(param, {}).get(key)
            if value is None:  # no step taken yet: Adam's moments start at zero
                value = torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
            tensors[f"{name}::{key}"] = value.detach().float().cpu().clone()
    return tensors


def zero_managed(param: torch.nn.Parameter) -> bool:
    """Whether a ZeRO (or bf16) optimizer keeps this parameter's master and moments in its partitions."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def gather_zero12(
    params: list[tuple[str, torch.nn.Parameter]], engine: DeepSpeedEngine
) -> dict[str, torch.Tensor]:
    """Under ZeRO-1/2 each rank holds a contiguous fragment of every parameter's master and moments.

    `safe_get_full_*` all-reduces one zero-filled full tensor per parameter and state (3 x #params
    collectives); this places every local fragment into one flat buffer and all-reduces it once, which is
    what makes a save of a few hundred LoRA tensors cost one round trip instead of hundreds.
    """
    import torch.distributed as dist

    keys = (MASTER, *MOMENTS)
    sizes = [p.numel() for _, p in params]
    flat = torch.zeros(len(keys) * sum(sizes), dtype=torch.float32, device=engine.device)
    offset = 0
    for key in keys:
        for (_, param), size in zip(params, sizes, strict=True):
            mapping = param._hp_mapping
            # No fragment on this rank, or no Adam state yet (before the first step): zeros, as Adam starts.
            if mapping is not None and (key == MASTER or key in mapping.get_optim_state_keys()):
                address = mapping.lp_fragment_address
                fragment = mapping.get_hp_fragment(None if key == MASTER else key)
                flat.narrow(0, offset + address.start, address.numel).copy_(fragment.data.flatten())
            offset += size
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, group=params[0][1]._dp_group)
    flat = flat.cpu()
    tensors, offset = {}, 0
    for key in keys:
        for (name, param), size in zip(params, sizes, strict=True):
            tensors[f"{name}::{key}"] = flat[offset : offset + size].view(param.shape).clone()
            offset += size
    return tensors


def scheduler_state(engine: DeepSpeedEngine) -> dict[str, Any]:
    """Scheduler state, LRs and counters as plain JSON (DeepSpeed's schedulers keep one integer)."""
    sched = engine.lr_scheduler
    return {
        "loss_scaler": loss_scaler_state(engine),
        "optimizer_step": optimizer_step(engine),
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "param_group_lr": [float(g["lr"]) for g in engine.optimizer.param_groups],
        "scheduler": sched.state_dict() if sched is not None else None,
        # which Adam made these numbers; a resume keeps it (dstrain.engine.choose_optimizer). Absent in
        # checkpoints written before dstrain chose: those ran DeepSpeed's.
        OPTIMIZER_KEY: eng.optimizer_implementation(engine),
    }


def loss_scaler_state(engine: DeepSpeedEngine) -> dict[str, Any] | None:
    """fp16's dynamic loss scale and its counters (plain numbers), or None in bf16/fp32."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))}


def restore_loss_scaler(engine: DeepSpeedEngine, saved: dict[str, Any] | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not saved:
        return
    for key, value in saved.items():
        if hasattr(scaler, key):
            setattr(scaler, key, value)


def create_states(engine: DeepSpeedEngine, accumulation: int, pad_id: int) -> None:
    """One optimizer step that changes nothing (lr 0, zero loss) so DeepSpeed allocates Adam's states."""
    groups = engine.optimizer.param_groups
    saved_lr = [g["lr"] for g in groups]
    for group in groups:
        group["lr"] = 0.0
    batch = {
        "input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "labels": torch.tensor([[-100, pad_id]]),
    }
    for _ in range(accumulation):  # engine.step() steps the optimizer only at the accumulation boundary
        nll_sum, _ = eng.forward(engine, batch)
        eng.backward(engine, nll_sum * 0.0)
        eng.step(engine)
    for group, lr in zip(groups, saved_lr, strict=True):
        group["lr"] = lr


def check_matches(tensors: dict[str, torch.Tensor], params: list[tuple[str, torch.nn.Parameter]]) -> None:
    problems = []
    for name, param in params:
        shape = tuple(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
        for key in (MASTER, *MOMENTS):
            saved = tensors.get(f"{name}::{key}")
            if saved is None:
                problems.append(f"{name}: no saved {key}")
            elif tuple(saved.shape) != shape:
                problems.append(f"{name}: saved {key} has shape {tuple(saved.shape)}, the model has {shape}")
    extra = {k.split("::")[0] for k in tensors} - {name for name, _ in params}
    problems += [f"{name}: in the checkpoint but not a trainable parameter of this model" for name in extra]
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit this model ({shown}). Resume with the model and "
            "lora settings the checkpoint was trained with."
        )


def restore_optimizer_state(
    engine: DeepSpeedEngine,
    peft_model: PeftModel,
    tensors: dict[str, torch.Tensor],
    sched: dict[str, Any],
    accumulation: int,
    pad_id: int,
) -> None:
    """Scatter saved full states into this engine's partitions. A collective: every rank calls it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = trainable(peft_model)
    check_matches(tensors, params)
    create_states(engine, accumulation, pad_id)
    for name, param in params:
        master = tensors[f"{name}::{MASTER}"]
        safe_set_full_fp32_param(param, master.to(engine.device))
        for key in MOMENTS:
            value = tensors[f"{name}::{key}"].to(engine.device)
            if zero_managed(param):
                safe_set_full_optimizer_state(param, value, key)
            else:  # stage 0: the torch optimizer's own state tensors (created by create_states)
                base_optimizer(engine).state[param][key].copy_(value.view_as(param))
        set_module_weight(param, master, engine.global_rank)
    set_optimizer_step(engine, int(sched["optimizer_step"]))
    replay_cpu_adam_step_cache(engine, int(sched["optimizer_step"]))
    for group, lr in zip(engine.optimizer.param_groups, sched["param_group_lr"], strict=True):
        group["lr"] = lr
    if engine.lr_scheduler is not None and sched["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(sched["scheduler"])
    restore_loss_scaler(engine, sched.get("loss_scaler"))
    engine.global_steps = int(sched["global_steps"])
    engine.global_samples = int(sched["global_samples"])
    engine.micro_steps = engine.global_steps * accumulation


def replay_cpu_adam_step_cache(engine: DeepSpeedEngine, step: int) -> None:
    """Rebuild the bias-correction cache of DeepSpeed's CPU Adam kernels, for bitwise-exact CPU resume.

    The C++ CPU Adam (behind FusedAdam on CPU and DeepSpeedCPUAdam) keeps beta**t and updates it with one
    multiplication per step; jumping to step t computes pow(beta, t) instead, which differs in the last
    bits and so shifts every later update by an ulp. Stepping a one-element dummy through steps 1..t with
    learning rate 0 rebuilds exactly the cached values an uninterrupted run has. The CUDA kernels compute
    pow() on every call and need none of this.
    """
    opt = base_optimizer(engine)
    if not opt.param_groups or step < 1:
        return
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    p, g, m, v = (torch.zeros(1) for _ in range(4))
    bias_correction = bool(group.get("bias_correction", True))
    if hasattr(opt, "ds_opt_adam"):  # DeepSpeedCPUAdam (ZeRO-Offload)
        for t in range(1, step + 1):
            opt.ds_opt_adam.adam_update(
                opt.opt_id, t, 0.0, beta1, beta2, group["eps"], 0.0, bias_correction, p, g, m, v
            )
    elif hasattr(opt, "multi_tensor_adam") and engine.device.type == "cpu":  # FusedAdam's CPU build
        for t in range(1, step + 1):
            opt.multi_tensor_adam(
                2048 * 32,
                opt._dummy_overflow_buf,
                [[g], [p], [m], [v]],
                0.0,
                beta1,
                beta2,
                group["eps"],
                t,
                opt.adam_w_mode,
                int(bias_correction),
                0.0,
            )


def set_module_weight(param: torch.nn.Parameter, value: torch.Tensor, rank: int) -> None:
    """The module's own copy is what the next forward reads; under ZeRO-3 it lives in partitions too."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(value.to(param.device, param.dtype))
        return
    with torch.no_grad():
        param.data.copy_(value.to(param.device, param.dtype))
