"""The module DeepSpeed wraps: a PEFT causal LM whose forward returns the loss terms, not the logits.

The output head runs only at positions that carry a label, and in chunks of `logits_chunk_tokens`
positions, each recomputed in backward: no [tokens, vocab] logits tensor larger than one chunk ever exists.
With 32k-152k vocabularies the full [batch, seq, vocab] logits are most of the activation memory, and on
RAG data most positions are prompt and passages, which carry no loss.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from dstrain.data.batches import IGNORE
from dstrain.errors import ConfigError
from dstrain.model.head import SupervisedHead

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


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row x seq + t) of the hidden states that predict a label (label t + 1 is set).

    Computed where `labels` lives: dstrain.engine computes it on the host before the batch moves, so the
    device never has to report how many labels there are (a host sync per micro batch).
    """
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


class SupervisedLM(nn.Module):
    def __init__(self, peft_model: PeftModel, logits_chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.peft_model = peft_model
        check_supported(peft_model.get_base_model())
        self.head = SupervisedHead(peft_model.get_base_model().get_output_embeddings(), logits_chunk_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        label_rows: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        pairs: bool = False,
        policy: bool = True,
        reference: bool = True,
        **varlen: torch.Tensor | int,
    ) -> tuple[torch.Tensor | None, ...]:
        """(summed NLL over supervised tokens, number of supervised tokens); with `pairs`, per answer row:
        (policy log-prob [N], reference log-prob [N], supervised tokens [N]).

        `attention_mask` is [batch, seq] for padded rows, or a [batch, 1, seq, seq] block mask with
        `position_ids` for packed rows (data/packing.py) and shared-prompt pairs (data/pairs.py). For the
        latter, `label_rows` [batch, seq] names the answer row (chosen b, rejected B+b) of each label.
        `label_index` is `labelled_positions(labels)`, when the caller has it already. `varlen` holds
        flash-attention's `cu_seq_lens_q/k` and `max_length_q/k` for a flat packed row (data/packing.py),
        with `attention_mask` None.
        The reference is the same model with its adapter disabled: no second model in memory, and under
        ZeRO-3 the same partitioned weights. `policy=False` or `reference=False` skips that pass (its slot
        is None): precomputed reference log-probs need only the policy, precomputing them only the reference.
        """
        inputs = (input_ids, attention_mask, labels, position_ids, label_rows, label_index, varlen)
        if not pairs:
            logps, index = self._labelled_logps(*inputs)
            return -logps.sum(), torch.full((), index.numel(), device=logps.device)
        policy_logps = tokens = reference_logps = None
        if policy:
            policy_logps, tokens = self._row_logps(*inputs)
        if reference:
            with torch.no_grad(), self.peft_model.disable_adapter():
                reference_logps, tokens = self._row_logps(*inputs)
        return policy_logps, reference_logps, tokens

    def _labelled_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        label_rows: torch.Tensor | None = None,
        label_index: torch.Tensor | None = None,
        varlen: dict[str, torch.Tensor | int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each labelled token [K] in fp32, their predicting positions [K] as flat indices)."""
        base = self.peft_model.get_base_model()
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **(varlen or {})
        ).last_hidden_state
        index = labelled_positions(labels) if label_index is None else label_index
        targets = labels.reshape(-1)[index + 1]
        picked = hidden.reshape(-1, hidden.shape[-1])[index]
        return self.head(picked, targets), index

    def _row_logps(self, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-prob of each answer row's labelled tokens [N] (fp32), and each row's count of them [N].

        Padded pairs have one answer per row; shared-prompt pairs two per row, placed by `label_rows`.
        """
        token_logps, index = self._labelled_logps(*inputs)
        labels, label_rows = inputs[2], inputs[4]
        if label_rows is None:
            rows, num_rows = index // labels.shape[1], labels.shape[0]
        else:
            rows, num_rows = label_rows.reshape(-1)[index + 1], 2 * labels.shape[0]
        totals = torch.zeros(num_rows, dtype=torch.float32, device=token_logps.device)
        counts = torch.zeros(num_rows, dtype=torch.long, device=token_logps.device)
        return totals.index_add(0, rows, token_logps), counts.index_add(0, rows, torch.ones_like(rows))
