"""Tiny random-init models of each causal-LM family, written by transformers itself, as a user's model dir.

`write_family(name, path)` builds `AutoConfig.for_model(model_type, ...)` with tiny dimensions (the
family's own config fields, e.g. soft-capping or logit scaling, at non-neutral values so a head that
ignored them would be caught), initialises it from a fixed seed, and saves it with the bundled tokenizer
(vocab 2048). Nothing is downloaded. `FAMILIES` is the model-family matrix: the README's "Supported models"
table is generated from it (`python -m tests.families --table`), so the table cannot drift from the tests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dstrain.config.run import ModelConfig
from dstrain.model.build import load_tokenizer

VOCAB = 2048  # the bundled tokenizer's
TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)
MLA: dict[str, Any] = dict(
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclass(frozen=True)
class Family:
    """One row of the matrix: the transformers model_type, its tiny config overrides, and what it shows."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    moe: bool = False
    lora: dict[str, Any] = field(default_factory=dict)  # an adapter variant's lora keys (model/variants.py)

    @property
    def dense(self) -> bool:
        return not self.moe

    @property
    def four_bit(self) -> bool:
        """Whether the QLoRA step runs: dense, and not PiSSA (PEFT refuses it on 4-bit weights)."""
        return self.dense and not str(self.lora.get("init_lora_weights", "")).startswith("pissa")


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "mistral": Family("mistral"),
    "phi3": Family("phi3"),
    "olmo2": Family("olmo2"),
    "glm4": Family("glm4"),
    "gemma2": Family(
        "gemma2",
        {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True},
        "final logit soft-capping; eager attention (transformers refuses sdpa)",
    ),
    "gemma3_text": Family(
        "gemma3_text", {"tie_word_embeddings": True}, "no soft-capping (the Gemma-3 default)"
    ),
    "gemma3_text-softcap": Family(
        "gemma3_text",
        {"final_logit_softcapping": 30.0, "tie_word_embeddings": True},
        "final logit soft-capping",
    ),
    "minicpm3": Family(
        "minicpm3",
        {**MLA, "scale_emb": 12, "dim_model_base": 16, "scale_depth": 1.4, "tie_word_embeddings": True},
        "hidden states scaled by dim_model_base / hidden_size before the head; MLA attention",
    ),
    "granite": Family(
        "granite",
        {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22},
        "logits divided by logits_scaling",
    ),
    "cohere": Family(
        "cohere", {"logit_scale": 0.0625, "tie_word_embeddings": True}, "logits multiplied by logit_scale"
    ),
    # adapter variants on a plain family: the same checks, with the variant's lora keys
    "llama-dora": Family("llama", note="DoRA (`lora.use_dora: true`)", lora={"use_dora": True}),
    "qwen2-pissa": Family(
        "qwen2",
        note="PiSSA init (`lora.init_lora_weights: pissa`); PEFT refuses PiSSA on 4-bit weights",
        lora={"init_lora_weights": "pissa"},
    ),
    "qwen3_moe": Family("qwen3_moe", {**MOE, "decoder_sparse_step": 1}, "4 experts, top-2", moe=True),
    "mixtral": Family(
        "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "4 experts, top-2", moe=True
    ),
    "deepseek_v2": Family(
        "deepseek_v2",
        {
            **MLA,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
        },
        "DeepSeek-V2-Lite shape: MLA attention, 1 dense + 1 MoE layer, a shared expert",
        moe=True,
    ),
}


# Families also trained on 2 ranks with these shipped ZeRO JSONs (tests/distributed/test_families_zero3.py,
# tests/distributed/test_moe_zero.py): the table's ZeRO column comes from here.
TWO_RANKS: dict[str, tuple[str, ...]] = {
    "gemma2": ("zero3",),
    "minicpm3": ("zero3_offload",),
    "qwen3_moe": ("zero2", "zero3"),
    "deepseek_v2": ("zero3",),
}


