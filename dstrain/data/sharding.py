"""Each rank's share of a pass over a fixed list (eval loss, generation, reference log-probs), in the same
number of batches on every rank.

Under ZeRO-3 every forward (and `generate` with synced_gpus) gathers parameters collectively: a rank that
ran one forward fewer would leave the others waiting in a gather until the collective timeout. So a rank
takes every `world`-th item from `rank` on, and every rank cuts its share into as many batches as the
longest share needs; a shorter share is topped up with a filler that the caller does not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def equal_rank_batches(
    items: Sequence[T], size: int, rank: int, world: int, filler: T | None = None
) -> list[tuple[list[T], int]]:
    """This rank's batches of up to `size` as (batch, number of real items at its front).

    Every rank gets ceil(ceil(len(items) / world) / size) batches. With a `filler`, batch k has the same
    length on every rank (the rest after the real items is filler); without one a short share's batches
    are just shorter, possibly empty, and the caller runs its own stand-in row (collate_micro makes one
    for an empty batch).
    """
    share = list(items[rank::world])
    per_rank = -(-len(items) // world)
    batches = []
    for start in range(0, per_rank, size):
        real = share[start : start + size]
        batch = real if filler is None else real + [filler] * (min(size, per_rank - start) - len(real))
        batches.append((batch, len(real)))
    return batches
