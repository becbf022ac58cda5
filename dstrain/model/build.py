"""The model a run trains: base causal LM (dtype, tiny builtin), tokenizer, LoRA, gradient checkpointing.

`builtin:tiny` is a Llama-shaped model shipped in the package (config, tokenizer and, when present, small
pretrained weights); a builtin without weights is initialised from `model.init_seed`, so every rank (and
every test) builds bit-identical weights without a download. With `model.load_in_4bit` the base is loaded
in 4-bit NF4 (QLoRA, see quant.py), builtins included.

One step involves the other ranks: under ZeRO-3 (without 4-bit) `zero3_init` has transformers build the
base inside deepspeed.zero.Init, already partitioned, which needs the process group. Everything else is
the same on one process as on many.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

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

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.errors import ConfigError, DstrainError
from dstrain.model import moe, quant, variants

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


def base_reference(name_or_path: str) -> str:
    """How adapter_config.json names the base (`base_model_name_or_path`): a local dir as an absolute path,
    so `AutoPeftModelForCausalLM.from_pretrained(ckpt)` finds it from any directory (a relative one names
    another dir there, then PEFT asks the Hub); a name that is no local path (a Hub id, org/name) as given."""
    path = Path(name_or_path).expanduser()
    return str(path.absolute()) if path.exists() else name_or_path


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
    return check_remote_code(cfg, path)


def remote_code(path: Path) -> tuple[str | None, str | None]:
    """(model_type, the auto_map entry of its causal LM class) from config.json, read as plain JSON."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None  # unreadable: reported where transformers reads it
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    entry = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    return (raw.get("model_type") if isinstance(raw, dict) else None), entry


def check_remote_code(cfg: ModelConfig, path: Path) -> list[str]:
    """A model whose class transformers does not have needs the code in its dir: found from config.json
    alone, before anything of the model is loaded. (A known model_type loads with transformers' own class
    even when the dir also carries code, as MiniCPM3's hub repo does.)"""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, entry = remote_code(path)
    if cfg.trust_remote_code or model_type is None or model_type in CONFIG_MAPPING:
        return []
    if entry is None:
        return [
            f"model.path: {path}: model_type '{model_type}' is unknown to transformers {__version__} and the "
            "dir carries no modeling code (no AutoModelForCausalLM in config.json's auto_map)"
        ]
    return [
        f"model.path: {path} needs its own modeling code ({entry}; model_type '{model_type}' is unknown to "
        f"transformers {__version__}). Running it executes Python from that dir: after reading it, set "
        "`model.trust_remote_code: true` in the run config (or --set model.trust_remote_code=true)"
    ]


