"""Preference terms of one pair batch: the objective's per-pair loss, rewards and which pairs are real.

Shared by the training step and the eval loop, so both score pairs the same way. Rows come from
`collate_pairs` (chosen rows, then rejected rows) through SupervisedLM's `pairs=True` forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstrain.config.run import ObjectiveConfig
from dstrain.data.pairs import split_pair
from dstrain.objectives.losses import preference_loss


@dataclass(frozen=True)
class PairScores:
    loss: torch.Tensor  # [B] the objective's loss per pair
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    margin: torch.Tensor  # [B] implicit DPO reward margin beta * ((pc - rc) - (pr - rr)), for every objective
    chosen_nll: torch.Tensor  # [B] mean NLL per chosen-answer token
    valid: torch.Tensor  # [B] 1.0 for real pairs, 0.0 for filler pairs (no answer tokens)
    chosen_tokens: torch.Tensor  # [B] supervised tokens of each chosen answer


def score_pairs(
    objective: ObjectiveConfig,
    policy: torch.Tensor,
    reference: torch.Tensor,
    tokens: torch.Tensor,
    batch_nll: bool = True,
) -> PairScores:
    """Per-pair terms from per-row log-probs [2B] of the policy and the adapter-disabled reference.

    `batch_nll`: dpo_nll's loss carries this batch's chosen-answer NLL (TRL's batch arithmetic); without it
    the pair terms are DPO's alone and the caller adds the NLL normalised its own way (objectives/normalize).
    """
    (pc, pr), (rc, rr), (tc, tr) = split_pair(policy), split_pair(reference), split_pair(tokens)
    valid = (tc > 0).float()
    chosen_nll = -pc / tc.clamp(min=1)
    name = "dpo" if objective.name == "sft" else objective.name  # an SFT run still reports DPO's view
    if name == "dpo_nll" and not batch_nll:
        name = "dpo"
    terms = preference_loss(
        name,
        pc,
        pr,
        rc,
        rr,
        tc,
        tr,
        beta=objective.beta,
        label_smoothing=objective.label_smoothing,
        simpo_gamma=objective.simpo_gamma,
        nll_weight=objective.nll_weight,
        chosen_nll=chosen_nll,
    )
    margin = objective.beta * ((pc - rc) - (pr - rr)).detach()
    return PairScores(terms.loss, terms.chosen_rewards, terms.rejected_rewards, margin, chosen_nll, valid, tc)


def mean_over_pairs(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the real pairs of a micro batch; 0 (with a graph) when there are none."""
    return (values * valid).sum() / valid.sum().clamp(min=1)