def family_config(name: str, **extra: Any):
    """The tiny transformers config of one family (its own config class, from `AutoConfig.for_model`)."""
    family = FAMILIES[name]
    return AutoConfig.for_model(family.model_type, **{**TINY, **family.overrides, **extra})


def write_family(name: str, path: Path, seed: int = 0, **extra: Any) -> Path:
    """A model dir as a user brings one: config.json, model.safetensors and the tokenizer, at `path`."""
    config = family_config(name, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    load_tokenizer(ModelConfig()).save_pretrained(path)
    return path


TABLE_HEADER = (
    "| family (model_type) | model class | log-probs at the defaults | 2 ranks in CI | QLoRA step | notes |\n"
    "|---|---|---|---|---|---|"
)


def table_row(name: str) -> str:
    from dstrain.model.families import choose_path

    family = FAMILIES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_config(name))
    path = choose_path(model, "auto")
    head = (
        f"{path.kind} head: {path.transform.describe()}" if path.kind == "chunked" else "exact (own forward)"
    )
    ranks = ", ".join(ds.replace("_", " + ").replace("zero", "ZeRO-") for ds in TWO_RANKS.get(name, ()))
    qlora = "yes" if family.four_bit else "refused (config error)" if family.dense else "not tested"
    return f"| {name} (`{family.model_type}`) | {type(model).__name__} | {head} | {ranks or '-'} | {qlora} | {family.note} |"


def table() -> str:
    """The README's "Supported models" table, from the matrix the tests run."""
    return "\n".join([TABLE_HEADER, *(table_row(name) for name in FAMILIES)])


# The matrix's data shape: a RAG prompt of up to 256 tokens, passages cut at 160 (dstrain's own tokenising)
DATA_LIMITS = {"max_seq_len": 256, "max_passage_tokens": 160}


def repeated_record_files(root: Path) -> dict[str, Path]:
    """Train: one sft-rag record 8 times (the first step's loss is that record's; the loss must fall on
    it). Eval: 4 other records."""
    from dstrain.config.demo import asset

    first = Path(asset("data", "sft_rag_train.jsonl")).read_text(encoding="utf-8").splitlines()[0]
    evals = Path(asset("data", "sft_rag_eval.jsonl")).read_text(encoding="utf-8").splitlines()[:4]
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    files["train"].write_text("\n".join([first] * 8) + "\n", encoding="utf-8")
    files["eval"].write_text("\n".join(evals) + "\n", encoding="utf-8")
    return files


def own_loss(
    model: torch.nn.Module,
    model_dir: Path,
    path: Path,
    trust_remote_code: bool = False,
    limits: dict[str, int] | None = None,
) -> float:
    """The model's own `labels=` loss over the sft-rag records of `path`, token-weighted like dstrain's eval,
    on the tokens dstrain's data path makes of them (`limits`: the run's data limits, DATA_LIMITS unless
    given)."""
    from dstrain.config.run import DataConfig
    from dstrain.data.batches import IGNORE, tokenize_record
    from dstrain.data.records import parse_text

    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir), trust_remote_code=trust_remote_code))
    data = DataConfig(**(limits or DATA_LIMITS))
    total = count = 0.0
    with torch.no_grad():
        for line in path.read_text(encoding="utf-8").splitlines():
            example = tokenize_record(tokenizer, parse_text(line, "sft-rag"), data)
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def main(argv: list[str]) -> None:
    """`--table`: the README table. `--check`: every family builds and runs a forward (after an upgrade)."""
    if "--table" in argv:
        print(table())
        return
    for name in FAMILIES:
        model = AutoModelForCausalLM.from_config(family_config(name))
        ids = torch.randint(4, VOCAB, (1, 8))
        print(name, type(model).__name__, float(model(input_ids=ids, labels=ids).loss))


if __name__ == "__main__":
    main(sys.argv[1:])
