"""Packing: rows within capacity, and no packed sample sees another (checked against separate forwards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dstrain
from dstrain.config.run import DataConfig
from dstrain.data.batches import IGNORE, Example, tokenize_record
from dstrain.data.loader import collate_micro
from dstrain.data.packing import block_causal_mask, collate_packed, plan_rows
from dstrain.data.records import read_file
from dstrain.model.supervised import SupervisedLM
from tests.helpers import lora_model

DATA = Path(dstrain.__file__).parent / "assets" / "data" / "sft_rag_train.jsonl"
PAD = 0


@pytest.fixture(scope="module")
def model():
    return lora_model(0.02).eval()  # non-zero LoRA B, so the adapter path is exercised too


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=96)
    records = [record for _, record in read_file(DATA, "sft-rag")][:6]
    out = [tokenize_record(tokenizer, record, cfg) for record in records]
    assert len({len(e.input_ids) for e in out}) > 2
    return out


@pytest.mark.parametrize(
    ("lengths", "capacity"), [([5, 3, 2, 7, 1], 8), ([4, 4, 4, 4], 8), ([9], 9), ([1] * 10, 3)]
)
def test_rows_hold_every_example_once_within_capacity(lengths, capacity):
    rows = plan_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert all(row == sorted(row) for row in rows)
    lower_bound = -(-sum(lengths) // capacity)
    assert len(rows) <= lower_bound + 1


def test_mask_is_block_diagonal_and_causal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -6]])
    mask = block_causal_mask(segments)[0, 0]
    assert mask.shape == (6, 6)
    assert mask[1, 0] and not mask[0, 1]  # causal inside a segment
    assert not mask[2, 1] and not mask[3, 0]  # nothing across segments
    assert mask[4, 2] and mask[4, 4]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself: no NaN rows


def test_packed_batch_layout(examples):
    batch = collate_packed(examples, PAD, capacity=256)
    rows, length = batch["input_ids"].shape
    assert rows < len(examples)
    assert batch["attention_mask"].shape == (rows, 1, length, length)
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] != PAD)
    assert int(starts.sum()) == len(examples)  # one position restart per sample
    assert (batch["labels"][starts] == IGNORE).all()  # never predicted from the previous sample
    real = sum(len(e.input_ids) for e in examples)
    assert int((batch["position_ids"] > 0).sum()) + len(examples) == real


@pytest.mark.numerics
def test_packed_samples_see_nothing_of_each_other(model, examples):
    """Each sample's logits inside a packed row equal its logits run alone (SPEC 5: position ids alone fail)."""
    base = model.get_base_model()
    batch = collate_packed(examples, PAD, capacity=256)
    with torch.no_grad():
        packed = base(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    found = 0
    for row in range(batch["input_ids"].shape[0]):
        positions = batch["position_ids"][row].tolist()
        starts = [p for p, pos in enumerate(positions) if pos == 0 and batch["input_ids"][row, p] != PAD]
        for start in starts:
            ids = batch["input_ids"][row, start:]
            n = next(
                len(e.input_ids)
                for e in examples
                if torch.equal(torch.tensor(e.input_ids), ids[: len(e.input_ids)])
            )
            with torch.no_grad():
                alone = base(input_ids=ids[None, :n]).logits[0]
            torch.testing.assert_close(packed[row, start : start + n], alone, rtol=1e-4, atol=1e-5)
            found += 1
    assert found == len(examples)
    # restarting position ids with a plain 2D mask do not isolate them: the check above has teeth
    with torch.no_grad():
        ones = torch.ones_like(batch["input_ids"])
        leaky = base(
            input_ids=batch["input_ids"], attention_mask=ones, position_ids=batch["position_ids"]
        ).logits
    assert not torch.allclose(leaky, packed, atol=1e-3)


@pytest.mark.numerics
def test_packed_loss_equals_padded_loss(model, examples):
    """Packing re-lays out the same micro batch: the summed NLL and the supervised token count are unchanged."""
    lm = SupervisedLM(model)
    padded = collate_micro(examples, PAD)
    packed = collate_micro(examples, PAD, pack_to=256)
    assert packed.tokens == padded.tokens and packed.samples == padded.samples == len(examples)
    assert packed.inputs["input_ids"].shape[0] < padded.inputs["input_ids"].shape[0]
    with torch.no_grad():
        nll_padded, n_padded = lm(**padded.inputs)
        nll_packed, n_packed = lm(**packed.inputs)
    assert int(n_packed) == int(n_padded) > 0
    torch.testing.assert_close(nll_packed, nll_padded, rtol=1e-5, atol=1e-4)


def test_a_micro_batch_of_only_bad_records_still_runs_a_forward(model):
    from dstrain.data.records import BadRecord

    bad = [BadRecord("d.jsonl", 3, "over-long record"), BadRecord("d.jsonl", 9, "over-long record")]
    for pack_to in (0, 64):
        micro = collate_micro(bad, PAD, pack_to=pack_to)
        assert (micro.tokens, micro.samples, micro.bad) == (0, 0, bad)
        with torch.no_grad():
            nll, n = SupervisedLM(model)(**micro.inputs)
        assert int(n) == 0 and float(nll) == 0.0
