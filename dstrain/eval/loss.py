"""Eval loop: token-weighted mean loss over the held-out set, sharded across ranks; for preference data also
the preference accuracy (share of pairs whose implicit reward margin is > 0) and the mean reward margin; for
KTO the objective's mean loss per example and its reward margin (eval/unpaired.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
from dstrain.eval.unpaired import evaluate_examples
from dstrain.objectives.preference import nll_weight, score_pairs, uses_reference


@torch.no_grad()
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
    """Eval metrics over all of `examples` (a collective: every rank calls it); `share_prompt`: pairs in
    the shared-prompt layout (data/pairs.py); `interrupted` is asked before each batch (training.phases)."""
    batches = interruptible(eval_batches(examples, micro, rank, world, pad_id, share_prompt), interrupted)
    with eng.evaluating(engine):
        if isinstance(examples[0], KtoExample):
            size = max(example.index for example in examples) + 1
            return evaluate_examples(engine, batches, objective, size, examples[0].paired)
        if isinstance(examples[0], PairExample):
            return _evaluate_pairs(engine, batches, objective)
        return {"eval_loss": _evaluate_tokens(engine, batches)}


def own_share(totals: torch.Tensor) -> torch.Tensor:
    """Every rank of a sequence-parallel group holds the group's sums: only its first rank adds them."""
    return totals if rank_in_group() == 0 else torch.zeros_like(totals)


def _evaluate_tokens(engine: DeepSpeedEngine, batches: Iterator[MicroBatch]) -> float:
    """Mean NLL per supervised token."""
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        nll_sum, num_tokens = eng.forward(engine, batch.inputs)
        totals += torch.stack([nll_sum.double().cpu(), num_tokens.double().cpu()])
    nll, tokens = all_reduce_sum(own_share(totals)).tolist()
    return nll / max(tokens, 1.0)


def _evaluate_pairs(
    engine: DeepSpeedEngine, batches: Iterator[MicroBatch], objective: ObjectiveConfig
) -> dict[str, float]:
    """eval_loss is the objective's mean loss per pair (for sft: NLL per chosen token; the NLL term of dpo_nll
    and orpo per chosen token of the whole set, as training normalises it over the global batch), plus pair
    metrics (orpo: its own rewards, β × mean log-prob per token, give the margin)."""
    # [loss sum, chosen nll sum, chosen tokens, margin sum, correct, pairs]
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
    loss, nll, tokens, margin, correct, count = all_reduce_sum(own_share(totals)).tolist()
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
