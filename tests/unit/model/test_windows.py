"""Sliding windows under packed rows and shared-prompt pairs: each family's log-probs equal transformers'
own forward on each record's own row (the reference a user gets at inference), and the first-batch
self-check stops a batch whose mask does not give them.

Tiny random-init models of each family in model/windows.py's table, with an 8-token window shorter than
every prompt here (13 to 27 tokens), fp32, LoRA B non-zero so policy and reference differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from dstrain.config.run import load_config
from dstrain.data.batches import IGNORE, Example
from dstrain.data.packing import collate_packed, plan_rows
from dstrain.data.pairs import PairExample, collate_shared_pairs
from dstrain.errors import ConfigError
from dstrain.model import selfcheck, windows
from dstrain.model.supervised import SupervisedLM
from dstrain.training.prepare import check_attention
from tests.families import MOE, TINY

WINDOW = 8
SLIDE = windows.SLIDING
FULL = windows.FULL
REL = 1e-5
# name -> (model_type, config overrides): a window of WINDOW tokens on top of tests/families.py's TINY
WINDOWED: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "mistral-eager": ("mistral", {"sliding_window": WINDOW, "attn_implementation": "eager"}),
    "phi3": ("phi3", {"sliding_window": WINDOW}),
    # Gemma-2's default pattern alternates: layer 0 slides, layer 1 attends globally (eager attention)
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("gemma3_text", {"sliding_window": WINDOW, "layer_types": [SLIDE, FULL]}),
    "cohere2": ("cohere2", {"sliding_window": WINDOW, "layer_types": [SLIDE, FULL]}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mixtral": ("mixtral", {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW, **MOE}),
}
ACCEPTANCE = ["mistral", "phi3", "gemma2", "gemma3_text"]


def windowed_lm(name: str) -> SupervisedLM:
    model_type, overrides = WINDOWED[name]
    config = AutoConfig.for_model(model_type, **{**TINY, "tie_word_embeddings": True, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(param_name)))
    lm = SupervisedLM(peft_model).eval()
    assert lm.kinds.sliding and lm.kinds.window == WINDOW
    return lm


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sft_examples() -> list[Example]:
    """Three records, prompt (no labels) then answer, of lengths that pack two into one 64-token row."""
    examples = []
    for seed, (prompt, answer) in enumerate([(15, 5), (9, 4), (18, 9)]):
        tokens = ids(prompt + answer, seed)
        examples.append(Example(tokens, [IGNORE] * prompt + tokens[prompt:]))
    return examples


def own_row_logps(peft_model: Any, tokens: list[int]) -> torch.Tensor:
    """log p(token t+1 | tokens[:t+1]) [n-1] from transformers' own forward on the record alone."""
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.mark.parametrize("name", list(WINDOWED))
def test_packed_rows_score_each_record_as_its_own_row(name: str):
    lm = windowed_lm(name)
    examples = sft_examples()
    batch = collate_packed(examples, pad_id=TINY["pad_token_id"], capacity=64)
    assert batch["input_ids"].shape[0] < len(examples)  # some row holds two records
    width = batch["labels"].shape[1]
    expected: dict[int, torch.Tensor] = {}
    for row, members in enumerate(plan_rows([len(e.input_ids) for e in examples], 64)):
        at = 0
        for i in members:
            example = examples[i]
            logps = own_row_logps(lm.peft_model, example.input_ids)
            for t, label in enumerate(example.labels[1:]):
                if label != IGNORE:
                    expected[row * width + at + t] = logps[t]
            at += len(example.input_ids)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    with torch.no_grad():
        logps, index, _ = lm._labelled_logps(*inputs)
    assert sorted(index.tolist()) == sorted(expected)
    torch.testing.assert_close(logps, torch.stack([expected[int(i)] for i in index]), rtol=REL, atol=REL)
    with torch.no_grad():  # and the self-check sees nothing wrong
        head, rows, _, count = lm(**batch, check=True)
    assert int(count) > 0 and float(head) < REL and float(rows) < REL


def shared_pairs() -> list[PairExample]:
    return [
        PairExample(ids(16, 10), ids(5, 11), ids(9, 12)),
        PairExample(ids(13, 20), ids(8, 21), ids(3, 22)),
    ]


@pytest.mark.parametrize("name", ACCEPTANCE)
def test_shared_prompt_pairs_score_each_answer_as_its_own_row(name: str):
    lm = windowed_lm(name)
    pairs = shared_pairs()
    batch = collate_shared_pairs(pairs, pad_id=TINY["pad_token_id"])
    with torch.no_grad():
        policy, reference = lm(**batch, pairs=True)[:2]
    answers = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]

    def summed(prompt: list[int], answer: list[int]) -> torch.Tensor:
        return own_row_logps(lm.peft_model, prompt + answer)[len(prompt) - 1 :].sum()

    own_policy = torch.stack([summed(*a) for a in answers])
    with lm.peft_model.disable_adapter():
        own_reference = torch.stack([summed(*a) for a in answers])
    assert (own_policy - own_reference).abs().max() > 1e-4  # the adapter changes something
    torch.testing.assert_close(policy, own_policy, rtol=REL, atol=REL)
    torch.testing.assert_close(reference, own_reference, rtol=REL, atol=REL)
    with torch.no_grad():
        head, rows, _, count = lm(**batch, check=True)
    assert int(count) > 0 and float(head) < REL and float(rows) < REL


