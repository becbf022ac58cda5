"""KTO (Ethayarajh et al. 2024, Eq. 7-8) on unpaired examples: pure functions, matched to TRL 1.16's KTOTrainer
on the same numbers (tests/unit/objectives/test_objectives_trl.py).

Each example's answer is desirable or not. With r = log π(y|x) - log π_ref(y|x) (summed over its tokens) and
the reference point z0 (the policy's KL from the reference, estimated on mismatched prompt/answer pairs,
data/kto.py), a desirable answer's loss is w_d·(1 - σ(β(r - z0))) and an undesirable one's w_u·(1 -
σ(β(z0 - r))). z0 is a constant of the loss (detached, clamped at 0): TRL computes it per micro batch and
averages it over ranks; dstrain sums the mismatched log-ratios and their count over the step's micro batches
and ranks (objective.loss_normalization=global) or per micro batch over ranks (micro_batch, TRL's arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstrain.config.run import ObjectiveConfig


@dataclass(frozen=True)
class UnpairedTerms:
    """Per-example terms of one KTO micro batch; callers reduce `loss` (mean over real examples)."""

    loss: torch.Tensor  # [B] weighted by desirable_weight / undesirable_weight
    rewards: torch.Tensor  # [B] β·r, detached: logged per label (TRL's rewards/chosen and rewards/rejected)
    valid: torch.Tensor  # [B] 1.0 for real examples, 0.0 for a filler (no answer tokens)
    desirable: torch.Tensor  # [B] 1.0 for desirable examples, 0.0 for undesirable ones


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example loss [B], rewards β·r [B], detached) of summed answer log-probs [B] under the policy and
    the reference, each example's label [B] (bool) and the reference point `kl` (a scalar)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logratio = policy - reference.detach()
    kl = kl.detach()
    wanted = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    unwanted = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable.bool(), wanted, unwanted), beta * logratio.detach()


def reference_point(kl_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """z0: the mean mismatched log-ratio, clamped at 0 (KL is never negative; the estimate can be), detached."""
    return (kl_sum / count.clamp(min=1).to(kl_sum.dtype)).clamp(min=0).detach()


def mismatched_sums(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[sum of the mismatched answers' log-ratios, their count] from per-row values [2B] of a KTO batch
    (answers in rows 0..B-1, mismatched answers in B..2B-1); rows without tokens (fillers) count for none."""
    half = policy.shape[0] // 2
    real = (tokens[half:] > 0).to(policy.dtype)
    ratios = (policy[half:] - reference[half:]).detach() * real
    return torch.stack([ratios.sum(), real.sum()])


def score_examples(
    objective: ObjectiveConfig,
    policy: torch.Tensor,
    reference: torch.Tensor,
    tokens: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
) -> UnpairedTerms:
    """Per-example terms from per-row log-probs [2B] of a KTO batch (answers first, mismatched answers after)
    under the policy and the adapter-disabled reference, the labels [B] and the reference point."""
    half = policy.shape[0] // 2
    loss, rewards = kto_loss(
        policy[:half],
        reference[:half],
        desirable.to(policy.device),
        kl,
        beta=objective.beta,
        desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
    )
    valid = (tokens[:half] > 0).to(loss.dtype)
    return UnpairedTerms(loss * valid, rewards, valid, desirable.to(loss.device, loss.dtype))
