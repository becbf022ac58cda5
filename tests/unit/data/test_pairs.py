"""Preference pairs: tokenisation shared with SFT, 2B-row collation, per-row answer log-probs on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dstrain
from dstrain.config.run import DataConfig, LoraConfig, ModelConfig
from dstrain.data.batches import IGNORE, tokenize_rag
from dstrain.data.pairs import PairExample, answer_logps, collate_pairs, split_pair, tokenize_pair
from dstrain.data.records import RagRecord, read_file
from dstrain.model.build import build_model

PASSAGES = (
    "The river Quodalam flows into Lake Thuthek. The Quodalam is a winding river lined with willows.",
    "The river Tafadresh flows into Lake Saehan.",
)
QUERY = "Into which lake does the river Quodalam flow?"
CFG = DataConfig(max_seq_len=256, max_passage_tokens=64)
DATA = Path(dstrain.__file__).parent / "assets" / "data" / "preference_train.jsonl"

# Chosen and rejected of clearly different lengths, in both directions, and prompts of different lengths.
RECORDS = (
    RagRecord(
        QUERY, PASSAGES, "Lake Thuthek", "It flows into Lake Saehan, far past the willows and the mills."
    ),
    RagRecord("Where does it flow?", PASSAGES[1:], "Into Lake Saehan, after the long valley.", "Nowhere"),
    RagRecord("Which lake?", (), "Thuthek", "Lake Saehan, I believe"),
)


@pytest.fixture(scope="module")
def model():
    peft_model = build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)
    peft_model.eval()  # no dropout: the batched and the one-row forwards must compute the same function
    return peft_model


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[PairExample]:
    return [tokenize_pair(tokenizer, record, CFG) for record in RECORDS]


def _labelled(row: list[int]) -> list[int]:
    return [label for label in row if label != IGNORE]


def _reference_logp(logits: torch.Tensor, ids: list[int], prompt_len: int) -> float:
    """Plain loop: sum over answer positions t of log_softmax(logits[t-1])[ids[t]]."""
    logps = torch.log_softmax(logits.double(), dim=-1)
    return sum(logps[t - 1, ids[t]].item() for t in range(prompt_len, len(ids)))


# ------------------------------------------------------------------------------------------ tokenize


def test_chosen_row_equals_the_sft_example(tokenizer):
    for cfg in (CFG, DataConfig(max_seq_len=256, max_passage_tokens=64, chat_template=True)):
        for record in RECORDS:
            pair = tokenize_pair(tokenizer, record, cfg)
            sft = tokenize_rag(tokenizer, record, cfg)
            assert pair.chosen() == sft
            assert pair.chosen().input_ids == pair.prompt_ids + pair.chosen_ids


def test_rejected_row_is_the_same_prompt_with_the_rejected_answer(tokenizer, pairs):
    for record, pair in zip(RECORDS, pairs, strict=True):
        as_sft = tokenize_rag(tokenizer, RagRecord(record.query, record.passages, record.rejected), CFG)
        assert pair.rejected() == as_sft
        assert pair.rejected_ids[-1] == pair.chosen_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(pair.rejected_ids) == " " + record.rejected + tokenizer.eos_token


def test_each_answer_is_cut_on_its_own_to_fit(tokenizer):
    record = RECORDS[0]
    full = tokenize_pair(tokenizer, record, CFG)
    room = len(full.chosen_ids)  # the chosen answer fits exactly, the longer rejected one does not
    assert room < len(full.rejected_ids)
    cfg = DataConfig(max_seq_len=len(full.prompt_ids) + room, max_passage_tokens=64)
    pair = tokenize_pair(tokenizer, record, cfg)
    assert pair.prompt_ids == full.prompt_ids
    assert pair.chosen_ids == full.chosen_ids  # kept whole, EOS included
    assert pair.rejected_ids == full.rejected_ids[:room]  # cut: no EOS
    assert len(pair.chosen().input_ids) == len(pair.rejected().input_ids) == cfg.max_seq_len


def test_over_long_prompt_is_an_error(tokenizer):
    prompt_len = len(tokenize_pair(tokenizer, RECORDS[0], CFG).prompt_ids)
    cfg = DataConfig(max_seq_len=prompt_len, max_passage_tokens=64)
    with pytest.raises(ValueError, match="over-long record"):
        tokenize_pair(tokenizer, RECORDS[0], cfg)
    with pytest.raises(ValueError, match="over-long record"):
        tokenize_rag(tokenizer, RECORDS[0], cfg)  # the same limit as SFT rows
    assert tokenize_pair(tokenizer, RECORDS[0], DataConfig(max_seq_len=prompt_len + 1, max_passage_tokens=64))


def test_missing_rejected_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no rejected answer"):
        tokenize_pair(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), CFG)


def test_bundled_preference_records_tokenize(tokenizer):
    records = [record for _, record in read_file(DATA, "preference")][:8]
    for record in records:
        pair = tokenize_pair(tokenizer, record, CFG)
        assert pair.chosen_ids != pair.rejected_ids
        assert tokenizer.decode(pair.chosen_ids).strip() == record.answer.strip() + tokenizer.eos_token


# ------------------------------------------------------------------------------------------- collate


def test_collate_chosen_rows_first_and_prompt_and_padding_masked(tokenizer, pairs):
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    b = len(pairs)
    rows = [p.chosen() for p in pairs] + [p.rejected() for p in pairs]
    longest = max(len(r.input_ids) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2 * b, longest) and t.dtype == torch.long for t in batch.values())
    for i, pair in enumerate(pairs):
        for row, answer in ((i, pair.chosen_ids), (b + i, pair.rejected_ids)):
            n_prompt, n = len(pair.prompt_ids), len(pair.prompt_ids) + len(answer)
            assert batch["input_ids"][row, :n].tolist() == pair.prompt_ids + answer
            assert batch["labels"][row, :n_prompt].eq(IGNORE).all()  # prompt
            assert batch["labels"][row, n_prompt:n].tolist() == answer  # answer (EOS included)
            assert batch["labels"][row, n:].eq(IGNORE).all()  # padding
            assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    assert (batch["labels"] != IGNORE).sum().item() == sum(
        len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )


def test_collate_rounds_length_up_and_refuses_an_empty_list(tokenizer, pairs):
    batch = collate_pairs(pairs[:1], pad_id=tokenizer.pad_token_id, multiple_of=64)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] % 64 == 0
    with pytest.raises(ValueError):
        collate_pairs([], pad_id=tokenizer.pad_token_id)


# -------------------------------------------------------------------------------------------- logps


def test_answer_logps_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    ids = torch.randint(0, 11, (3, 6), generator=generator)
    labels = ids.clone()
    labels[0, :2] = IGNORE  # prompt of 2, answer of 4
    labels[1, :5] = IGNORE  # answer of 1
    labels[2, :] = IGNORE  # nothing labelled
    got = answer_logps(logits, labels)
    assert got.dtype == torch.float32 and got.shape == (3,)
    expected = [
        _reference_logp(logits[0], ids[0].tolist(), 2),
        _reference_logp(logits[1], ids[1].tolist(), 5),
        0.0,
    ]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_answer_logps_upcasts_low_precision_logits():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=generator).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    got = answer_logps(logits, labels)
    assert got.dtype == torch.float32
    expected = answer_logps(logits.float(), labels)  # the same bf16 values, scored in fp32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_answer_logps_keeps_the_graph():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, IGNORE, 4]])
    answer_logps(logits, labels).sum().backward()
    assert logits.grad is not None
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    assert logits.grad[1, :2].abs().sum() == 0  # prompt positions before the answer's first predictor


def test_split_pair():
    chosen, rejected = split_pair(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert chosen.tolist() == [1.0, 2.0, 3.0] and rejected.tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        split_pair(torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.numerics
def test_one_concatenated_forward_matches_each_sequence_alone(tokenizer, model, pairs):
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == len(lengths), "want every row a different length (padding matters)"
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        together = answer_logps(logits, batch["labels"])
        alone = []
        for row in range(len(lengths)):
            n = int(lengths[row])
            ids = batch["input_ids"][row : row + 1, :n]
            single = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            alone.append(answer_logps(single, batch["labels"][row : row + 1, :n]))
    alone = torch.cat(alone)
    assert logits.dtype == torch.float32
    assert (together < 0).all()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    chosen, rejected = split_pair(together)
    assert chosen.shape == rejected.shape == (len(pairs),)
    torch.testing.assert_close(chosen, alone[: len(pairs)], rtol=1e-5, atol=1e-5)
    # the one-row scores are themselves right: a plain loop over the unpadded logits
    for row, pair in enumerate(pairs):
        ids = pair.chosen().input_ids
        with torch.no_grad():
            single = model(input_ids=torch.tensor([ids])).logits[0]
        assert alone[row].item() == pytest.approx(
            _reference_logp(single, ids, len(pair.prompt_ids)), abs=1e-4
        )
