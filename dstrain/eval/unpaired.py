"""KTO's eval: the objective's mean loss per example over the held-out set, its reward margin, and for a
preference eval file (each pair giving a desirable and an undesirable example) the preference accuracy.

The loss needs the reference point z0 before any example's loss: one z0 for the whole set (the mean log-ratio
of its mismatched answers), so that the eval loss does not depend on the eval batch size (TRL takes z0 per
eval batch). Each rank scores its share; every example's log-ratios go into one table indexed by the
example's number, summed over ranks in one all-reduce, and every rank computes the same metrics from it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from dstrain import engine as eng
from dstrain.config.run import ObjectiveConfig
from dstrain.data.batches import MicroBatch
from dstrain.data.pairs import split_pair
from dstrain.distributed.collectives import all_reduce_sum
from dstrain.distributed.sequence import rank_in_group
from dstrain.objectives.kto import kto_loss, reference_point

# rows of the per-example table
RATIO, MISMATCHED, REAL, REAL_MISMATCHED, DESIRABLE = range(5)


def evaluate_examples(
    engine: DeepSpeedEngine,
    batches: Iterator[MicroBatch],
    objective: ObjectiveConfig,
    size: int,
    paired: bool,
) -> dict[str, float]:
    """eval_loss (KTO's mean loss per example, one z0 for the set), eval_reward_margin (mean reward β·r of
    the desirable examples minus that of the undesirable ones, TRL's rewards/margins; a class the set lacks
    counts 0) and, when the examples come from preference pairs (`paired`: examples 2r and 2r + 1 are pair
    r's chosen and rejected answers), eval_pref_acc: the share of pairs whose chosen answer has the higher
    reward. `size`: one more than the largest example number."""
    table = torch.zeros(5, size, dtype=torch.float64)
    for batch in batches:
        policy, reference, tokens = eng.forward(engine, batch.inputs, pairs=True)
        (answer, mismatched), (ref_answer, ref_mismatched) = split_pair(policy), split_pair(reference)
        answer_tokens, mismatched_tokens = split_pair(tokens)
        real = answer_tokens > 0  # filler rows (short shares) have no answer tokens, and no example number
        rows = torch.tensor(batch.indices, dtype=torch.long)[real.cpu()]
        values = torch.stack(
            [
                answer - ref_answer,
                mismatched - ref_mismatched,
                real.float(),
                (mismatched_tokens > 0).float(),
                batch.desirable.to(real.device).float(),
            ]
        )
        table[:, rows] = values[:, real].double().cpu()
    if rank_in_group():  # a sequence-parallel group's ranks all hold its rows: its first rank adds them
        table.zero_()
    table = all_reduce_sum(table).cpu()
    return examples_metrics(table, objective, paired)


def examples_metrics(table: torch.Tensor, objective: ObjectiveConfig, paired: bool) -> dict[str, float]:
    """The metrics of a summed per-example table (see evaluate_examples), the same on every rank."""
    real = table[REAL] > 0
    kl = reference_point((table[MISMATCHED] * table[REAL_MISMATCHED]).sum(), table[REAL_MISMATCHED].sum())
    desirable = table[DESIRABLE] > 0
    losses, rewards = kto_loss(
        table[RATIO],
        torch.zeros_like(table[RATIO]),
        desirable,
        kl,
        beta=objective.beta,
        desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
    )
    result = {
        "eval_loss": float(losses[real].mean()) if real.any() else 0.0,
        "eval_reward_margin": _mean(rewards[real & desirable]) - _mean(rewards[real & ~desirable]),
        "eval_kl": float(kl),
    }
    if paired:
        end = 2 * (len(rewards) // 2)
        chosen, rejected = rewards[0:end:2], rewards[1:end:2]
        both = real[0:end:2] & real[1:end:2]
        result["eval_pref_acc"] = _mean((chosen > rejected)[both].double())
    return result


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
