"""SupervisedLM's (nll_sum, n) against plain transformers' loss on the bundled tiny model; LoRA-only grads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dstrain
from dstrain.config.run import DataConfig, LoraConfig, ModelConfig
from dstrain.data.batches import IGNORE, collate, tokenize_record
from dstrain.model.build import build_model
from dstrain.model.head import target_logps
from dstrain.model.supervised import SupervisedLM
from dstrain.objectives.losses import sft_loss
from tests.helpers import lora_model, ulps_at_largest
from tests.numerics import assert_tensors_close
from tests.unit.data.loaded import load_records

DATA = Path(dstrain.__file__).parent / "assets" / "data" / "sft_rag_train.jsonl"
# LoRA gradients (largest entries 4e-3 to 9e-2 here) computed in another summation order: an entry near zero
# carries the rounding of the terms that cancelled in it, so the absolute part of the bound follows each
# tensor's largest entry. Measured: identical for transformers' loss, and up to 4.7e-6 x max|grad| (about
# 40-80 ulps) for the chunked head; 256 ulps (1.5e-5 to 3e-5 x max) is about the old fixed 1e-7 at 1e-2.
GRAD_ULPS = 256


@pytest.fixture(scope="module")
def model():
    peft_model = lora_model(0.02)
    peft_model.eval()  # no dropout anywhere: both paths must see the same function
    return peft_model


@pytest.fixture(scope="module")
def batch(tokenizer):
    loaded = load_records([DATA], "sft-rag")
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=128)
    examples = [tokenize_record(tokenizer, record, cfg) for record in loaded.records[:3]]
    assert len({len(e.input_ids) for e in examples}) > 1, "want rows of different lengths (padding)"
    return collate(examples, pad_id=tokenizer.pad_token_id)


def _zero_grads(model) -> None:
    for param in model.parameters():
        param.grad = None


def test_loss_matches_plain_transformers(model, batch):
    with torch.no_grad():
        nll_sum, n = SupervisedLM(model)(**batch)
        reference = model(**batch).loss
    expected_n = (batch["labels"][:, 1:] != IGNORE).sum()
    assert n.item() == expected_n.item() > 0
    assert n.item() == (batch["labels"] != IGNORE).sum().item()  # position 0 is prompt, never labelled
    loss = sft_loss(nll_sum, n)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_gradients_match_plain_transformers_and_reach_only_lora(model, batch):
    wrapped = SupervisedLM(model)
    _zero_grads(model)
    nll_sum, n = wrapped(**batch)
    sft_loss(nll_sum, n).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    _zero_grads(model)
    model(**batch).loss.backward()
    theirs = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    _zero_grads(model)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert set(ours) == trainable == set(theirs)
    assert any(g.abs().sum() > 0 for name, g in ours.items() if "lora_A" in name)
    assert any(g.abs().sum() > 0 for name, g in ours.items() if "lora_B" in name)
    for name in trainable:
        torch.testing.assert_close(
            ours[name], theirs[name], rtol=1e-4, atol=ulps_at_largest(theirs[name], GRAD_ULPS)
        )


def test_frozen_base_params_get_no_gradient(model, batch):
    _zero_grads(model)
    nll_sum, n = SupervisedLM(model)(**batch)
    (nll_sum / n).backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    _zero_grads(model)


def test_padding_does_not_change_the_loss(model, batch, tokenizer):
    wrapped = SupervisedLM(model)
    with torch.no_grad():
        together, n_together = wrapped(**batch)
        apart = torch.zeros(())
        n_apart = 0
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            single = {k: v[row : row + 1, :length] for k, v in batch.items()}
            nll, n = wrapped(**single)
            apart += nll
            n_apart += int(n)
    assert int(n_together) == n_apart
    assert together.item() == pytest.approx(apart.item(), rel=1e-5)


def test_no_supervised_tokens_gives_zero_loss_with_a_graph(model, batch):
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    _zero_grads(model)
    nll_sum, n = SupervisedLM(model)(**empty)
    assert n.item() == 0
    loss = sft_loss(nll_sum, n)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()  # every rank must still be able to run backward
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
    _zero_grads(model)


def _head(vocab: int = 13, hidden: int = 5) -> torch.nn.Linear:
    return torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)


def test_sft_loss_with_zero_tokens_keeps_grad_fn():
    hidden = torch.randn(0, 5, requires_grad=True)
    nll_sum = -target_logps(_head(), hidden, torch.zeros(0, dtype=torch.long), chunk=4).sum()
    loss = sft_loss(nll_sum, torch.tensor(0))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 5)


def test_sft_loss_is_the_mean_token_nll():
    generator = torch.Generator().manual_seed(0)
    head = _head().to(torch.bfloat16)
    hidden = torch.randn(7, 5, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 13, (7,), generator=generator)
    logps = target_logps(head, hidden, targets, chunk=0)
    assert logps.dtype == torch.float32  # computed in fp32 whatever the logits dtype
    expected = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    assert sft_loss(-logps.sum(), torch.tensor(7)).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [1, 3, 7, 20, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_gives_the_same_log_probs_and_gradients(chunk, bias):
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(20, 8, generator=generator)
    targets = torch.randint(0, 50, (20,), generator=generator)
    weights = torch.rand(20, generator=generator)  # an upstream gradient that differs per position
    results = []
    for size in (0, chunk):  # 0: transformers-style cross-entropy on the whole logits
        leaf = hidden.clone().requires_grad_(True)
        logps = target_logps(head, leaf, targets, chunk=size)
        (logps * weights).sum().backward()
        results.append((logps.detach(), leaf.grad))
    (full, full_grad), (chunked, chunked_grad) = results
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    assert_tensors_close(chunked_grad, full_grad, 1e-5, f"chunk {chunk}: hidden-state gradient")  # by norm


def test_a_trainable_head_is_called_as_a_module_and_gets_its_gradient():
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(12, 8, requires_grad=True)
    target_logps(head, hidden, torch.randint(0, 50, (12,)), chunk=4).sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None


def test_chunked_head_in_bf16_stays_close_to_fp32():
    generator = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 16, generator=generator)
    targets = torch.randint(0, 300, (40,), generator=generator)
    exact = target_logps(head, hidden, targets, chunk=0)
    low = target_logps(head.to(torch.bfloat16), hidden.to(torch.bfloat16), targets, chunk=16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0.02, atol=0.05)


def _largest_saved_for_backward(fn) -> int:
    """The element count of the largest tensor autograd keeps for backward while `fn` runs."""
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return largest


def test_chunked_head_never_keeps_the_full_logits():
    vocab, positions, chunk = 4000, 96, 16
    head = _head(vocab=vocab, hidden=8)
    hidden = torch.randn(positions, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    full = _largest_saved_for_backward(lambda: target_logps(head, hidden, targets, chunk=0).sum().backward())
    chunked = _largest_saved_for_backward(
        lambda: target_logps(head, hidden, targets, chunk=chunk).sum().backward()
    )
    assert full >= positions * vocab  # the whole [K, vocab] logits are kept
    assert chunked <= chunk * vocab  # at most one chunk's, recomputed in backward


@pytest.mark.numerics
def test_model_loss_and_gradients_are_the_same_with_a_small_chunk(model, batch):
    results = []
    for chunk in (0, 5):
        _zero_grads(model)
        nll_sum, n = SupervisedLM(model, logits_chunk_tokens=chunk)(**batch)
        sft_loss(nll_sum, n).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((nll_sum.detach(), grads))
    _zero_grads(model)
    (full, full_grads), (chunked, chunked_grads) = results
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(
            chunked_grads[name], grad, rtol=1e-4, atol=ulps_at_largest(grad, GRAD_ULPS)
        )


def test_builtin_model_is_identical_on_every_build(model):
    again = build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)
    base_a = dict(model.get_base_model().named_parameters())
    for name, param in again.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_a[name]), name
