"""Pure loss functions. No model, no engine: tensors in, tensors out."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


def sft_loss(nll_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Mean NLL per supervised token of one micro batch (what transformers' `labels=` loss computes).

    A micro batch without supervised tokens contributes zero, but keeps the graph so every rank still
    runs the same backward (a collective under ZeRO).
    """
    return nll_sum / num_tokens.clamp(min=1)


# ------------------------------------------------------------------------------------ preference losses
# Inputs are per-pair [B] summed log-probs of the answer tokens (policy and frozen reference) and the answer
# token counts. Each objective matches TRL 1.16 on the same numbers (tests/unit/objectives/test_objectives_trl.py).

PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "dpo_nll", "orpo")
# Objectives whose loss carries the chosen answers' NLL, and its weight (dpo_nll: objective.nll_weight).
NLL_OBJECTIVES = ("dpo_nll", "orpo")


@dataclass(frozen=True)
class PreferenceTerms:
    """Per-pair terms of one batch of preference pairs; callers reduce `loss` (mean over real pairs)."""

    loss: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] implicit reward, detached: it is logged and compared, never trained
    rejected_rewards: torch.Tensor  # [B]
    log_odds: torch.Tensor | None = None  # [B] orpo: log odds(chosen) - log odds(rejected), detached


def _log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy - reference log-prob per answer.

    The reference is a constant of the objective: detaching it here means a reference pass that ran with
    grad enabled is never trained through, nor its activations kept alive by the loss.
    """
    return policy_chosen - ref_chosen.detach(), policy_rejected - ref_rejected.detach()


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε)·logσ(x) - ε·logσ(-x): the logistic loss when a fraction ε of preference labels is flipped.

    ε = 0 takes the plain branch so the loss is exactly -logσ(x) (no 0 · logσ(-x) term to round or overflow).
    """
    if label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """Sigmoid DPO on Δ = (πc - rc) - (πr - rr); label_smoothing > 0 gives conservative DPO (cDPO).

    Summed, not length-normalised, log-probs: that is the DPO paper's sequence likelihood and TRL's default.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = _smoothed_logistic(beta * (chosen - rejected), label_smoothing)
    return PreferenceTerms(loss, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> PreferenceTerms:
    """IPO (Eq. 17): (Δ̄ - 1/(2β))², with each log-ratio averaged over its answer tokens.

    A squared loss on summed log-ratios grows with answer length, so, like TRL (and the IPO authors' runs),
    each ratio is divided by its token count first. Rewards stay DPO's unnormalised ones, as TRL logs them.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    margin = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    return PreferenceTerms((margin - 1 / (2 * beta)) ** 2, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """SimPO: -logσ(β·(avg πc - avg πr) - γ), no reference model; the reward is β × mean log-prob per token.

    γ is the target margin in reward units, TRL's convention (it subtracts γ/β from the log-prob gap before
    scaling by β). Length normalisation is what keeps the reference-free reward from favouring long answers.
    """
    chosen_avg = policy_chosen / chosen_tokens.clamp(min=1)
    rejected_avg = policy_rejected / rejected_tokens.clamp(min=1)
    loss = _smoothed_logistic(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return PreferenceTerms(loss, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation: log1p(-exp(x)) below -ln 2, log(-expm1(x)) above
    (Mächler 2012; TRL's ORPO uses the same branch point)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> PreferenceTerms:
    """ORPO's odds-ratio term (Hong et al. 2024, Eq. 7): -β·logσ(log odds(chosen) - log odds(rejected)).

    odds(y) = p / (1 - p) with log p the answer's mean log-prob per token, so log odds = log p - log(1 - p).
    No reference model; the full ORPO loss adds the chosen answers' NLL (add_chosen_nll, weight 1). Rewards
    are β × the mean log-prob per token, as TRL logs them. A pair without answer tokens (a filler) scores a
    mean log-prob of -1 here, not 0: log(1 - e^0) is -inf, and a NaN would reach the gradient through the
    mask that drops the pair.
    """
    chosen_avg = _mean_logp(policy_chosen, chosen_tokens)
    rejected_avg = _mean_logp(policy_rejected, rejected_tokens)
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    loss = -beta * F.logsigmoid(log_odds)
    return PreferenceTerms(loss, beta * chosen_avg.detach(), beta * rejected_avg.detach(), log_odds.detach())


def _mean_logp(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean log-prob per answer token, in fp32 at least (TRL upcasts); -1 where there are no tokens."""
    mean = logps.float() if logps.dtype in (torch.float16, torch.bfloat16) else logps
    mean = mean / tokens.clamp(min=1)
    return torch.where(tokens > 0, mean, torch.full_like(mean, -1.0))


def add_chosen_nll(
    terms: PreferenceTerms, chosen_nll: torch.Tensor, chosen_tokens: torch.Tensor, *, nll_weight: float
) -> PreferenceTerms:
    """`terms` + nll_weight × the chosen answers' NLL per token (RPO): keeps chosen likelihood from collapsing.

    The NLL is averaged over all chosen tokens of the batch, not per pair, as TRL's "sft" loss term (and
    dstrain's `sft_loss`) do: the per-pair means `chosen_nll` [B] are re-weighted by their token counts. That
    batch value is added to every pair, so the mean over pairs carries it once; pairs without chosen tokens
    add nothing to it.
    """
    batch_nll = (chosen_nll * chosen_tokens).sum() / chosen_tokens.sum().clamp(min=1)
    return replace(terms, loss=terms.loss + nll_weight * batch_nll)


def preference_loss(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    nll_weight: float = 1.0,
    chosen_nll: torch.Tensor | None = None,
    nll: bool = True,
) -> PreferenceTerms:
    """One entry point for every preference objective, so the train step and eval loop score pairs alike.

    All tensors are [B]; log-probs are sums over each answer's tokens. `chosen_nll` (per-pair mean NLL of
    the chosen tokens) is needed by "dpo_nll" and "orpo" (whose NLL weight is 1). SimPO and ORPO ignore the
    reference log-probs. `nll=False`: the pair terms without the NLL, which the caller then normalises its
    own way (objectives/normalize.py).
    """
    if name not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"unknown preference objective {name!r}; valid: {', '.join(PREFERENCE_OBJECTIVES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    tokens = (chosen_tokens, rejected_tokens)
    if name == "ipo":
        if label_smoothing != 0.0:  # TRL's IPO has no smoothed form; refuse rather than silently ignore it
            raise ValueError(f"label_smoothing is not defined for 'ipo', got {label_smoothing}")
        return ipo_loss(*logps, *tokens, beta=beta)
    if name == "simpo":
        return simpo_loss(*logps[:2], *tokens, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing)
    if name == "orpo":
        if label_smoothing != 0.0:
            raise ValueError(f"label_smoothing is not defined for 'orpo', got {label_smoothing}")
        terms = orpo_loss(*logps[:2], *tokens, beta=beta)
    else:
        terms = dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    if name not in NLL_OBJECTIVES or not nll:
        return terms
    if chosen_nll is None:
        raise ValueError(f"'{name}' needs chosen_nll, the per-pair mean NLL of the chosen tokens")
    weight = nll_weight if name == "dpo_nll" else 1.0
    return add_chosen_nll(terms, chosen_nll, chosen_tokens, nll_weight=weight)
