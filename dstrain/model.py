"""Base causal LM (dtype, bundled tiny model), tokenizer, LoRA and gradient checkpointing. No distributed code.

`builtin:tiny` is a Llama-shaped model shipped in the package (config, tokenizer and, when present, small
pretrained weights); a builtin without weights is initialised from `model.init_seed`, so every rank (and
every test) builds bit-identical weights without a download.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dstrain.config import LoraConfig, ModelConfig
from dstrain.errors import ConfigError, DstrainError

BUILTIN_PREFIX = "builtin:"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def builtin_dir(name: str) -> Path:
    root = resources.files("dstrain") / "assets" / name
    if not root.is_dir():
        raise ConfigError([f"model.path: unknown builtin model '{name}' (available: builtin:tiny)"])
    return Path(str(root))


def model_dir(cfg: ModelConfig) -> Path:
    """The directory holding config and tokenizer: a local path or a bundled builtin."""
    if cfg.path.startswith(BUILTIN_PREFIX):
        return builtin_dir(cfg.path.removeprefix(BUILTIN_PREFIX))
    return Path(cfg.path).expanduser()


def check_model_path(cfg: ModelConfig) -> list[str]:
    """Problems with model.path, found before any process group or weight load."""
    if cfg.path.startswith(BUILTIN_PREFIX):
        try:
            builtin_dir(cfg.path.removeprefix(BUILTIN_PREFIX))
        except ConfigError as exc:
            return exc.problems
        return []
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        return [
            f"model.path: {cfg.path}: no such directory (dstrain loads local HF model dirs, no downloads)"
        ]
    if not (path / "config.json").is_file():
        return [f"model.path: {cfg.path}: no config.json inside; is this a Hugging Face model directory?"]
    return []


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir(cfg)), trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError([f"model.path: no usable tokenizer in {model_dir(cfg)} ({exc})"]) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            [f"model.path: the tokenizer in {model_dir(cfg)} has no EOS token; set one in its config"]
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hidden_size(cfg: ModelConfig) -> int | None:
    try:
        config = AutoConfig.from_pretrained(str(model_dir(cfg)), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"model.path: unreadable model config in {model_dir(cfg)} ({exc})"]) from None
    return getattr(config, "hidden_size", None)


def load_base_model(cfg: ModelConfig) -> PreTrainedModel:
    """The frozen base model in the configured dtype."""
    dtype = DTYPES[cfg.dtype]
    path = str(model_dir(cfg))
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    if cfg.path.startswith(BUILTIN_PREFIX) and not (Path(path) / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(path, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise DstrainError(f"model.path: could not load a causal LM from {path}: {exc}") from exc
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only they require gradients."""
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. target module names that the model does not have
        raise ConfigError([f"lora.target_modules: {exc}"]) from None


def enable_gradient_checkpointing(model: PeftModel, reentrant: bool) -> None:
    """Recompute activations in backward. ZeRO-3 + PEFT needs the reentrant variant.

    With reentrant checkpointing the inputs of each checkpointed block must require grad, or the frozen
    embeddings would cut the graph and LoRA weights would get no gradient.
    """
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    model.enable_input_require_grads()


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, zero_stage: int) -> PeftModel:
    model = add_lora(load_base_model(model_cfg), lora_cfg)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, reentrant=zero_stage == 3)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); under ZeRO-3 partitioned params report their full size via ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
