"""The exact path: log-probs from the model's own forward, its head run only at the supervised columns.

For a model whose head dstrain does not know (remote code, a new family), nothing between the decoder and
the logits is assumed: the model's own `forward` runs, with transformers' `logits_to_keep` set to the
sequence columns that hold a supervised position, so the logits tensor is [batch, columns, vocab] rather
than [batch, seq, vocab]. A forward that takes no `logits_to_keep` (older remote code) returns every
column; the result is the same, only the memory differs (say so at start-up: `keeps_columns`).
It is also the self-check's reference for the chunked head (selfcheck.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def keeps_columns(base: nn.Module) -> bool:
    """Whether the model's forward can restrict its head to chosen columns (`logits_to_keep`)."""
    return _takes_logits_to_keep(type(base).forward)


@functools.cache  # one signature per model class, not one per forward
def _takes_logits_to_keep(forward: Any) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def exact_logits(
    base: nn.Module, index: torch.Tensor, seq_len: int, inputs: dict[str, Any]
) -> tuple[torch.Tensor, Any]:
    """The model's own logits at the flat positions `index` [K] (row x seq + column): ([K, vocab], outputs).

    `inputs` are the forward's keyword arguments (input_ids, attention_mask, position_ids, ...).
    """
    rows, cols = index // seq_len, index % seq_len
    kept, where = torch.unique(cols, sorted=True, return_inverse=True)
    extra = {"logits_to_keep": kept} if keeps_columns(base) else {}
    outputs = base(**inputs, **extra, use_cache=False)
    logits = outputs.logits
    if not extra:  # every column came back
        where = cols
    return logits[rows, where], outputs


def exact_target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [K] in fp32 from the model's own logits [K, vocab]."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")
