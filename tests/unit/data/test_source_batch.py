"""Per-source loss attribution of a mixture's micro batch (data/source_batch.py, SupervisedLM's label_groups):
the groups follow each example into padded, packed and flat rows, the forward's per-source NLL sums add up
to its NLL sum and equal each source's examples scored in their own padded rows (transformers' own loss),
and a sequence-parallel slice carries the groups like the labels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dstrain.config.run import DataConfig
from dstrain.data.batches import IGNORE, tokenize_record
from dstrain.data.loader import collate_micro
from dstrain.data.pairs import tokenize_pair
from dstrain.data.records import RagRecord
from dstrain.distributed.sequence import shard_batch, shift_left
from dstrain.model.supervised import SupervisedLM
from tests.helpers import lora_model

CFG = DataConfig(max_seq_len=96, max_passage_tokens=40)
SOURCES = [0, 1, 0, 2, 1]


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = [
        RagRecord(f"What is item {i}?", (f"Item {i} is " + "very " * (3 * i) + "red.",), "red " * (i + 1))
        for i in range(len(SOURCES))
    ]
    return [
        replace(tokenize_record(tokenizer, r, CFG), source=s) for r, s in zip(records, SOURCES, strict=True)
    ]


@pytest.fixture(scope="module")
def model():
    peft_model = lora_model(0.02)
    peft_model.eval()
    return peft_model


@pytest.mark.parametrize("layout", ["padded", "packed", "flat"])
def test_groups_follow_each_example_into_its_rows(examples, layout):
    batch = collate_micro(
        examples, 0, pack_to=96 if layout == "packed" else 0, flat=layout == "flat", sources=3
    )
    labels, groups = batch.inputs["labels"], batch.sources.groups
    assert groups.shape == labels.shape
    # each example's labels, in order, are found under its own source
    for source in range(3):
        want = sorted(t for e in examples if e.source == source for t in e.labels[1:] if t != IGNORE)
        got = labels[:, 1:][(groups[:, 1:] == source) & (labels[:, 1:] != IGNORE)]
        assert sorted(got.tolist()) == want
    units = [sum(e.supervised for e in examples if e.source == s) for s in range(3)]
    assert batch.sources.units == units and sum(units) == (labels != IGNORE).sum().item()
    assert batch.sources.tokens == [
        sum(len(e.input_ids) for e in examples if e.source == s) for s in range(3)
    ]


def test_per_source_nll_adds_up_and_matches_each_source_alone(examples, model):
    lm = SupervisedLM(model, logits_chunk_tokens=32)
    with torch.no_grad():
        padded = collate_micro(examples, 0, sources=3)
        nll, _, by_source = lm(**padded.inputs, label_groups=padded.sources.groups, num_groups=3)
        packed = collate_micro(examples, 0, pack_to=96, sources=3)
        _, _, by_source_packed = lm(**packed.inputs, label_groups=packed.sources.groups, num_groups=3)
        for source in range(3):
            alone = collate_micro([e for e in examples if e.source == source], 0).inputs
            reference = model(**alone).loss * (alone["labels"] != IGNORE).sum()  # transformers' own mean
            assert by_source[source].item() == pytest.approx(reference.item(), rel=1e-5)
    assert by_source.sum().item() == pytest.approx(nll.item(), rel=1e-6)
    assert torch.allclose(by_source_packed, by_source, rtol=1e-5)


def test_pair_batches_count_pairs_and_tokens_per_source(tokenizer):
    pairs = [
        replace(
            tokenize_pair(tokenizer, RagRecord(f"q{i}?", ("p",), f"yes {i}", f"no {i}"), CFG), source=i % 2
        )
        for i in range(3)
    ]
    shared = collate_micro(pairs, 0, pairs=True, share_prompt=True, sources=2)
    assert shared.sources.groups.tolist() == [0, 1, 0] and shared.sources.units == [2, 1]
    assert sum(shared.sources.tokens) == shared.tokens
    empty = collate_micro([], 0, pairs=True, sources=2)  # the filler pair: no units anywhere
    assert empty.sources.units == [0, 0] and empty.sources.groups.tolist() == [0]


def test_a_sequence_parallel_slice_carries_the_groups_like_the_labels(examples):
    """SupervisedLM._sharded hands the groups to shard_batch as the SFT rows' label_rows: each rank's slice
    holds the group of each of its targets."""
    batch = collate_micro(examples, 0, sources=3)
    inputs, groups = batch.inputs, batch.sources.groups
    pieces = [
        shard_batch(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], None, groups, r, 2)
        for r in range(2)
    ]
    targets = torch.cat([p.targets for p in pieces], dim=1)[:, : groups.shape[1]]
    rows = torch.cat([p.target_rows for p in pieces], dim=1)[:, : groups.shape[1]]
    assert torch.equal(targets, shift_left(inputs["labels"], IGNORE))
    labelled = targets != IGNORE
    assert torch.equal(rows[labelled], shift_left(groups, 0)[labelled])
