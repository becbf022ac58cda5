"""What the start-up says and the loop needs to know about the model: its log-prob path, its router loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dstrain.config.run import RunConfig

if TYPE_CHECKING:
    from peft import PeftModel


def head_line(cfg: RunConfig, peft_model: PeftModel) -> str:
    """Which log-prob path the run takes and why (model/families.py), said once."""
    from dstrain.model.exact import keeps_columns
    from dstrain.model.families import choose_path

    base = peft_model.get_base_model()
    path = choose_path(base, cfg.model.head)
    if path.kind == "exact" and not keeps_columns(base):
        return path.describe() + "; its forward takes no logits_to_keep, so it computes every column's logits"
    return path.describe()


def router_note(cfg: RunConfig, peft_model: PeftModel) -> str | None:
    """A router_aux_loss_coef set for a model that has no load-balancing loss is said, not dropped silently."""
    from dstrain.model import moe

    base = peft_model.get_base_model()
    if cfg.model.router_aux_loss_coef in (None, 0.0) or moe.aux_coef(base, 1.0) > 0:
        return None
    kind = "an MoE model whose transformers port has" if moe.is_moe(base) else "a dense model with"
    return (
        f"model.router_aux_loss_coef={cfg.model.router_aux_loss_coef} has no effect: {type(base).__name__} is "
        f"{kind} no router load-balancing loss"
    )


def run_fields(cfg: RunConfig, peft_model: PeftModel) -> dict[str, Any]:
    """Run's fields about the model: its class and dtype, its log-prob path, whether it is an MoE."""
    from dstrain.model import moe
    from dstrain.model.build import DTYPES
    from dstrain.model.families import choose_path

    base = peft_model.get_base_model()
    return {
        "model_name": type(base).__name__,
        "param_dtype": DTYPES[cfg.model.dtype],
        "head_exact": choose_path(base, cfg.model.head).kind == "exact",
        "moe": moe.aux_coef(base, cfg.model.router_aux_loss_coef) > 0,
    }
