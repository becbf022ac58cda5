"""data.share_prompt: prompt, chosen and rejected in one row must score every answer exactly as its own
padded row does (policy and reference, values and gradients), with the prompt computed once."""

from __future__ import annotations

import pytest
import torch

from dstrain.data.batches import IGNORE
from dstrain.data.loader import collate_micro
from dstrain.data.pairs import (
    PairExample,
    collate_pairs,
    collate_shared_pairs,
    tokenize_pair,
)
from dstrain.data.records import RagRecord
from dstrain.model.supervised import SupervisedLM
from tests.helpers import lora_model
from tests.unit.data.test_pairs import CFG, RECORDS


@pytest.fixture(scope="module")
def lm() -> SupervisedLM:
    peft_model = lora_model(0.02).eval()  # non-zero LoRA B: policy and reference must differ
    return SupervisedLM(peft_model, logits_chunk_tokens=7)


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[PairExample]:
    extra = RagRecord("Is it long?", (), "Yes, rather long indeed, and winding through the valley.", "No")
    return [tokenize_pair(tokenizer, record, CFG) for record in (*RECORDS, extra)]


def test_layout_prefix_then_two_branches(pairs, tokenizer):
    batch = collate_shared_pairs(pairs, pad_id=tokenizer.pad_token_id)
    pair, b, count = pairs[0], 0, len(pairs)
    prompt = pair.prompt_ids
    row = batch["input_ids"][b].tolist()
    n_prefix, n_chosen = len(prompt) - 1, 1 + len(pair.chosen_ids)
    assert row[: n_prefix + n_chosen] == prompt + pair.chosen_ids
    rejected_at = n_prefix + n_chosen
    assert row[rejected_at : rejected_at + 1 + len(pair.rejected_ids)] == [prompt[-1], *pair.rejected_ids]
    positions = batch["position_ids"][b].tolist()
    assert positions[rejected_at] == len(prompt) - 1  # the rejected branch continues from the prefix
    labelled = batch["labels"][b] != IGNORE
    assert batch["labels"][b][labelled].tolist() == pair.chosen_ids + pair.rejected_ids
    rows = batch["label_rows"][b][labelled].tolist()
    assert rows == [b] * len(pair.chosen_ids) + [count + b] * len(pair.rejected_ids)
    mask = batch["attention_mask"][b, 0]
    first_rejected = rejected_at + 1
    assert mask[first_rejected, :n_prefix].all()  # sees the prompt
    assert not mask[first_rejected, n_prefix:rejected_at].any()  # but not the chosen branch
    assert mask[rejected_at + 1, rejected_at]  # and its own branch


@pytest.mark.numerics
def test_every_answer_scores_as_in_its_own_row(lm, pairs, tokenizer):
    shared = collate_shared_pairs(pairs, pad_id=tokenizer.pad_token_id)
    padded = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        policy_s, reference_s, tokens_s = lm(**shared, pairs=True)
        policy_p, reference_p, tokens_p = lm(**padded, pairs=True)
    assert tokens_s.tolist() == tokens_p.tolist()
    assert (policy_s - reference_s).abs().max() > 1e-4  # the adapter changes something
    torch.testing.assert_close(policy_s, policy_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_s, reference_p, rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_gradients_match_the_padded_layout(lm, pairs, tokenizer):
    grads = []
    for batch in (
        collate_shared_pairs(pairs, pad_id=tokenizer.pad_token_id),
        collate_pairs(pairs, pad_id=tokenizer.pad_token_id),
    ):
        lm.zero_grad()
        policy, _, _ = lm(**batch, pairs=True, reference=False)
        half = len(pairs)
        (policy[:half] - 0.5 * policy[half:]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    lm.zero_grad()
    shared, padded = grads
    assert shared.keys() == padded.keys() and shared
    for name in padded:
        # fp32 sums in another order: tolerance relative to the tensor's largest entry
        scale = padded[name].abs().max().item()
        torch.testing.assert_close(shared[name], padded[name], rtol=1e-4, atol=1e-4 * scale)


def test_shared_rows_run_fewer_tokens(pairs, tokenizer):
    pad = tokenizer.pad_token_id
    shared = collate_micro(pairs, pad, pairs=True, share_prompt=True)
    padded = collate_micro(pairs, pad, pairs=True)
    prompts = sum(len(p.prompt_ids) for p in pairs)
    assert padded.tokens - shared.tokens == prompts - len(pairs)  # each prompt once, plus its last token
    assert shared.samples == padded.samples == len(pairs)


def test_a_filler_pair_scores_zero(lm, tokenizer):
    batch = collate_micro([], tokenizer.pad_token_id, pairs=True, share_prompt=True)
    with torch.no_grad():
        policy, reference, tokens = lm(**batch.inputs, pairs=True)
    assert policy.tolist() == reference.tolist() == [0.0, 0.0] and tokens.tolist() == [0, 0]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_shared_pairs([PairExample([], [5], [6])], pad_id=0)
