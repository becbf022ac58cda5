"""What a TRL trainer's loss methods read besides the numbers, so a test can call them on numbers it chose: a
single-process accelerator, and the trainer built without its __init__ (no model, no data loading)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch


class SingleProcess:
    """Single process: every gather is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


def bare_trainer(cls: type, **fields: Any) -> Any:
    """`cls` made with `object.__new__`, carrying the bookkeeping its loss methods read (this accelerator,
    training mode, empty metric logs) and `fields`, the loss settings."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(
        aux_loss_enabled=False,
        accelerator=SingleProcess(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **fields,
    )
    return trainer


def paired_batch(input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor, pairs: int) -> dict:
    """Rows [2B] (chosen first, rejected after) as TRL's `chosen_*` / `rejected_*` batch keys."""
    batch = {}
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, 2 * pairs))):
        batch[f"{side}_input_ids"] = input_ids[rows]
        batch[f"{side}_attention_mask"] = attention[rows]
        batch[f"{side}_labels"] = labels[rows]
    return batch