def check_numbers(lm: SupervisedLM, batch: dict[str, torch.Tensor]) -> None:
    """The self-check's verdicts on `batch`, as training/loop.py runs them on one rank."""
    with torch.no_grad():
        head, rows, largest, count = lm(**batch, check=True)
    name = type(lm.peft_model.get_base_model()).__name__
    selfcheck.verdict(float(head), float(largest), int(count), torch.float32, name)
    selfcheck.rows_verdict(
        float(rows), float(largest), int(count), torch.float32, name, selfcheck.layout(batch)
    )


def test_the_self_check_stops_a_packed_batch_that_misses_the_window(monkeypatch: pytest.MonkeyPatch):
    lm = windowed_lm("mistral")
    batch = collate_packed(sft_examples(), pad_id=TINY["pad_token_id"], capacity=64)
    check_numbers(lm, batch)  # the masks as built pass
    everything = lambda positions, window: torch.ones((), dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr(windows, "in_window", everything)  # the defect this check was built for
    with pytest.raises(ConfigError, match=r"data\.packing: the log-probs of MistralForCausalLM") as caught:
        check_numbers(lm, batch)
    assert "own padded row" in str(caught.value) and "data.packing=false" in str(caught.value)


def test_the_self_check_stops_shared_pairs_whose_branches_see_each_other():
    lm = windowed_lm("gemma3_text")
    batch = collate_shared_pairs(shared_pairs(), pad_id=TINY["pad_token_id"])
    check_numbers(lm, batch)
    width = batch["input_ids"].shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand_as(batch["attention_mask"])
    with pytest.raises(ConfigError, match=r"data\.share_prompt: the log-probs of Gemma3ForCausalLM"):
        check_numbers(lm, {**batch, "attention_mask": causal})  # the rejected answer sees the chosen one


def test_own_rows_rebuilds_each_answer_from_the_position_ids():
    pairs = shared_pairs()
    batch = collate_shared_pairs(pairs, pad_id=TINY["pad_token_id"])
    width = batch["labels"].shape[1]
    pair, b = pairs[1], 1
    rejected_at = len(pair.prompt_ids) + len(pair.chosen_ids)  # the rejected branch's repeated prompt token
    picked = torch.tensor([b * width + rejected_at + 1, b * width + 1, b * width + rejected_at])
    rows, mask, index = selfcheck.own_rows(batch["input_ids"], batch["position_ids"], picked)
    own = pair.prompt_ids + pair.rejected_ids[:1]
    assert rows[0, : len(own)].tolist() == own and int(mask[0].sum()) == len(own)  # rejected, up to t
    assert rows[1, :2].tolist() == pair.prompt_ids[:2]  # the prompt's own record (the chosen branch's run)
    assert index.tolist() == [len(pair.prompt_ids), 1 * rows.shape[1] + 1, len(pair.prompt_ids) - 1]


@pytest.mark.parametrize(
    ("model_type", "overrides", "why"),
    [
        ("olmo3", {"sliding_window": WINDOW}, "no per-layer mask entry"),
        ("llama4_text", {"attention_chunk_size": 16}, "chunked attention"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional attention"),
        ("qwen3_next", {}, "linear_attention layers"),
    ],
)
def test_attention_no_record_mask_expresses_is_named(model_type: str, overrides: dict, why: str):
    kinds = windows.layer_kinds(AutoConfig.for_model(model_type, **overrides))
    assert kinds.problem is not None and why in kinds.problem


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("qwen2", {}), ("gemma2", {}), ("mistral", {"sliding_window": None})],
)
def test_models_dstrain_can_mask_raise_nothing(model_type: str, overrides: dict):
    assert windows.layer_kinds(AutoConfig.for_model(model_type, **overrides)).problem is None


def run_config(model_dir: Path, *overrides: str):
    return load_config(None, ["data.train=train.jsonl", f"model.path={model_dir}", *overrides])


def test_packing_and_shared_prompts_are_refused_before_training_where_no_mask_expresses_the_attention(
    tmp_path: Path,
):
    """Olmo-3 alternates sliding and full layers, and dstrain's table has no entry for how its decoder takes
    per-layer masks: the 4-D layouts are refused from its config.json (training/prepare.py), the flat
    flash-attention row (whose kernels apply each layer's window themselves) and padded rows are not."""
    AutoConfig.for_model("olmo3", sliding_window=WINDOW).save_pretrained(tmp_path / "olmo3")
    model_dir = tmp_path / "olmo3"
    problems = check_attention(run_config(model_dir, "data.packing=true"))
    assert len(problems) == 1 and problems[0].startswith("data.packing: ")
    assert "sliding-window layers" in problems[0] and "set data.packing=false" in problems[0]
    preference = run_config(model_dir, "data.format=preference", "objective.name=dpo")
    assert check_attention(preference)[0].startswith("data.share_prompt: ")
    assert check_attention(run_config(model_dir, "data.format=preference", "data.share_prompt=false")) == []
    flash = run_config(model_dir, "data.packing=true", "model.attn_implementation=flash_attention_2")
    assert check_attention(flash) == []

    AutoConfig.for_model("llama4_text", attention_chunk_size=16).save_pretrained(tmp_path / "llama4")
    llama4 = run_config(
        tmp_path / "llama4", "data.packing=true", "model.attn_implementation=flash_attention_2"
    )
    (problem,) = check_attention(llama4)
    assert problem.startswith("data.packing: ") and "chunked attention" in problem
