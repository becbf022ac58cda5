"""The module DeepSpeed wraps: a PEFT causal LM whose forward returns the loss terms, not the logits.

The output head runs only at positions that carry a label. With 32k-152k vocabularies the full
[batch, seq, vocab] logits tensor is most of the activation memory, and on RAG data most positions are
prompt and passages, which carry no loss.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from dstrain.data.batches import IGNORE
from dstrain.objectives import token_nll_sum


class SupervisedLM(nn.Module):
    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model
        base = peft_model.get_base_model()
        if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
            raise TypeError(f"{type(base).__name__} has no decoder/output head split; not a causal LM")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (summed NLL over supervised tokens, number of supervised tokens)."""
        base = self.peft_model.get_base_model()
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        return token_nll_sum(logits, targets[keep]), keep.sum()
