"""Mixture-of-experts models: the router's load-balancing loss, ZeRO-3 leaf modules, and what LoRA leaves alone.

Everything is found from the model itself, not from a list of families: transformers marks the router of
every MoE causal LM as the source of `router_logits` (`_can_record_outputs`, an OutputRecorder on the
router class), and the MoE block is the module holding the `experts` and that router. The load-balancing
loss is the model module's own `load_balancing_loss_func`, called exactly as its XxxForCausalLM.forward
calls it, so the objective's auxiliary term is the one transformers would add, not a re-derivation.

In transformers 5 the routed experts of the families we test (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2)
are one module holding 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), and the routers are
plain modules with a `weight` parameter, neither being nn.Linear; LoRA reaches the experts only through
PEFT's `target_parameters`. Remote-code and older MoE models keep per-expert nn.Linear layers and a
linear `gate`: `router_modules` and `expert_modules` name those so `all-linear` can leave them out.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
from torch import nn

ROUTER_NAMES = re.compile(r"(^|_)(gate|router)$")  # `gate`, `router`, `shared_expert_gate`; never `gate_proj`
BLOCK_CLASS = re.compile(r"(SparseMoeBlock|MoeBlock|MoE|Moe)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def router_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes transformers records `router_logits` from (empty for a dense model)."""
    recorders = getattr(unwrap(model), "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    target = getattr(recorder, "target_class", recorder)
    return (target,) if isinstance(target, type) else ()


def is_moe_block(module: nn.Module) -> bool:
    """A sparse MoE block: holds the routed `experts` next to a router, or is named like one."""
    children = dict(module.named_children())
    has_router = any(ROUTER_NAMES.search(name) for name in children)
    return ("experts" in children and has_router) or bool(BLOCK_CLASS.search(type(module).__name__))


def is_moe(model: nn.Module) -> bool:
    return bool(router_classes(model)) or any(is_moe_block(m) for m in unwrap(model).modules())


def balancing_loss_func(base: nn.Module) -> Any | None:
    """The model module's own `load_balancing_loss_func`, or None where the family has none (DeepSeek-V2:
    its transformers port adds no auxiliary loss) or the model does not say its expert counts."""
    base = unwrap(base)
    func = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    has_counts = all(hasattr(base, k) for k in ("num_experts", "num_experts_per_tok"))
    return func if func is not None and has_counts and is_moe(base) else None


def aux_coef(base: nn.Module, configured: float | None) -> float:
    """Weight of the router's load-balancing loss: 0.0 for a dense model or a family without that loss;
    otherwise `configured` (model.router_aux_loss_coef) if set, else the model config's own value."""
    if balancing_loss_func(base) is None:
        return 0.0
    if configured is not None:
        return float(configured)
    return float(getattr(unwrap(base).config, "router_aux_loss_coef", None) or 0.0)


def decoder_kwargs(base: nn.Module, coef: float) -> dict[str, Any]:
    """Extra keyword arguments for the decoder (`base.get_decoder()`): ask it to record the router logits
    (transformers' OutputRecorder hooks on the router class) when the auxiliary loss is used."""
    return {"output_router_logits": True} if coef > 0 and balancing_loss_func(base) is not None else {}


def aux_loss(base: nn.Module, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The unweighted load-balancing loss, exactly as the model's XxxForCausalLM.forward computes it.

    `outputs` is the decoder's output (with `router_logits`, see `decoder_kwargs`); `attention_mask` the
    2-D [batch, seq] padding mask or None (rows of a packed batch carry no padding: pass None). None where
    the family has no such loss or no router logits were recorded.
    """
    func = balancing_loss_func(base)
    router_logits = getattr(outputs, "router_logits", None)
    if func is None or not router_logits:
        return None
    base = unwrap(base)
    if attention_mask is not None and attention_mask.dim() != 2:
        attention_mask = None  # a 4-D (packed) mask: the loss would misread it
    loss = func(tuple(router_logits), base.num_experts, base.num_experts_per_tok, attention_mask)
    return loss if isinstance(loss, torch.Tensor) else None


def router_modules(model: nn.Module) -> list[str]:
    """Names (as in `model.named_modules()`) of every router/gate module and everything inside it:
    instances of the router classes transformers records logits from, and children of an MoE block named
    `gate`, `router` or `*_gate` (e.g. Qwen2-MoE's linear `shared_expert_gate`)."""
    classes = router_classes(model)
    routers: set[str] = set()
    for name, module in model.named_modules():
        if classes and isinstance(module, classes):
            routers.add(name)
        elif is_moe_block(module):
            routers.update(join(name, c) for c, _ in module.named_children() if ROUTER_NAMES.search(c))
    return sorted(n for n, _ in model.named_modules() if any(inside(n, r) for r in routers))


def expert_modules(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers of routed experts kept as separate modules (`...experts.3.w1`):
    all-linear leaves them alone; fused 3-D experts are adapted with lora.target_parameters."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "experts" in name.split(".")[:-1]
    ]


def linear_targets(model: nn.Module) -> list[str]:
    """What `all-linear` means on an MoE model, as full module names: every nn.Linear except the output head,
    the routers and routed experts, and those PEFT would rewrite.

    PEFT 0.21 under transformers 5 rewrites the targets of MoE families whose experts were fused in v5
    (`convert_peft_config_for_transformers`, for v4 adapters): `all-linear` gains the router (`gate.weight`)
    and the experts as target_parameters, and any target named `gate`, `gate_proj`, `up_proj`, `down_proj`
    (Mixtral: `w1`, `w2`, `w3`) becomes the fused experts, also on PeftModel.from_pretrained. So the dense
    MLPs of these families (Qwen2-MoE's shared expert, DeepSeek-V2's first layer) cannot be targeted by
    name and still reload as trained: they are left out, and the saved list is one PEFT leaves unchanged.
    """
    head = unwrap(model).get_output_embeddings()
    skipped = {*router_modules(model), *expert_modules(model)}
    renamed = peft_renamed_targets(unwrap(model))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and name not in skipped
        and name.rsplit(".", 1)[-1] not in renamed
    ]


def peft_renamed_targets(base: nn.Module) -> set[str]:
    """Target names PEFT rewrites to fused experts or the router for this model type (empty: none)."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:  # a PEFT without the v4 -> v5 conversion rewrites nothing
        return set()
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(getattr(base.config, "model_type", None))
    return set(_MOE_TARGET_MODULE_MAPPING.get(pattern, {}))


def block_classes(model: nn.Module) -> list[type]:
    """The classes of the model's sparse MoE blocks, in the order first met."""
    found: list[type] = []
    for module in model.modules():
        if is_moe_block(module) and type(module) not in found:
            found.append(type(module))
    return found


def register_leaf_modules(model: nn.Module) -> list[str]:
    """Under ZeRO-3, make each sparse MoE block one unit for DeepSpeed's parameter gathering
    (`deepspeed.utils.set_z3_leaf_modules`): all its weights are fetched when the block starts, whichever
    experts this rank's tokens pick. Without it DeepSpeed fetches per submodule in a traced order, and
    ranks that route to different experts may call different submodules: a collective one rank never
    joins (a hang), or a prefetch trace that never settles. DeepSpeed 0.19 registers only the Mixtral,
    Qwen2-MoE and Qwen3-MoE blocks by itself (zero_optimization.leaf_module's default classes); this finds
    every family's (DeepSeek-V2's DeepseekV2Moe, OLMoE, remote code). Returns the class names registered."""
    classes = block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")
