"""Pure loss functions. No model, no engine: tensors in, tensors out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` [N] under `logits` [N, vocab], computed in fp32.

    Callers pass only supervised positions, so the [batch, seq, vocab] logits tensor never exists.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sft_loss(nll_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Mean NLL per supervised token of one micro batch (what transformers' `labels=` loss computes).

    A micro batch without supervised tokens contributes zero, but keeps the graph so every rank still
    runs the same backward (a collective under ZeRO).
    """
    return nll_sum / num_tokens.clamp(min=1)
