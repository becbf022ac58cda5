"""Generation eval: answer scoring, the rank split that keeps ZeRO-3's ranks in step, and left-padded batched
greedy decoding that gives the same answers as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from dstrain.config.checks import check_values
from dstrain.config.run import LoraConfig, ModelConfig, RunConfig
from dstrain.data.batches import IGNORE, Example
from dstrain.data.pairs import PairExample
from dstrain.eval.generation import (
    GenerationEval,
    GenerationItem,
    evaluate_generation,
    exact_match,
    generation_items,
    greedy_answers,
    left_pad,
    normalize,
    rank_batches,
    token_f1,
)
from dstrain.model.build import build_model, load_tokenizer


def test_normalize_follows_squad():
    assert normalize("  The Lake,  Thuthek! ") == "lake thuthek"
    assert exact_match("lake thuthek.", "The Lake Thuthek") == 1.0
    assert exact_match("Lake Thuthe", "Lake Thuthek") == 0.0


def test_token_f1_partial_and_cjk():
    assert token_f1("Lake Thuthek", "Lake Thuthek") == 1.0
    assert token_f1("Lake Rorosk", "Lake Thuthek") == pytest.approx(0.5)
    assert token_f1("", "Lake Thuthek") == 0.0
    assert token_f1("", "") == 1.0
    # Chinese has no spaces: characters are the tokens, so a near miss earns partial credit
    assert token_f1("北京市", "北京") == pytest.approx(0.8)


def test_items_from_sft_examples_and_pairs():
    tok = load_tokenizer(ModelConfig())
    answer = tok(" Lake Thuthek", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok("Question: where?\nAnswer:")["input_ids"]
    sft = Example(prompt + answer, [IGNORE] * len(prompt) + answer)
    pair = PairExample(prompt, answer, tok(" no", add_special_tokens=False)["input_ids"])
    items = generation_items([sft, sft], tok, limit=1) + generation_items([pair], tok, limit=5)
    assert items == [GenerationItem(prompt, "Lake Thuthek")] * 2


@pytest.mark.parametrize(("n", "world", "batch"), [(7, 2, 3), (5, 3, 2), (1, 2, 4), (8, 2, 4)])
def test_rank_batches_score_every_item_once_with_equal_batch_counts(n, world, batch):
    items = [GenerationItem([i], str(i)) for i in range(n)]
    per_rank = [rank_batches(items, batch, rank, world) for rank in range(world)]
    # ZeRO-3 + synced_gpus: every rank must run as many generate calls, each on the same batch size
    assert len({len(b) for b in per_rank}) == 1
    assert len({tuple(len(chunk) for chunk, _ in b) for b in per_rank}) == 1
    scored = [item.gold for b in per_rank for chunk, real in b for item in chunk[:real]]
    assert sorted(scored, key=int) == [str(i) for i in range(n)]


def test_left_pad():
    """The tokenizer's own left padding (its default side is right): what the hand-written version gave."""
    tok = load_tokenizer(ModelConfig())
    pad = tok.pad_token_id
    ids, mask = left_pad(tok, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and mask.dtype == torch.long
    assert tok.padding_side == "right"  # padding_side per call: the training tokenizer is left alone


def test_batched_greedy_equals_one_prompt_at_a_time():
    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    model = build_model(ModelConfig(), LoraConfig(r=4, alpha=8, dropout=0.0), zero_stage=2).eval()
    texts = ["Background:\nThe river flows.\n\nQuestion: Where?\nAnswer:", "Question: Who?\nAnswer:", "Hi"]
    prompts = [tok(t)["input_ids"] for t in texts]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=8, synced=False)
    alone = [greedy_answers(model, tok, [p], max_new_tokens=8, synced=False)[0] for p in prompts]
    assert batched == alone
    assert any(answer.strip() for answer in alone)


def test_config_checks_for_generation():
    cfg = RunConfig()
    cfg.data.train = ["t.jsonl"]
    cfg.train.best_metric = "eval_exact_match"
    assert any("needs generated answers" in p for p in check_values(cfg))
    cfg.train.eval_generate = 16
    assert any("give data.eval" in p for p in check_values(cfg))
    cfg.data.eval = ["e.jsonl"]
    assert not [p for p in check_values(cfg) if "eval_generate" in p or "best_metric" in p]
    cfg.data.format = "messages"
    assert any("no single reference answer" in p for p in check_values(cfg))


def test_named_sets_score_their_own_answers_and_the_whole_counts_every_answer():
    """Each set's EM/F1 from its own items; the unnamed keys over all answers (not a mean of the sets)."""
    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    model = build_model(ModelConfig(), LoraConfig(r=4, alpha=8, dropout=0.0), zero_stage=2).eval()
    prompts = [tok(f"Question: what is {word}?\nAnswer:")["input_ids"] for word in ("up", "down", "left")]
    own = greedy_answers(model, tok, prompts, max_new_tokens=4, synced=False)
    # gold answers: the model's own for "rag" (all exact), another text for one of the two "general" ones
    rag = [GenerationItem(prompts[0], own[0])]
    general = [GenerationItem(prompts[1], own[1]), GenerationItem(prompts[2], own[2] + " Lake Thuthek")]
    gen = GenerationEval(tok, {"rag": rag, "general": general}, max_new_tokens=4, synced=False)
    result = evaluate_generation(model, gen, batch=2, rank=0, world=1)
    assert result["eval_exact_match/rag"] == 1.0 and result["eval_exact_match/general"] == 0.5
    assert result["eval_exact_match"] == pytest.approx(2 / 3)
    miss = token_f1(own[2], own[2] + " Lake Thuthek")
    assert result["eval_token_f1/general"] == pytest.approx((1 + miss) / 2)
    assert result["eval_token_f1"] == pytest.approx((2 + miss) / 3)
