"""Sequence packing: a micro batch's examples laid into as few rows as fit, isolated from each other.

Two layouts: `collate_packed` (rows of at most `capacity` tokens with a 4D block-diagonal causal mask, for
sdpa/eager) and `collate_flat` (flash-attention's variable-length path: the whole micro batch as one row
without padding, sequence boundaries given as `cu_seq_lens`, attention cost per sample instead of per row).

Packing here re-lays out the *same* micro batch (same samples, same loss) into fewer, fuller rows; it does not
change what a step trains on, so the global data position, elastic resume and the loss stay exactly as
without packing. Isolation needs a 4D block-diagonal causal mask: with sdpa attention, position ids that
restart per sample alone do NOT stop a sample attending to the one before it (SPEC section 5). Position ids
restart too, so each sample sees the positions it would see alone. The block mask is for full-attention
layers; SupervisedLM hands sliding-window layers the mask intersected with their window (model/windows.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

from dstrain.data.batches import IGNORE, Example


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row's total length within `capacity`.

    Rows keep their examples in input order, so a batch is laid out the same way on every run.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] bool: position q sees k iff both lie in the same segment and k <= q.

    Padding has its own segment per position, so a padded query still sees itself (a fully masked row
    would make sdpa return NaN). Built in numpy: torch's intra-op threads made these small L x L
    comparisons 100x slower on a busy machine when collating in the main process.
    """
    seg = segments.numpy()
    length = seg.shape[1]
    mask = (seg[:, :, None] == seg[:, None, :]) & np.tri(length, dtype=bool)
    return torch.from_numpy(mask[:, None])


def collate_packed(examples: Sequence[Example], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Pack `examples` into rows of at most `capacity` tokens with restarting positions and a block mask."""
    rows = plan_rows([len(e.input_ids) for e in examples], capacity)
    length = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    # padding: a distinct negative segment per position
    segments = -1 - torch.arange(length).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            ids, labs = examples[i].input_ids, examples[i].labels
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            labels[r, at : at + n] = torch.tensor(labs)
            # The loss predicts label t from position t-1: a segment's first label would be predicted from
            # the previous sample's last token. Unpacked, that label is never used; packed, it must not be.
            labels[r, at] = IGNORE
            position_ids[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = seg
            at += n
    return {
        "input_ids": input_ids,
        "attention_mask": block_causal_mask(segments),
        "labels": labels,
        "position_ids": position_ids,
    }


# The separator is the label at each sample's first position.
_FLATTEN = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE)


def collate_flat(examples: Sequence[Example], pad_id: int) -> dict[str, object]:
    """The micro batch as one row [1, total tokens], for flash-attention's variable-length kernels.

    transformers' own DataCollatorWithFlattening lays it out (tested to give the same tensors as dstrain's
    former hand-written version): position ids restart per sample, each sample's first label is IGNORE (it
    would be predicted from the previous sample's last token), and `cu_seq_lens_q/k` (int32) and
    `max_length_q/k` are computed here, on the host, so no layer has to derive them from the position ids
    on the device (a sync per layer). transformers passes them from the model's keyword arguments to
    flash_attention_2, which then attends within each sample only. There is no padding at all.

    Sliding windows need nothing here: transformers 5 hands each sliding layer's `sliding_window` w to
    flash-attn's variable-length kernel as `window_size=(w - 1, w - 1)` with `causal=True` (when the flat row
    is longer than w), which the kernel applies within each `cu_seq_lens` sequence: the window a sample has
    in its own row. Not testable on CPU (flash-attn needs a CUDA GPU).
    """
    del pad_id  # nothing is padded: kept for the same signature as the other layouts
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch = _FLATTEN(features)
    # SupervisedLM.forward takes the mask positionally: None, as the variable-length path needs none
    return {"input_ids": batch.pop("input_ids"), "attention_mask": None, **batch}
