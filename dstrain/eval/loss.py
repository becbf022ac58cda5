"""Eval loop: token-weighted mean loss over the held-out sets, sharded across ranks; for preference data also
the preference accuracy (share of pairs whose implicit reward margin is > 0) and the mean reward margin; for
KTO the objective's mean loss per example and its reward margin (eval/unpaired.py). Named sets
(eval/sets.py) report the same metrics each, as `eval_loss/<name>`, ..."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from dstrain import engine as eng
from dstrain.config.run import ObjectiveConfig
from dstrain.data.batches import Example, MicroBatch
from dstrain.data.kto import KtoExample
from dstrain.data.loader import eval_batches
from dstrain.data.pairs import PairExample
from dstrain.distributed.collectives import all_reduce_sum
from dstrain.distributed.sequence import rank_in_group
from dstrain.distributed.stop import interruptible
from dstrain.eval.sets import EvalSet, metrics_by_set
from dstrain.eval.unpaired import evaluate_examples
from dstrain.objectives.preference import nll_weight, score_pairs, uses_reference


@torch.no_grad()
def evaluate_sets(
    engine: DeepSpeedEngine,
    sets: Sequence[EvalSet],
    micro: int,
    rank: int,
    world: int,
    pad_id: int,
    objective: ObjectiveConfig,
    share_prompt: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Eval metrics over all `sets` together, and each named set's own (a collective: every rank calls it).

    Each set is cut into the same number of batches on every rank (ZeRO-3 gathers in every forward), one set
    after the other; the per-set sums then cross the ranks in one all-reduce. `share_prompt`: pairs in the
    shared-prompt layout (data/pairs.py); `interrupted` is asked before each batch (training.phases).
    """
    first = sets[0].examples[0]
    if isinstance(first, KtoExample):  # one set: config/checks.py refuses named sets under kto
        (only,) = sets
        shard = eval_batches(only.examples, micro, rank, world, pad_id, share_prompt)
        with eng.evaluating(engine):
            size = max(example.index for example in only.examples) + 1
            return evaluate_examples(engine, interruptible(shard, interrupted), objective, size, first.paired)
    pairs = isinstance(first, PairExample)
    local = []
    with eng.evaluating(engine):
        for eval_set in sets:
            shard = eval_batches(eval_set.examples, micro, rank, world, pad_id, share_prompt)
            batches = interruptible(shard, interrupted)
            local.append(_pair_sums(engine, batches, objective) if pairs else _token_sums(engine, batches))
    sums = all_reduce_sum(own_share(torch.stack(local)))
    metrics = partial(_pair_metrics, objective=objective) if pairs else _token_metrics
    return metrics_by_set([s.name for s in sets], sums, metrics)


def evaluate(
    engine: DeepSpeedEngine,
    examples: list[Example] | list[PairExample] | list[KtoExample],
    micro: int,
    rank: int,
    world: int,
    pad_id: int,
    objective: ObjectiveConfig,
    share_prompt: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Eval metrics over all of `examples`, one unnamed set (see evaluate_sets)."""
    sets = [EvalSet("", examples)]
    return evaluate_sets(engine, sets, micro, rank, world, pad_id, objective, share_prompt, interrupted)


def own_share(totals: torch.Tensor) -> torch.Tensor:
    """Every rank of a sequence-parallel group holds the group's sums: only its first rank adds them."""
    return totals if rank_in_group() == 0 else torch.zeros_like(totals)


def _token_sums(engine: DeepSpeedEngine, batches: Iterator[MicroBatch]) -> torch.Tensor:
    """This rank's [NLL sum, supervised tokens]."""
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        nll_sum, num_tokens = eng.forward(engine, batch.inputs)
        totals += torch.stack([nll_sum.double().cpu(), num_tokens.double().cpu()])
    return totals


def _token_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Mean NLL per supervised token."""
    nll, tokens = sums.tolist()
    return {"eval_loss": nll / max(tokens, 1.0)}


def _pair_sums(
    engine: DeepSpeedEngine, batches: Iterator[MicroBatch], objective: ObjectiveConfig
) -> torch.Tensor:
    """This rank's [loss sum, chosen nll sum, chosen tokens, margin sum, correct, pairs]."""
    totals = torch.zeros(6, dtype=torch.float64)
    for batch in batches:
        policy, reference, tokens = eng.forward(
            engine, batch.inputs, pairs=True, reference=uses_reference(objective)
        )
        scores = score_pairs(objective, policy, reference, tokens, batch_nll=False)
        valid = scores.valid
        chosen_tokens = tokens[: len(valid)] * valid
        row = [
            (scores.loss * valid).sum(),
            (scores.chosen_nll * chosen_tokens).sum(),
            chosen_tokens.sum(),
            (scores.margin * valid).sum(),
            ((scores.margin > 0).float() * valid).sum(),
            valid.sum(),
        ]
        totals += torch.stack(row).double().cpu()
    return totals


def _pair_metrics(sums: torch.Tensor, objective: ObjectiveConfig) -> dict[str, float]:
    """eval_loss is the objective's mean loss per pair (for sft: NLL per chosen token; dpo_nll's NLL term per
    chosen token of the whole set, as training normalises it over the global batch), plus pair metrics."""
    loss, nll, tokens, margin, correct, count = sums.tolist()
    count = max(count, 1.0)
    per_token_nll = nll / max(tokens, 1.0)
    if objective.name == "sft":
        eval_loss = per_token_nll
    else:
        eval_loss = loss / count + nll_weight(objective) * per_token_nll
    return {
        "eval_loss": eval_loss,
        "eval_pref_acc": correct / count,
        "eval_reward_margin": margin / count,
    }
