"""`dstrain export CKPT --out DIR [--merge]`: hand a trained adapter to PEFT, transformers or vLLM.

Without --merge: a PEFT adapter dir (adapter_model.safetensors + adapter_config.json) plus the tokenizer.
With --merge: the LoRA update folded into the base weights, saved as a full Hugging Face model dir in
safetensors (config, generation config, tokenizer) that `AutoModelForCausalLM.from_pretrained(DIR)` loads.
The merge runs in fp32 and the result is cast to the run's `model.dtype` once, at the end, so the merged
weights are not rounded twice. A QLoRA run (`model.load_in_4bit`) is merged the same way, into the
un-quantised base weights: folding LoRA into 4-bit weights would need a re-quantisation that rounds the
update away, and the usual deployment of a QLoRA adapter is on the full-precision base.

The output appears atomically (written beside DIR, then renamed), and an existing non-empty DIR is never
overwritten.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from dstrain.checkpoint.atomic import atomic_dir
from dstrain.checkpoint.load import find_checkpoint
from dstrain.checkpoint.state import ADAPTER_WEIGHTS, CONFIG
from dstrain.config.run import RunConfig, config_from_dict
from dstrain.errors import DstrainError

ADAPTER_CONFIG = "adapter_config.json"


def run_config(ckpt: Path) -> RunConfig:
    raw = yaml.safe_load((ckpt / CONFIG).read_text(encoding="utf-8")) or {}
    return config_from_dict(raw, source=f"{ckpt / CONFIG}")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DstrainError(
            f"--out {out}: exists and is not empty; choose a new directory (nothing is overwritten)"
        )


def export_adapter(ckpt: Path, cfg: RunConfig, tmp: Path) -> None:
    from dstrain.model.build import load_tokenizer

    shutil.copy2(ckpt / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
    adapter_config = json.loads((ckpt / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = base_for(adapter_config.get("base_model_name_or_path"), cfg)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8")
    load_tokenizer(cfg.model).save_pretrained(str(tmp))


def base_for(saved: object, cfg: RunConfig) -> object:
    """The base an exported adapter names: the checkpoint's, if it is an absolute path that exists here;
    else the run's model.path made absolute where it resolves (a checkpoint from before 0.2.0 kept a
    relative path as given, and a 4-bit builtin a deleted temporary dir)."""
    from dstrain.model.build import base_reference, model_dir

    if isinstance(saved, str) and Path(saved).is_absolute() and Path(saved).exists():
        return saved
    return base_reference(str(model_dir(cfg.model)))


def export_merged(ckpt: Path, cfg: RunConfig, tmp: Path) -> None:
    import warnings

    import torch
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from dstrain.model.build import DTYPES, load_base_model, load_tokenizer

    hf_logging.disable_progress_bar()  # a CLI that prints one line per export, not loader progress bars
    warnings.filterwarnings("ignore", category=FutureWarning)
    base = load_base_model(replace(cfg.model, dtype="fp32", load_in_4bit=False))
    merged = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    merged = merged.to(DTYPES[cfg.model.dtype])
    merged.config.use_cache = True  # off during training only; inference wants the KV cache
    with torch.no_grad():
        merged.save_pretrained(str(tmp), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(tmp))


def qlora_note(cfg: RunConfig, merge: bool) -> str:
    """What a user of an export from a 4-bit run must know: the base it trained on was NF4, not this one."""
    if merge:
        return (
            "QLoRA run (model.load_in_4bit): the adapter was merged into the un-quantised base weights in "
            f"fp32 and saved in {cfg.model.dtype}, not in 4-bit; outputs differ slightly from the 4-bit base + "
            "adapter used in training (the NF4 rounding of the base is gone)"
        )
    if (
        cfg.lora.init_lora_weights == "olora"
    ):  # the run trained on a re-quantised residual (model/variants.py)
        return (
            "QLoRA run with OLoRA: training ran on the re-quantised residual of the 4-bit base; this adapter "
            "is its plain-LoRA conversion, so on the 4-bit base its outputs differ from training by that "
            "re-quantisation (on the full-precision base, or merged, it is the trained update)"
        )
    return (
        "QLoRA run (model.load_in_4bit): the adapter was trained on a 4-bit NF4 base; load the base with "
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True) "
        "to reproduce training outputs exactly (it also works on the full-precision base)"
    )


def export_checkpoint(path: Path, out: Path, merge: bool) -> tuple[Path, list[str]]:
    """Export the checkpoint at PATH (a run dir: its newest valid one). Returns (checkpoint used, notes)."""
    found = find_checkpoint(Path(path))
    out = Path(out)
    check_out(out)
    cfg = run_config(found.path)
    notes = list(found.notes) + ([qlora_note(cfg, merge)] if cfg.model.load_in_4bit else [])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (checked above): atomic_dir renames the finished export into its place
        with atomic_dir(out) as tmp:
            (export_merged if merge else export_adapter)(found.path, cfg, tmp)
    except OSError as exc:
        raise DstrainError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable directory"
        ) from exc
    return found.path, notes
