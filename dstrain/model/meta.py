"""The model a run would build, on the meta device: its shapes and bytes without a weight loaded or allocated.

`dstrain train --dry-run` estimates memory per rank from this (model/memory.py reads the same numbers from
the real model at start-up), so planning a 70B run takes seconds on a login node. Built the way
model/build.py builds it: the same config, dtype, attention choice and LoRA (PEFT's own `get_peft_model`).
With `load_in_4bit`, transformers' own bitsandbytes integration swaps in the same Linear4bit layers (its
skip list: the output head, tied and fp32-kept modules) and bitsandbytes' own `quantize_4bit` runs on the
meta weights: packed storage and quantisation constants get the shapes a real load gives them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.errors import ConfigError
from dstrain.model import memory, quant
from dstrain.model.build import DTYPES, add_lora, attention_refused, model_dir


def meta_model(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> PeftModel:
    """Base (4-bit layers with `load_in_4bit`) + LoRA, every tensor on the meta device."""
    path = model_dir(model_cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"model.path: unreadable model config in {path} ({exc})"]) from None
    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model_cfg.dtype], **kwargs)
        except (ValueError, ImportError) as exc:
            refused = attention_refused(exc, path, kwargs)
            if refused is not None:
                raise refused from None
            raise
    if model_cfg.load_in_4bit:
        quantize_on_meta(base, DTYPES[model_cfg.dtype])
    base.config.use_cache = False
    return add_lora(base, lora_cfg)


def quantize_on_meta(base: PreTrainedModel, dtype: torch.dtype) -> None:
    """The Linear layers a 4-bit load quantises, as Linear4bit with packed meta weights and their QuantState."""
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    bnb_config = quant.bnb_config(dtype)
    skip = HfQuantizer.get_modules_to_not_convert(
        base, bnb_config.llm_int8_skip_modules, getattr(base, "_keep_in_fp32_modules", None)
    )
    replace_with_bnb_linear(base, modules_to_not_convert=skip, quantization_config=bnb_config)
    # bitsandbytes caches its quantisation map on the device of the first tensor it quantises: a meta map
    # would break every later real load in this process. Left as it was found.
    cached = dict(bnb.functional.name2qmap)
    try:
        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight._quantize("meta")  # bitsandbytes' own packing: storage and constants as real
    finally:
        bnb.functional.name2qmap.clear()
        bnb.functional.name2qmap.update(cached)


def planned_shape(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    zero_stage: int,
    peft_model: torch.nn.Module | None = None,
) -> tuple[memory.ModelShape, str]:
    """The ModelShape the run's memory check would read, and the attention its model runs.

    Under ZeRO-3 without 4-bit the run builds the base inside zero.Init (model/build.py), partitioned as it
    is created: the shape says so, as the real one does. Nothing is resident on the host.
    """
    peft_model = peft_model if peft_model is not None else meta_model(model_cfg, lora_cfg)
    shape = memory.model_shape(peft_model)
    partitioned = zero_stage == 3 and not model_cfg.load_in_4bit
    return replace(shape, partitioned=partitioned, host_resident_bytes=0), memory.attention_of(peft_model)
