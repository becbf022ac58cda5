"""What one micro batch adds to a step's loss, per objective, and what the step's micro batches share.

`step_units` runs before the step's first training forward: it counts the global batch's units
(objectives/normalize.py) and, for KTO, runs the reference-point pass over the step's micro batches. KTO
compares each answer's log-ratio with z0, the policy's KL from the reference on mismatched answers
(objectives/kto.py); z0 is a constant of the loss, so it must be known before the first backward. That pass
runs the policy (eval mode, no grad) and the reference on every micro batch's rows, and keeps the reference
log-probs for the training forward, which then runs the policy alone: the same forwards as TRL's (policy and
reference on answers and mismatched answers), with the mismatched policy pass outside autograd. Its sum and
count join the all-reduce of the unit counts: one small collective per step, no host sync.

`micro_loss` is the objective's loss on one micro batch: SFT's NLL, a preference objective's pair terms
(+ the chosen NLL of dpo_nll and orpo), or KTO's per-example terms; it adds what the objective logs to the
meter (device tensors, reduced at the logged step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dstrain import engine as eng
from dstrain.data.batches import MicroBatch
from dstrain.distributed.collectives import all_reduce_sum
from dstrain.distributed.sequence import rank_in_group
from dstrain.eval.reference import lookup
from dstrain.metrics.meter import StepMeter
from dstrain.objectives.kto import UnpairedTerms, mismatched_sums, reference_point, score_examples
from dstrain.objectives.losses import sft_loss
from dstrain.objectives.normalize import (
    StepUnits,
    example_contribution,
    host_units,
    pair_contribution,
    sft_contribution,
)
from dstrain.objectives.preference import PairScores, mean_over_pairs, nll_weight, score_pairs, uses_reference
from dstrain.training.session import Run
from dstrain.training.sources import counted_sources, pair_losses


@dataclass(frozen=True)
class ReferencePoint:
    """KTO: what the step's first pass found for one micro batch."""

    reference: torch.Tensor  # [2B] its rows' reference log-probs (answers, then mismatched answers)
    kl: torch.Tensor  # z0, the reference point its examples' log-ratios are compared with


def step_units(run: Run, batches: list[MicroBatch]) -> tuple[StepUnits | None, list[ReferencePoint | None]]:
    """The global batch's token and pair counts (None under micro-batch normalisation) and, for KTO, each
    micro batch's reference point; one all-reduce that stays on the device (no host sync)."""
    normalized = run.objective.loss_normalization == "global"
    kto = run.objective.name == "kto"
    if not normalized and not kto:
        return None, [None] * len(batches)
    passes = [first_pass(run, batch) for batch in batches] if kto else []
    counts = [host_units(batch.inputs, run.objective.name != "sft") for batch in batches]
    local = [sum(c[0] for c in counts), sum(c[1] for c in counts)]
    device = passes[0][1].device if passes else torch.device("cpu")
    # counts exact in float64 up to 2**53: one vector, one collective, for the counts and KTO's sums
    vector = torch.cat(
        [torch.tensor(local, dtype=torch.float64, device=device)] + [p[1].double() for p in passes]
    )
    if rank_in_group() != 0:  # a sequence-parallel group reads one share of the batch: count it once
        vector = torch.zeros_like(vector)
    reduced = all_reduce_sum(vector)
    tokens, pairs = reduced[:2].round().long()
    units = StepUnits(tokens, pairs, run.plan.accumulation * run.plan.world) if normalized else None
    sums = reduced[2:].reshape(-1, 2)  # per micro batch: [mismatched log-ratio sum, count]
    if normalized:  # one reference point for the whole global batch
        sums = sums.sum(0, keepdim=True).expand_as(sums)
    points = [ReferencePoint(p[0], reference_point(s[0], s[1])) for p, s in zip(passes, sums, strict=True)]
    return units, points or [None] * len(batches)


