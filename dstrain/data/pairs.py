"""Preference pairs (prompt, chosen, rejected) as one batch of 2B rows, for a single concatenated forward.

DPO-style objectives compare log p(chosen | prompt) with log p(rejected | prompt) under the policy and a
reference model. Stacking chosen rows (0..B-1) above rejected rows (B..2B-1) lets each model run once per
micro batch instead of twice, and `split_pair` recovers the two halves from any per-row result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from dstrain.config import DataConfig
from dstrain.data.batches import IGNORE, Example, answer_ids, answer_room, collate, rag_prompt_ids
from dstrain.data.records import RagRecord


@dataclass(frozen=True)
class PairExample:
    """One tokenised preference record; both answers end in EOS (when the tokenizer has one) unless cut."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = -1  # the record's position in the training corpus (for precomputed reference log-probs)

    def chosen(self) -> Example:
        return _example(self.prompt_ids, self.chosen_ids)

    def rejected(self) -> Example:
        return _example(self.prompt_ids, self.rejected_ids)


def _example(prompt_ids: list[int], answer_ids: list[int]) -> Example:
    """Prompt masked, answer labelled: the same layout tokenize_rag gives SFT rows."""
    return Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, record: RagRecord, cfg: DataConfig) -> PairExample:
    """Tokenise the prompt once; cut each answer on its own so prompt + answer <= data.max_seq_len."""
    if record.rejected is None:
        raise ValueError(
            "record has no rejected answer: preference pairs need data.format=preference records"
        )
    prompt = rag_prompt_ids(tokenizer, record, cfg)
    room = answer_room(len(prompt), cfg)
    chosen = answer_ids(tokenizer, record.answer)[:room]
    rejected = answer_ids(tokenizer, record.rejected)[:room]
    return PairExample(prompt, chosen, rejected)


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """2B right-padded rows, chosen (0..B-1) then rejected (B..2B-1): one forward scores both answers.

    Padding and prompt positions carry IGNORE labels and no attention, so a row's answer log-prob is the
    same as if it ran alone.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [pair.chosen() for pair in pairs] + [pair.rejected() for pair in pairs]
    return collate(rows, pad_id=pad_id, multiple_of=multiple_of)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each row's labelled tokens [N], in fp32, from logits [N, L, V] and labels [N, L].

    Shifted like the causal LM loss: label t is predicted at position t-1. Only labelled positions are
    upcast, so no fp32 copy of the whole [N, L, V] tensor is made. A row without labels scores 0.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE
    token_logps = -F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    totals = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    return totals.index_add(0, rows, token_logps)


def split_pair(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) from per-row values [2B] of a collate_pairs batch."""
    if values.dim() < 1 or values.shape[0] % 2:
        raise ValueError(f"expected 2B values (chosen rows, then rejected), got shape {tuple(values.shape)}")
    half = values.shape[0] // 2
    return values[:half], values[half:]
