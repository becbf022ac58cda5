"""What one optimizer step's loss is averaged over (`objective.loss_normalization`).

"global": the step's gradient is the gradient of (sum of the objective's per-unit losses over the global
batch) / (units in the global batch), whatever the split into micro batches, accumulation steps, ranks and
sequence-parallel slices. The units are supervised tokens for SFT (what transformers' `labels=` loss and its
`num_items_in_batch` compute), real pairs for preference objectives, real examples for KTO (collated as
pairs of answer and mismatched answer, data/kto.py, so they are counted as pairs are), and chosen-answer
tokens for the NLL term of dpo_nll and orpo. Each micro batch contributes its *sum* over the step's total count; DeepSpeed then divides
every micro batch's gradient by the accumulation steps and averages over data-parallel ranks, so the loss
handed to backward is that contribution times `scale` (= accumulation x data-parallel ranks), and the sum
of the contributions is the step's loss.

"micro_batch" (before the key existed): each micro batch's own mean, averaged by DeepSpeed, so a short
answer in a small micro batch weighs as much as a long one and the gradient depends on the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstrain.data.batches import IGNORE
from dstrain.objectives.losses import sft_loss
from dstrain.objectives.preference import PairScores


@dataclass(frozen=True)
class StepUnits:
    """The global batch's denominators (device tensors, summed over data-parallel ranks) and the factor
    that undoes DeepSpeed's averaging over accumulation steps and ranks."""

    tokens: torch.Tensor  # SFT: supervised tokens; preference: chosen-answer tokens (kto: answer tokens)
    pairs: torch.Tensor  # preference: real pairs; kto: real examples (0 for SFT)
    scale: int  # accumulation steps x data-parallel ranks


def host_units(inputs: dict[str, torch.Tensor], pairs: bool) -> tuple[int, int]:
    """(tokens, pairs) of one collated micro batch, counted on the host before it moves to the device.

    Labels are predicted one position earlier (labels[:, 0] is never a target). Pair batches hold chosen
    rows then rejected rows (data/pairs.collate_pairs), or one row per pair whose `label_rows` names each
    label's answer row, chosen b < B <= rejected (collate_shared_pairs); a pair is real when its chosen answer
    has a label (a filler pair has none). KTO batches are laid out the same way (the example's answer in the
    chosen slot, data/kto.py): their pairs are its real examples.
    """
    labels = inputs["labels"]
    labelled = labels[:, 1:] != IGNORE
    if not pairs:
        return int(labelled.sum()), 0
    if "label_rows" in inputs:
        chosen = labelled & (inputs["label_rows"][:, 1:] < labels.shape[0])
    else:
        chosen = labelled[: labels.shape[0] // 2]
    return int(chosen.sum()), int(chosen.any(dim=1).sum())


def sft_contribution(nll_sum: torch.Tensor, units: StepUnits) -> torch.Tensor:
    """This micro batch's share of the step's NLL per supervised token of the global batch."""
    return sft_loss(nll_sum, units.tokens)


def pair_contribution(scores: PairScores, units: StepUnits, nll_weight: float = 0.0) -> torch.Tensor:
    """This micro batch's share of the step's mean loss over the global batch's real pairs, plus, with
    `nll_weight` (dpo_nll, orpo), its share of the chosen answers' NLL per chosen token of the global batch.

    `scores` must hold the pair terms without the NLL (score_pairs(..., batch_nll=False)): here the NLL is
    normalised over the whole global batch's chosen tokens, not over each micro batch's.
    """
    loss = example_contribution(scores.loss, scores.valid, units)
    if nll_weight:
        nll_sum = (scores.chosen_nll * scores.chosen_tokens * scores.valid).sum()
        loss = loss + nll_weight * nll_sum / units.tokens.clamp(min=1).to(nll_sum.dtype)
    return loss


def example_contribution(losses: torch.Tensor, valid: torch.Tensor, units: StepUnits) -> torch.Tensor:
    """This micro batch's share of the step's mean loss over the global batch's real pairs or KTO examples:
    its per-unit `losses` [B] summed over the real ones (`valid`), over the global count."""
    total = (losses * valid).sum()
    return total / units.pairs.clamp(min=1).to(total.dtype)


def describe(name: str, normalization: str) -> str:
    """The start-up line that says what a step's loss is averaged over."""
    if normalization != "global":
        return (
            "loss: each micro batch's own mean, averaged over the step (objective.loss_normalization="
            "micro_batch, as this run started)"
        )
    nll = "real pairs (its NLL term: chosen-answer tokens)"
    units = {"sft": "supervised tokens", "dpo_nll": nll, "orpo": nll, "kto": "examples"}
    return f"loss: normalised over each global batch's {units.get(name, 'real pairs')} (objective.loss_normalization=global)"