@torch.no_grad()
def first_pass(run: Run, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO: (the rows' reference log-probs [2B], [mismatched log-ratio sum, count]) of one micro batch.

    The policy runs in eval mode: z0 estimates the policy's KL, not a dropout sample of it (TRL takes it from
    the training forward; with lora.dropout 0 the two agree)."""
    with eng.evaluating(run.engine):
        if run.reference_table is None:
            policy, reference, tokens = eng.forward(run.engine, batch.inputs, pairs=True)
        else:
            policy, _, tokens = eng.forward(run.engine, batch.inputs, pairs=True, reference=False)
            reference = lookup(run.reference_table, batch.indices, policy)
    return reference, mismatched_sums(policy.float(), reference.float(), tokens)


def micro_loss(
    run: Run, batch: MicroBatch, meter: StepMeter, units: StepUnits | None, point: ReferencePoint | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss to backward, this micro batch's term of the logged step loss, the MoE router's weighted
    load-balancing loss of its policy pass, 0 for a dense model).

    With `units` (global normalisation, objectives/normalize.py) the logged term is the micro batch's share
    of the global batch's loss and the backward loss is that times `units.scale`; without, both are the
    micro batch's own mean (SFT's NLL per token, the mean preference loss per pair, KTO's per example)."""
    if run.objective.name == "sft":
        nll_sum, num_tokens, router, by_source = forward_sft(run, batch)
        if batch.sources is not None:  # each rank's part under sequence parallelism: all of them add it
            meter.add_sources(by_source, *counted_sources(batch.sources, rank_in_group() == 0))
        if units is None:
            loss = sft_loss(nll_sum, num_tokens)
            return loss, loss, router
        share = sft_contribution(nll_sum, units)
        return share * units.scale, share, router
    if point is not None:
        return kto_micro_loss(run, batch, meter, units, point)
    if run.reference_table is None:
        policy, reference, tokens, router = eng.forward(
            run.engine, batch.inputs, pairs=True, reference=uses_reference(run.objective), aux=True
        )
    else:
        policy, _, tokens, router = eng.forward(
            run.engine, batch.inputs, pairs=True, reference=False, aux=True
        )
        reference = lookup(run.reference_table, batch.indices, policy)
    scores = score_pairs(run.objective, policy, reference, tokens, batch_nll=units is None)
    meter.add_pairs(scores.chosen_rewards, scores.rejected_rewards, scores.margin, scores.valid)
    if scores.log_odds is not None:
        meter.add_means(orpo_means(scores))
    if batch.sources is not None:  # the group's ranks hold the same pair terms: its first rank adds them
        first = rank_in_group() == 0
        per_source = pair_losses(run.objective, scores, batch.sources, global_norm=units is not None)
        meter.add_sources(per_source if first else None, *counted_sources(batch.sources, first))
    if units is None:
        loss = mean_over_pairs(scores.loss, scores.valid)
        return loss, loss, router
    share = pair_contribution(scores, units, nll_weight(run.objective))
    return share * units.scale, share, router


def forward_sft(run: Run, batch: MicroBatch) -> tuple[torch.Tensor, ...]:
    """(summed NLL, supervised tokens, router loss, a mixture's summed NLL per source or None)."""
    if batch.sources is None:
        return (*eng.forward(run.engine, batch.inputs, aux=True), None)
    inputs = {**batch.inputs, "label_groups": batch.sources.groups}
    return eng.forward(run.engine, inputs, aux=True, num_groups=len(batch.sources.units))


def kto_micro_loss(
    run: Run, batch: MicroBatch, meter: StepMeter, units: StepUnits | None, point: ReferencePoint
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """micro_loss for KTO: the policy alone (the reference log-probs came from the step's first pass)."""
    policy, _, tokens, router = eng.forward(run.engine, batch.inputs, pairs=True, reference=False, aux=True)
    terms = score_examples(run.objective, policy, point.reference, tokens, batch.desirable, point.kl)
    meter.add_means(kto_means(terms, point.kl))
    if units is None:
        loss = mean_over_pairs(terms.loss, terms.valid)
        return loss, loss, router
    share = example_contribution(terms.loss, terms.valid, units)
    return share * units.scale, share, router


def orpo_means(scores: PairScores) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What ORPO logs besides the rewards, as TRL does: the NLL term (per chosen token), the mean
    logσ(log odds ratio) (TRL's `log_odds_ratio`) and the mean log odds ratio (TRL's `log_odds_chosen`)."""
    valid, pairs = scores.valid, scores.valid.sum()
    tokens = scores.chosen_tokens * valid
    return {
        "nll_loss": ((scores.chosen_nll * tokens).sum(), tokens.sum()),
        "log_odds_ratio": ((F.logsigmoid(scores.log_odds) * valid).sum(), pairs),
        "log_odds": ((scores.log_odds * valid).sum(), pairs),
    }


def kto_means(terms: UnpairedTerms, kl: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What KTO logs, as TRL does: the mean reward β·r of desirable and of undesirable examples, and z0."""
    wanted, unwanted = terms.valid * terms.desirable, terms.valid * (1 - terms.desirable)
    return {
        "rewards_chosen": ((terms.rewards * wanted).sum(), wanted.sum()),
        "rewards_rejected": ((terms.rewards * unwanted).sum(), unwanted.sum()),
        "kl": (kl, torch.ones_like(kl)),
    }
