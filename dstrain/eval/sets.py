"""Eval sets: the unnamed one a plain `data.eval` list makes, or named ones (`data.eval: {rag: [...], ...}`).

Every eval reports its metrics over all sets together under the plain keys (`eval_loss`: token-weighted over
every set's tokens; preference metrics per pair over every set's pairs), and each named set's own under
`<metric>/<name>` (`eval_loss/rag`). Both come from the same per-set sums, which cross the ranks in one
all-reduce: each metric is a ratio of sums, so the whole is never an average of the sets' averages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dstrain.config.metrics import set_metric

if TYPE_CHECKING:
    import torch

    from dstrain.data.batches import Example
    from dstrain.data.pairs import PairExample


@dataclass(frozen=True)
class EvalSet:
    name: str  # "" for the one unnamed set of a plain-list data.eval
    examples: list[Example] | list[PairExample]


def metrics_by_set(
    names: Sequence[str], sums: torch.Tensor, metrics: Callable[[torch.Tensor], dict[str, float]]
) -> dict[str, float]:
    """`metrics` of the sums of all sets (rows of `sums`, one per set in `names`' order), then of each named
    set's own row under its keys (`eval_loss/rag`)."""
    result = metrics(sums.sum(dim=0))
    for name, row in zip(names, sums, strict=True):
        if name:
            result |= {set_metric(key, name): value for key, value in metrics(row).items()}
    return result


def describe_sets(sets: Sequence[EvalSet]) -> str:
    """`16 eval samples`, with named sets `16 eval samples (rag 8, general 8)`, for the start-up line."""
    total = sum(len(s.examples) for s in sets)
    named = ", ".join(f"{s.name} {len(s.examples)}" for s in sets if s.name)
    return f"{total} eval samples" + (f" ({named})" if named else "")
