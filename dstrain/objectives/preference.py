"""Preference terms of one pair batch: the objective's per-pair loss, rewards and which pairs are real.

Shared by the training step and the eval loop, so both score pairs the same way. Rows come from
`collate_pairs` (chosen rows, then rejected rows) through SupervisedLM's `pairs=True` forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstrain.config.run import ObjectiveConfig
from dstrain.data.pairs import split_pair
from dstrain.objectives.losses import NLL_OBJECTIVES, preference_loss

# Reference-free objectives: the forward skips the adapter-disabled pass, and their own rewards give the margin.
REFERENCE_FREE = ("orpo",)


@dataclass(frozen=True)
class PairScores:
    loss: torch.Tensor  # [B] the objective's loss per pair
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    # [B] implicit DPO reward margin beta * ((pc - rc) - (pr - rr)); for reference-free objectives (orpo)
    # their own reward margin, chosen_rewards - rejected_rewards (TRL's rewards/margins)
    margin: torch.Tensor
    chosen_nll: torch.Tensor  # [B] mean NLL per chosen-answer token
    valid: torch.Tensor  # [B] 1.0 for real pairs, 0.0 for filler pairs (no answer tokens)
    chosen_tokens: torch.Tensor  # [B] supervised tokens of each chosen answer
    log_odds: torch.Tensor | None = None  # [B] orpo: the log odds ratio of chosen over rejected


def nll_weight(objective: ObjectiveConfig) -> float:
    """The weight of the chosen answers' NLL in the objective's loss: dpo_nll's nll_weight, orpo's 1, else 0."""
    if objective.name not in NLL_OBJECTIVES:
        return 0.0
    return objective.nll_weight if objective.name == "dpo_nll" else 1.0


def uses_reference(objective: ObjectiveConfig) -> bool:
    """Whether training and eval run the adapter-disabled reference pass for this objective."""
    return objective.name not in REFERENCE_FREE


def score_pairs(
    objective: ObjectiveConfig,
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    tokens: torch.Tensor,
    batch_nll: bool = True,
) -> PairScores:
    """Per-pair terms from per-row log-probs [2B] of the policy and the adapter-disabled reference (None for
    a reference-free objective, whose forward skips that pass).

    `batch_nll`: dpo_nll's and orpo's loss carries this batch's chosen-answer NLL (TRL's batch arithmetic);
    without it the pair terms come alone and the caller adds the NLL normalised its own way
    (objectives/normalize.py).
    """
    if reference is None:
        reference = torch.zeros_like(policy)
    (pc, pr), (rc, rr), (tc, tr) = split_pair(policy), split_pair(reference), split_pair(tokens)
    valid = (tc > 0).float()
    chosen_nll = -pc / tc.clamp(min=1)
    name = "dpo" if objective.name == "sft" else objective.name  # an SFT run still reports DPO's view
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
        nll=batch_nll,
    )
    if objective.name in REFERENCE_FREE:
        margin = terms.chosen_rewards - terms.rejected_rewards
    else:
        margin = objective.beta * ((pc - rc) - (pr - rr)).detach()
    rewards = (terms.chosen_rewards, terms.rejected_rewards)
    return PairScores(terms.loss, *rewards, margin, chosen_nll, valid, tc, terms.log_odds)


def mean_over_pairs(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the real pairs of a micro batch; 0 (with a graph) when there are none."""
    return (values * valid).sum() / valid.sum().clamp(min=1)
