"""Eval loop: token-weighted mean loss over the held-out set, sharded across ranks."""

from __future__ import annotations

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from dstrain import engine as eng
from dstrain.data.batches import Example
from dstrain.data.loader import eval_batches
from dstrain.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine, examples: list[Example], micro: int, rank: int, world: int, pad_id: int
) -> float:
    """Mean NLL per supervised token over all of `examples` (a collective: every rank calls it)."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    try:
        for batch in eval_batches(examples, micro, rank, world, pad_id):
            nll_sum, num_tokens = eng.forward(engine, batch.inputs)
            totals += torch.stack([nll_sum.double().cpu(), num_tokens.double().cpu()])
    finally:
        engine.train()
    nll, tokens = all_reduce_sum(totals).tolist()
    return nll / max(tokens, 1.0)
