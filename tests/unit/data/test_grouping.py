"""data.group_by_length: each epoch still a permutation, far less padding, independent of the world size
and of where a run (re)starts."""

from __future__ import annotations

import numpy as np
import pytest

from dstrain.config.zero import BatchPlan
from dstrain.data.grouping import LengthGroupedOrder
from dstrain.data.loader import MicroBatchSampler
from dstrain.data.stream import EpochOrder


def sizes_for(n: int, seed: int = 0) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).integers(50, 2000, size=n)


def grouped(n: int, micro: int, window: int, epoch: int = 0, batch: int = 0) -> LengthGroupedOrder:
    order = EpochOrder(n, 7, epoch, block=16, window=4)
    return LengthGroupedOrder(order, sizes_for(n), micro, window, batch or micro)


@pytest.mark.parametrize(
    ("n", "micro", "window", "batch"), [(1000, 4, 8, 8), (1001, 4, 8, 16), (37, 3, 100, 3), (64, 1, 5, 4)]
)
def test_an_epoch_is_still_a_permutation(n: int, micro: int, window: int, batch: int):
    assert sorted(grouped(n, micro, window, batch=batch).ids(0, n)) == list(range(n))


def test_a_whole_step_holds_similar_sizes():
    """Every rank's micro batch of a step costs about the same: none waits for a longer one."""
    n, micro, batch = 4096, 4, 16
    sizes = sizes_for(n)
    steps = sizes[np.asarray(grouped(n, micro, 64, batch=batch).ids(0, n))].reshape(-1, batch)
    plain = sizes[np.asarray(EpochOrder(n, 7, 0, block=16, window=4).ids(0, n))].reshape(-1, batch)
    spread = (steps.max(axis=1) - steps.min(axis=1)).mean()
    assert spread < 0.1 * (plain.max(axis=1) - plain.min(axis=1)).mean()


def test_grouping_cuts_padding():
    n, micro = 4096, 8
    sizes = sizes_for(n)
    plain = EpochOrder(n, 7, 0, block=16, window=4).ids(0, n)
    together = grouped(n, micro, 64).ids(0, n)

    def padding(ids: list[int]) -> float:
        batches = sizes[np.asarray(ids)].reshape(-1, micro)
        return float((batches.max(axis=1)[:, None] - batches).sum() / batches.max(axis=1).sum() / micro)

    assert padding(together) < 0.2 * padding(plain)


@pytest.mark.parametrize(("start", "stop"), [(0, 4), (3, 10), (28, 37), (0, 1000), (995, 1000), (500, 500)])
def test_any_range_matches_the_full_scan(start: int, stop: int):
    full = grouped(1000, 4, 7).ids(0, 1000)
    assert grouped(1000, 4, 7).ids(start, stop) == full[start:stop]  # a fresh order: a resume's seek


def test_epochs_group_differently_and_deterministically():
    assert grouped(500, 4, 8, epoch=0).ids(0, 500) == grouped(500, 4, 8, epoch=0).ids(0, 500)
    assert grouped(500, 4, 8, epoch=0).ids(0, 500) != grouped(500, 4, 8, epoch=1).ids(0, 500)


def test_size_count_must_match_the_epoch():
    with pytest.raises(ValueError, match="3 record sizes"):
        LengthGroupedOrder(EpochOrder(10, 0, 0), np.ones(3), 2, 4, 4)


def per_step(plan: BatchPlan, n: int, total: int, start: int = 0) -> list[list[int]]:
    """The sorted samples of each optimizer step over all ranks."""
    group = (sizes_for(n), 6)
    ranks = [
        list(MicroBatchSampler(n, plan, rank, 3, total, start, 16, 4, group=group))
        for rank in range(plan.world)
    ]
    steps = []
    for step in range(total - start):
        micro = [
            ids for rank in ranks for ids in rank[step * plan.accumulation : (step + 1) * plan.accumulation]
        ]
        steps.append(sorted(i for ids in micro for i in ids))
    return steps


def test_the_same_global_batches_on_any_world_size():
    """Grouping deals whole global batches: any split of the global batch trains the same samples in each
    step (with the same micro batch, windows are identical too)."""
    n, total = 400, 30
    assert per_step(BatchPlan(4, 2, 1), n, total) == per_step(BatchPlan(4, 1, 2), n, total)
    assert per_step(BatchPlan(2, 4, 1), n, total) == per_step(BatchPlan(2, 2, 2), n, total)
    assert per_step(BatchPlan(2, 1, 4), n, total) == per_step(BatchPlan(2, 4, 1), n, total)


@pytest.mark.parametrize("start", [1, 7, 13])
def test_a_resumed_sampler_yields_the_tail(start: int):
    plan, n, total = BatchPlan(4, 1, 2), 300, 20
    assert per_step(plan, n, total, start) == per_step(plan, n, total)[start:]