def warn_remote_code(cfg: ModelConfig, path: Path) -> None:
    """Say once (rank 0) that this run executes Python shipped with the model."""
    _, entry = remote_code(path)
    if cfg.trust_remote_code and entry is not None and os.environ.get("RANK", "0") == "0":
        files = ", ".join(sorted(p.name for p in path.glob("*.py"))) or "its .py files"
        print(
            f"warning: model.trust_remote_code: running modeling code from {path} ({files}; "
            f"class {entry}); it executes with this run's rights",
            file=sys.stderr,
        )


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
    """The frozen base model in the configured dtype; with `load_in_4bit` its linear layers in 4-bit NF4.

    No device_map is passed: each rank loads the whole base onto its own device (the one set for its local
    rank), which ZeRO-3 then partitions; a device_map spreading layers over devices would fight ZeRO.
    """
    dtype = DTYPES[cfg.dtype]
    path = Path(model_dir(cfg))
    problems = check_remote_code(cfg, path)
    if problems:
        raise ConfigError(problems)
    warn_remote_code(cfg, path)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation != "auto":  # auto: transformers picks (sdpa where supported, else eager)
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.path.startswith(BUILTIN_PREFIX) and not (path / "model.safetensors").is_file():
        model = load_random_init(path, cfg, kwargs)
    else:
        model = load_pretrained(path, dtype, quantization(cfg), kwargs)
    if cfg.load_in_4bit:
        quant.keep_training_layout(model)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def quantization(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained's quantization_config for a QLoRA run, nothing otherwise."""
    return {"quantization_config": quant.bnb_config(DTYPES[cfg.dtype])} if cfg.load_in_4bit else {}


def load_pretrained(
    path: Path, dtype: torch.dtype, quantized: dict[str, Any], kwargs: dict[str, Any]
) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **quantized, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        refused = attention_refused(exc, path, kwargs)
        if refused is not None:
            raise refused from None
        if isinstance(exc, ImportError):
            raise
        raise DstrainError(f"model.path: could not load a causal LM from {path}: {exc}") from exc


def attention_refused(exc: Exception, path: Path, kwargs: dict[str, Any]) -> ConfigError | None:
    """The ConfigError for an explicit model.attn_implementation that the model (or this install) refuses,
    naming the model class and the choices it takes; None when `exc` is about something else."""
    choice = kwargs.get("attn_implementation")
    text = str(exc)
    if choice is None or not ("attention" in text.lower() or "flash" in text.lower()):
        return None
    name, options = attention_options(path, kwargs)
    options = [o for o in options if o != choice]
    reason = text.split(". ")[0].split("\n")[0]
    return ConfigError(
        [
            f"model.attn_implementation: {name} cannot use '{choice}' ({reason}); use one of: "
            + ", ".join(options)
            + " (auto: what transformers picks for this model)"
        ]
    )


def attention_options(path: Path, kwargs: dict[str, Any]) -> tuple[str, list[str]]:
    """(model class name, attention implementations it declares support for)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=kwargs.get("trust_remote_code", False))
    try:
        cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code: no class to ask without importing it; name it from the config
        return (config.architectures or [type(config).__name__])[0], ["auto", "eager"]
    options = ["auto", "eager"]
    options += ["sdpa"] if getattr(cls, "_supports_sdpa", False) else []
    options += ["flash_attention_2"] if getattr(cls, "_supports_flash_attn", False) else []
    return cls.__name__, options


def load_random_init(path: Path, cfg: ModelConfig, kwargs: dict[str, Any]) -> PreTrainedModel:
    """A model from the config in `path`, initialised from `cfg.init_seed` (identical on every rank).

    `from_config` cannot quantise (it takes no quantization_config, transformers #26901), so a 4-bit run
    writes the random weights to a temporary directory once and loads them back quantised: the same
    loading code as every pretrained QLoRA base, and the same weights as the unquantised random init.
    """
    dtype = DTYPES[cfg.dtype]
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        except (ValueError, ImportError) as exc:
            refused = attention_refused(exc, path, kwargs)
            if refused is not None:
                raise refused from None
            raise
    if not cfg.load_in_4bit:
        return model
    with tempfile.TemporaryDirectory(prefix="dstrain-init-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        return load_pretrained(Path(tmp), dtype, quantization(cfg), kwargs)


def add_lora(
    model: PreTrainedModel, cfg: LoraConfig, initial: dict[str, torch.Tensor] | None = None
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only they require gradients.

    `all-linear` never adapts an MoE router (it decides which experts see a token; adapting it shifts the
    load balance the model was trained to) nor separately stored routed experts: experts are adapted
    only when lora.target_parameters names their 3-D weights. `initial`: a resumed PiSSA/OLoRA run's
    initial adapter, from which the residual base is rebuilt (model/variants.py).
    """
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model, cfg),
        target_parameters=list(cfg.target_parameters) or None,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=variants.peft_init(cfg.init_lora_weights),
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. target module names that the model does not have
        key = "lora.target_parameters" if cfg.target_parameters else "lora.target_modules"
        raise ConfigError([f"{key}: {exc}"]) from None
    if cfg.target_parameters and not peft_model.base_model.targeted_parameter_names:
        raise ConfigError(  # PEFT only warns, and the run would train no expert at all
            [f"lora.target_parameters: {cfg.target_parameters} match no parameter of {type(model).__name__}"]
        )
    variants.settle_initial(peft_model, cfg.init_lora_weights, initial)
    return peft_model


def lora_targets(model: torch.nn.Module, cfg: LoraConfig) -> str | list[str]:
    """lora.target_modules as PEFT gets it: on an MoE model `all-linear` is spelled out here as the module
    names it means (moe.linear_targets), because PEFT's own reading of it on these models adds the router
    and the experts."""
    if cfg.target_modules == "all-linear" and moe.is_moe(model):
        return moe.linear_targets(model)
    return cfg.target_modules


def enable_gradient_checkpointing(model: PeftModel, reentrant: bool) -> None:
    """Recompute activations in backward. ZeRO-3 + PEFT needs the reentrant variant.

    With reentrant checkpointing the inputs of each checkpointed block must require grad, or the frozen
    embeddings would cut the graph and LoRA weights would get no gradient.
    """
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    model.enable_input_require_grads()


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    zero_stage: int,
    ds_config: dict | None = None,
    initial: dict[str, torch.Tensor] | None = None,
) -> PeftModel:
    """Base (4-bit with `load_in_4bit`) + LoRA, with gradient checkpointing when configured.

    A 4-bit base deliberately skips PEFT's `prepare_model_for_kbit_training`: it upcasts every non-4-bit
    weight (embeddings, norms, output head) to fp32, which under bf16/fp16 DeepSpeed casts straight back at
    engine creation (and which would mix dtypes inside ZeRO-3's flat partitions, DeepSpeed #8072), and it
    turns gradient checkpointing on by default, unaware of the ZeRO stage. What it does that QLoRA needs is
    done here the same way as without 4-bit: get_peft_model freezes the base, and enable_gradient_checkpointing picks the
    reentrant variant ZeRO-3 needs and makes the checkpointed inputs require grad.
    """
    zero_init = (
        zero3_init(ds_config) if zero_stage == 3 and ds_config and not model_cfg.load_in_4bit else None
    )
    model = add_lora(load_base_model(model_cfg), lora_cfg, initial)
    # the dir itself, also for a builtin (the installed package's copy) or a 4-bit random init (which
    # transformers knows by the temporary dir it was loaded back from)
    model.peft_config["default"].base_model_name_or_path = base_reference(str(model_dir(model_cfg)))
    model.zero3_init = zero_init  # kept alive with the model: transformers and PEFT consult it later too
    if zero_stage == 3:  # before DeepSpeed wraps the model and installs its gathering hooks
        moe.register_leaf_modules(model)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, reentrant=zero_stage == 3)
    return model


def zero3_init(ds_config: dict) -> object:
    """Make transformers build the base under `deepspeed.zero.Init`: each parameter is partitioned as it
    is created or loaded, so no rank ever holds the whole model (built whole, a ZeRO-3 rank peaked above a
    ZeRO-2 one: the full copy plus its partition). transformers finds the config through a weak reference,
    so the returned object must stay alive for the run. A 4-bit base is loaded whole (transformers does
    not partition quantised weights while loading); at ~0.5 byte per weight that is the smaller cost.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) weights. Packed 4-bit weights count as the weights they hold, not their storage
    elements; under ZeRO-3 partitioned params report their full size via ds_numel.

    Not PEFT's `get_nb_trainable_parameters`: it gives the same numbers whenever a 4-bit weight fills its
    packed storage exactly (the tiny model, usual LLM shapes), but it infers the count from the storage
    (elements x bytes x 2), so a weight whose packing is padded counts the padding too: 7 weights stored
    in one fp32 element report 8 (tests/unit/model/test_memory.py). The quant state knows the real shape.
    """
    trainable = total = 0
    for param in model.parameters():
        n = quant.real_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
