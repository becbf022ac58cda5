"""PEFT's adapter variants in a dstrain run: what DoRA, rsLoRA, PiSSA/OLoRA and LoRA+ need beyond PEFT's config.

DoRA and rsLoRA are PEFT's alone (`use_dora`, `use_rslora`): DoRA's magnitude vectors are trainable
parameters like the LoRA matrices, so they are gathered, saved, restored and counted with them.

PiSSA and OLoRA (`init_lora_weights: pissa | pissa_niter_K | olora`) start the adapter from each weight's
top singular vectors (its QR factors) and subtract that product from the weight: the run trains on a
*residual* base W_res = W - s B0 A0. An adapter for W_res is useless on the original base, so a checkpoint
holds PEFT's conversion of it to a plain LoRA of the original base (`save_pretrained(...,
path_initial_model_for_weight_conversion=...)`, PEFT's `subtract_mutated_init`): A' = [A; A0],
B' = [B, -B0], rank and alpha doubled (alpha x sqrt 2 under rsLoRA), since W + s B'A' = W_res + s B A.
PEFT's own conversion keeps only the lora_A/lora_B tensors; here every other adapter tensor (DoRA's
magnitudes) is kept, which the same identity makes exact for DoRA too.

That saved adapter also carries A0 and B0 (its second halves). A resume rebuilds the residual base from the
original base and them, with PEFT's arithmetic: no second SVD (minutes on a large model with full `pissa`),
and nothing that depends on the SVD coming out bitwise the same on another machine, thread count or PEFT
release; the rebuilt base is bitwise the one the run started with, in any dtype (see `decompose`).

LoRA+ (`loraplus_lr_ratio`) puts lora_B, and as in PEFT's `create_loraplus_optimizer` every 1-D adapter
weight (DoRA's magnitudes), into a second optimizer group at ratio x the learning rate (config/zero.py gives
the LR schedule one value per group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dstrain.config.run import LoraConfig

MUTATING_INITS = ("pissa", "olora")  # prefixes: pissa, pissa_niter_K, olora
INITIAL = "dstrain_initial_adapter"  # attribute of the PeftModel: the initial A0/B0 of a mutating init
A_NAMES, B_NAMES = ("lora_A", "lora_embedding_A"), ("lora_B", "lora_embedding_B")
LORAPLUS_GROUP = "lora_B"  # the name of the second group, in metrics.jsonl as `lr/lora_B`


def mutates_base(init_lora_weights: bool | str) -> bool:
    """Whether this init subtracts the initial adapter from the base weights (PiSSA, OLoRA)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(MUTATING_INITS)


def factor(key: str) -> str | None:
    """ "A" or "B" for a LoRA factor in PEFT's saved layout (`...q_proj.lora_A.weight`), None otherwise."""
    parts = key.split(".")
    if any(name in parts for name in A_NAMES):
        return "A"
    if any(name in parts for name in B_NAMES):
        return "B"
    return None


