"""The one random-init model writer of the benchmarks: a seeded Qwen2- or Llama-shaped HF dir with the bundled
tokenizer, which every framework loads with from_pretrained (sft/dpo/loop/memory/checkpoint benches, gpu/).

The dir is written under a temporary name and renamed into place once complete, with a stamp written last:
a dir that exists with its stamp is whole (a killed writer leaves only a `.partial-*` dir behind).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = REPO / "dstrain" / "assets" / "tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
STAMP = "bench_model.json"


def model_config(
    shape: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int = 0,
    kv_heads: int = 0,
    max_positions: int = 4096,
) -> Any:
    """A Qwen2- or Llama-shaped config; heads default to head_dim 64 and 4x GQA (at least one KV head)."""
    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or max(1, heads // 4)
    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,  # TinyLlama's 5632 at hidden 2048
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5 if shape == "llama" else 1e-6,
        "tie_word_embeddings": False,
        "use_cache": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    if shape == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def model_ready(out: Path, spec: dict[str, Any] | None = None) -> bool:
    """True when `out` holds a complete model dir (its stamp, written last), of `spec` when given."""
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    return spec is None or json.loads(stamp.read_text(encoding="utf-8")) == spec


def write_model(
    out: Path,
    shape: str,
    vocab: int,
    hidden: int,
    layers: int,
    dtype: str = "fp32",
    seed: int = 0,
    heads: int = 0,
    kv_heads: int = 0,
    max_positions: int = 4096,
) -> Path:
    """Random-init weights (seeded) + the bundled tokenizer: one dir every framework loads with from_pretrained.

    The model's vocab may exceed the tokenizer's 2,048 ids: ids stay below it, only the embedding and the
    output head grow, which is what a realistic vocabulary costs per token.
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = {
        "shape": shape,
        "vocab": vocab,
        "hidden": hidden,
        "layers": layers,
        "dtype": dtype,
        "seed": seed,
        "heads": heads,
        "kv_heads": kv_heads,
    }
    if max_positions != 4096:  # left out at the default, so dirs built before the option still match
        spec["max_positions"] = max_positions
    if model_ready(out, spec):
        return out  # built by an earlier run of the same spec
    torch.manual_seed(seed)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = model_config(shape, vocab, hidden, layers, heads, kv_heads, max_positions)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    # built on the GPU when there is one: a 1B random init on CPU takes most of a minute
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.save_pretrained(partial, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (TINY / name).is_file():
            shutil.copy(TINY / name, partial / name)
    (partial / STAMP).write_text(json.dumps(spec), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)  # a stale or other-spec dir
    partial.rename(out)
    return out


def count_params(model_dir: Path) -> int:
    """All parameters of the base model in `model_dir` (from the config, without loading weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
