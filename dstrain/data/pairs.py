"""Preference pairs (prompt, chosen, rejected) for a single forward per micro batch.

DPO-style objectives compare log p(chosen | prompt) with log p(rejected | prompt) under the policy and a
reference model. Two layouts give the same per-answer results, answer rows chosen (0..B-1) then rejected
(B..2B-1), which `split_pair` separates:
- `collate_pairs`: 2B padded rows, prompt + chosen and prompt + rejected; the prompt runs twice.
- `collate_shared_pairs` (data.share_prompt): B rows of prompt[:-1] | p + chosen | p + rejected, where p is
  the prompt's last token, repeated so each answer's first token is predicted from a position of its own
  branch. A 4D mask lets each branch see the shared prefix and itself only, and each branch's position ids
  continue from the prefix, so every answer token sees exactly what it would in its own row. On RAG data
  the prompt (retrieved passages) is most of the tokens: the prompt runs once instead of twice. Sliding-
  window layers get the branch mask intersected with their window in position terms (model/windows.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from dstrain.config.run import DataConfig
from dstrain.data.batches import IGNORE, Example, answer_room, collate, rag_tokens
from dstrain.data.records import RagRecord


@dataclass(frozen=True)
class PairExample:
    """One tokenised preference record; both answers end in EOS (when the tokenizer has one) unless cut."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = -1  # the record's position in the training corpus (for precomputed reference log-probs)
    source: int = 0  # a mixture's source it came from (config/sources.py), in data.train order

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
    prompt, (chosen, rejected) = rag_tokens(tokenizer, record, cfg, record.answer, record.rejected)
    room = answer_room(len(prompt), cfg)
    return PairExample(prompt, chosen[:room], rejected[:room])


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """2B right-padded rows, chosen (0..B-1) then rejected (B..2B-1): one forward scores both answers.

    Padding and prompt positions carry IGNORE labels and no attention, so a row's answer log-prob is the
    same as if it ran alone.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [pair.chosen() for pair in pairs] + [pair.rejected() for pair in pairs]
    return collate(rows, pad_id=pad_id, multiple_of=multiple_of)


# Segment ids of the shared layout's mask (padding gets a distinct negative id per position).
SHARED, CHOSEN, REJECTED = 0, 1, 2


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool: q sees k <= q of its own segment, and branches also see the shared prefix.

    Built in numpy for the same reason as packing's block mask (data/packing.py).
    """
    seg = segments.numpy()
    same = seg[:, :, None] == seg[:, None, :]
    prefix = (seg[:, None, :] == SHARED) & (seg[:, :, None] > SHARED)
    mask = (same | prefix) & np.tri(seg.shape[1], dtype=bool)
    return torch.from_numpy(mask[:, None])


def collate_shared_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """B rows, one per pair, in the shared-prompt layout (module docstring), right-padded.

    `label_rows` names each label's answer row: b for pair b's chosen tokens, B+b for its rejected ones.
    """
    if not pairs or any(not pair.prompt_ids for pair in pairs):
        raise ValueError("collate_shared_pairs needs at least one pair, each with a non-empty prompt")
    count = len(pairs)
    length = max(len(p.prompt_ids) + 1 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    labels = torch.full((count, length), IGNORE, dtype=torch.long)
    label_rows = torch.full((count, length), -1, dtype=torch.long)
    position_ids = torch.zeros((count, length), dtype=torch.long)
    segments = -1 - torch.arange(length).repeat(count, 1)
    for b, pair in enumerate(pairs):
        prefix, last = pair.prompt_ids[:-1], pair.prompt_ids[-1]
        at = len(prefix)
        input_ids[b, :at] = torch.tensor(prefix, dtype=torch.long)
        position_ids[b, :at] = torch.arange(at)
        segments[b, :at] = SHARED
        for segment, answer, row in ((CHOSEN, pair.chosen_ids, b), (REJECTED, pair.rejected_ids, count + b)):
            n = 1 + len(answer)
            input_ids[b, at : at + n] = torch.tensor([last, *answer], dtype=torch.long)
            labels[b, at + 1 : at + n] = torch.tensor(answer, dtype=torch.long)
            label_rows[b, at + 1 : at + n] = row
            position_ids[b, at : at + n] = torch.arange(len(prefix), len(prefix) + n)
            segments[b, at : at + n] = segment
            at += n
    return {
        "input_ids": input_ids,
        "attention_mask": branch_mask(segments),
        "labels": labels,
        "position_ids": position_ids,
        "label_rows": label_rows,
    }


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