def initial_adapter(peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The initial A0/B0 (fp32, PEFT's saved layout) of a PiSSA/OLoRA run; None for any other init."""
    return peft_model.__dict__.get(INITIAL)


def peft_init(init_lora_weights: bool | str) -> bool | str:
    """What get_peft_model initialises with: PiSSA/OLoRA start as a plain init, then `settle_initial`."""
    return True if mutates_base(init_lora_weights) else init_lora_weights


def settle_initial(
    peft_model: nn.Module, init_lora_weights: bool | str, initial: dict[str, torch.Tensor] | None
) -> None:
    """After get_peft_model: a fresh PiSSA/OLoRA run decomposes each weight and keeps A0/B0; a resumed one
    rebuilds its residual from the checkpoint's."""
    if not mutates_base(init_lora_weights):
        return
    if initial is None:
        decompose(peft_model, str(init_lora_weights))
        initial = capture_initial(peft_model)
    else:
        subtract_initial(peft_model, initial)
    peft_model.peft_config["default"].init_lora_weights = init_lora_weights
    peft_model.__dict__[INITIAL] = initial


def decompose(peft_model: nn.Module, init: str) -> None:
    """PEFT's own pissa_init / olora_init, layer by layer, as get_peft_model runs them, but without the cast
    that follows there: in a bf16/fp16 model get_peft_model rounds A0/B0 to the model dtype after
    subtracting the unrounded product, so the kept factors would not rebuild the residual they made. Called
    here, the factors stay the fp32 values subtracted, and a resume rebuilds the residual bitwise in any
    dtype. A collective under ZeRO-3 (each weight gathered, rank 0's result kept), as in PEFT.
    """
    from peft.utils.integrations import gather_params_ctx

    for _, layer in lora_layers(peft_model):
        with gather_params_ctx(layer.get_base_layer().weight):
            if init == "olora":
                layer.olora_init("default")
            else:
                layer.pissa_init("default", init)


def capture_initial(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """A0/B0 as PEFT's init left them, before DeepSpeed partitions them (fp32 copies on the host)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if factor(k) is not None}


def initial_from_plain_lora(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A0/B0 back out of a converted checkpoint adapter: the second half of each A' and minus that of B'."""
    initial = {}
    for key, tensor in adapter.items():
        kind = factor(key)
        if kind == "A":
            initial[key] = tensor[tensor.shape[0] // 2 :].float().clone()
        elif kind == "B":
            initial[key] = -tensor[:, tensor.shape[1] // 2 :].float()
    return initial


def lora_layers(peft_model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every LoRA layer holding the default adapter, names as in PEFT's saved keys."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        # linear layers only: PEFT's embedding and convolution LoRA layers ignore PiSSA/OLoRA
        if isinstance(module, LoraLayer) and isinstance(getattr(module.lora_A, "default", None), nn.Linear):
            yield name, module


def subtract_initial(peft_model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """W_res = W - s B0 A0 for every adapted weight, as PEFT's pissa_init/olora_init compute it.

    A collective under ZeRO-3 (each weight gathered with PEFT's gather_params_ctx, rank 0's result kept).
    """
    from peft.utils.integrations import gather_params_ctx

    missing = []
    for name, layer in lora_layers(peft_model):
        a0, b0 = initial.get(f"{name}.lora_A.weight"), initial.get(f"{name}.lora_B.weight")
        if a0 is None or b0 is None:
            missing.append(name)
            continue
        base = layer.get_base_layer()
        with gather_params_ctx(base.weight):
            residual_weight(base, layer.scaling["default"], a0, b0, getattr(layer, "fan_in_fan_out", False))
    if missing:
        from dstrain.errors import CheckpointError

        raise CheckpointError(
            f"the checkpoint's adapter has no initial PiSSA/OLoRA factors for {', '.join(missing[:3])}: it does "
            "not belong to this model and lora settings"
        )


def residual_weight(base: nn.Module, scaling: float, a0: torch.Tensor, b0: torch.Tensor, t: bool) -> None:
    """Replace `base.weight` by W - scaling * B0 @ A0: PEFT's arithmetic and order (fp32, one cast back);
    a 4-bit weight is dequantised and re-quantised as PEFT's olora_init does it."""
    from peft.utils.integrations import dequantize_module_weight, get_bnb_param_type
    from peft.utils.other import transpose

    weight = base.weight
    packed = get_bnb_param_type(weight) == "4bit"
    full = dequantize_module_weight(base) if packed else weight
    device = full.device
    value = transpose(full.to(torch.float32), t)
    value = value - scaling * b0.to(device) @ a0.to(device)
    if not packed:
        base.weight.data = transpose(value.to(weight.dtype), t)
        return
    base.weight = weight.__class__(
        value,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        compress_statistics=weight.compress_statistics,
        module=weight.module,
    ).to(weight.device)


def plain_lora_state(
    adapter: dict[str, torch.Tensor], initial: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The trained adapter as a plain LoRA of the original base (see the module docstring); unchanged when
    the run did not start from PiSSA/OLoRA."""
    if initial is None:
        return adapter
    out = dict(adapter)
    for key, start in initial.items():
        trained = adapter[key]
        start = start.to(trained.dtype)
        if factor(key) == "A":
            out[key] = torch.cat([trained, start], dim=0)
        else:
            out[key] = torch.cat([trained, -start], dim=1)
    return out


def plain_lora_config(raw: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json of the converted adapter, as PEFT writes it: plain init, rank and alpha doubled
    (alpha x sqrt 2 under rsLoRA, whose scaling is alpha / sqrt r)."""
    out = dict(raw, init_lora_weights=True, r=2 * raw["r"])
    out["lora_alpha"] = raw["lora_alpha"] * (math.sqrt(2) if raw.get("use_rslora") else 2)
    return out


def optimizer_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, ratio: float | None
) -> list[nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters as deepspeed.initialize gets them: one list, or with LoRA+ two groups.

    PEFT's rule (`create_loraplus_optimizer`): lora_B matrices and 1-D weights train at ratio x lr,
    everything else at lr. Group 0 stays the base group, whose LR is `lr` in metrics.jsonl.
    """
    trainable = [(name, p) for name, p in named if p.requires_grad]
    if not ratio:
        return [p for _, p in trainable]
    fast = [p for name, p in trainable if factor(name) == "B" or p.dim() == 1]
    ids = {id(p) for p in fast}
    rest = [p for _, p in trainable if id(p) not in ids]
    return [{"params": rest}, {"params": fast, "lr": lr * ratio}]


def describe(lora: LoraConfig) -> str:
    """The adapter as the start-up line names it: "LoRA r=16", "DoRA r=16, rsLoRA, pissa init, LoRA+ x16"."""
    parts = [f"{'DoRA' if lora.use_dora else 'LoRA'} r={lora.r}"]
    parts += ["rsLoRA"] if lora.use_rslora else []
    parts += [] if lora.init_lora_weights is True else [f"{lora.init_lora_weights} init"]
    parts += [f"LoRA+ x{lora.loraplus_lr_ratio:g}"] if lora.loraplus_lr_ratio else []
    return ", ".join(parts)


def group_lr_metrics(lrs: list[float]) -> dict[str, float]:
    """The LoRA+ group's learning rate as metrics.jsonl logs it (`lr/lora_B`); the base group is `lr`."""
    return {f"lr/{LORAPLUS_GROUP}": lrs[1]} if len(lrs) > 1 else {}


def dora_shape(peft_model: nn.Module, layers: int) -> tuple[int, int]:
    """(output features of the DoRA-adapted linears per decoder layer, elements of the largest DoRA weight
    norm). PEFT recomputes each weight's norm in every forward: eye(in), B A (in x out), its scaled copy and
    the sum with the weight (out x in) are live at once: in^2 + 3 in out."""
    outputs = workspace = 0
    for module in peft_model.modules():
        if getattr(module, "lora_magnitude_vector", None):
            base = module.get_base_layer()
            fan_in, fan_out = getattr(base, "in_features", 0), getattr(base, "out_features", 0)
            outputs += fan_out
            workspace = max(workspace, fan_in * fan_in + 3 * fan_in * fan_out)
    return outputs // max(1, layers), workspace
