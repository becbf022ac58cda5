"""The module DeepSpeed wraps: a PEFT causal LM whose forward returns the loss terms, not the logits.

The output head runs only at positions that carry a label. With 32k-152k vocabularies the full
[batch, seq, vocab] logits tensor is most of the activation memory, and on RAG data most positions are
prompt and passages, which carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from dstrain.data.batches import IGNORE
from dstrain.errors import ConfigError
from dstrain.objectives import token_nll_sum

# Config fields by which some causal LMs transform logits after the output head (Gemma-2/3 soft-capping,
# Granite and Cohere scaling). Their loss through the bare head would train against the wrong logits.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def check_supported(base: nn.Module) -> None:
    """Fail clearly for models whose output is not `output_embeddings(decoder(...))`."""
    name = type(base).__name__
    if base.get_output_embeddings() is None or base.get_decoder() is base:
        raise ConfigError([f"model.path: {name} has no decoder / output-head split; it is not a causal LM"])
    for field, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(base.config, field, neutral)
        if value not in (neutral, None):
            raise ConfigError(
                [f"model.path: {name} transforms its logits ({field}={value}); not supported yet"]
            )


class SupervisedLM(nn.Module):
    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model
        check_supported(peft_model.get_base_model())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        pairs: bool = False,
        policy: bool = True,
        reference: bool = True,
    ) -> tuple[torch.Tensor | None, ...]:
        """(summed NLL over supervised tokens, number of supervised tokens); with `pairs`, per row:
        (policy log-prob [N], reference log-prob [N], supervised tokens [N]).

        `attention_mask` is [batch, seq] for padded rows, or a [batch, 1, seq, seq] block mask with
        `position_ids` for packed rows (see data/packing.py). The reference is the same model with its
        adapter disabled: no second model in memory, and under ZeRO-3 the same partitioned weights.
        `policy=False` or `reference=False` skips that pass (its slot is None): precomputed reference
        log-probs need only the policy, precomputing them only the reference.
        """
        inputs = (input_ids, attention_mask, labels, position_ids)
        if not pairs:
            logits, targets, keep = self._labelled(*inputs)
            return token_nll_sum(logits, targets), keep.sum()
        policy_logps = tokens = reference_logps = None
        if policy:
            policy_logps, tokens = self._row_logps(*inputs)
        if reference:
            with torch.no_grad(), self.peft_model.disable_adapter():
                reference_logps, tokens = self._row_logps(*inputs)
        return policy_logps, reference_logps, tokens

    def _labelled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits at labelled positions [K, vocab], their targets [K], the [batch, seq-1] label mask)."""
        base = self.peft_model.get_base_model()
        decoder = base.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        return base.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep], keep

    def _row_logps(self, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-prob of each row's labelled tokens [N] (fp32), and each row's count of them [N]."""
        logits, targets, keep = self._labelled(*inputs)
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
        rows = keep.nonzero()[:, 0]
        totals = torch.zeros(keep.shape[0], dtype=torch.float32, device=token_logps.device)
        return totals.index_add(0, rows, token_logps), keep.sum(dim=1)
