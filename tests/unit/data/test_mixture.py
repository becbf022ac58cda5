"""A mixture's plan and order (data/mixture.py, data/mixture_order.py) without files: sources are corpus index
ranges. Each source keeps its own shuffled order per epoch, a small one restarts in a fresh order, limits
stop a source and hand its share to the others, and any global batch is the same on any world size and
from any restart step, with or without length grouping."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dstrain.config.zero import BatchPlan
from dstrain.data.loader import MicroBatchSampler
from dstrain.data.mixture import MixturePlan, Origin, SourceSpan
from dstrain.data.mixture_order import MixtureOrder

SPANS = [SourceSpan("rag", 0, 60, 3.0, seed=11), SourceSpan("general", 60, 13, 1.0, seed=12)]
BATCH = 8


def sizes(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids) * 7919) % 1000 + 10  # a fixed pseudo-random size per record


def owner(ids: np.ndarray, spans: list[SourceSpan]) -> np.ndarray:
    starts = np.array([s.start for s in spans])
    return np.searchsorted(starts, ids, side="right") - 1


def batches(order: MixtureOrder, steps: range) -> list[np.ndarray]:
    return [order.batch(step) for step in steps]


@pytest.mark.parametrize("group", [0, 3])
def test_each_batch_follows_the_weights_and_each_source_its_own_order(group):
    plan = MixturePlan(SPANS, BATCH)
    order = MixtureOrder(plan, seed=1, block=4, window=2, sizes=sizes, group_batches=group)
    drawn = np.concatenate(batches(order, range(30)))  # 240 records: 180 rag (3 epochs), 60 general (4.6)
    for step, batch in enumerate(batches(order, range(30))):
        assert (
            np.bincount(owner(batch, SPANS), minlength=2).tolist()
            == [6, 2]
            == plan.composition(step).tolist()
        )
    rag, general = drawn[drawn < 60], drawn[drawn >= 60]
    assert sorted(rag) == sorted(list(range(60)) * 3)
    assert sorted(set(np.bincount(general - 60).tolist())) == [4, 5]  # 4 epochs and 8 of the fifth
    if not group:  # in draw order: every record once per epoch; the small source restarts 4 times, reshuffled
        assert all(sorted(rag[e * 60 : (e + 1) * 60]) == list(range(60)) for e in range(3))
        epochs = [tuple(general[e * 13 : (e + 1) * 13]) for e in range(4)]
        assert all(sorted(e) == list(range(60, 73)) for e in epochs) and len(set(epochs)) == 4
    assert plan.epochs(30).tolist() == [2, 4]


def test_max_samples_draws_the_first_records_only():
    spans = [replace(SPANS[0], records=10), SPANS[1]]  # max_samples 10: records 0..9 of rag, in file order
    drawn = np.concatenate(batches(MixtureOrder(MixturePlan(spans, BATCH), seed=1), range(20)))
    rag = drawn[owner(drawn, spans) == 0]
    assert set(rag.tolist()) == set(range(10)) and len(rag) == 120


def test_a_source_at_its_epochs_limit_stops_and_the_others_take_its_share():
    spans = [replace(SPANS[0], records=30), replace(SPANS[1], epochs=2)]  # general: 26 records, then stops
    plan = MixturePlan(spans, BATCH)
    assert plan.end is None and len(plan.segments) == 2
    stop = plan.segments[1].start
    assert plan.counts(stop).tolist()[1] == 26 and plan.counts(stop + 50).tolist()[1] == 26
    assert plan.composition(stop + 3).tolist() == [8, 0]
    assert all(plan.composition(s).sum() == BATCH for s in range(stop + 5))
    both = [replace(spans[0], epochs=1), spans[1]]  # every source limited: 30 + 26 records, 7 batches
    ended = MixturePlan(both, BATCH)
    assert ended.end == 7 and ended.counts(7).tolist() == [30, 26]
    uneven = MixturePlan([replace(spans[0], epochs=1, records=31), spans[1]], BATCH)
    assert uneven.end == 7  # 57 records: the eighth batch cannot be filled
    with pytest.raises(IndexError):
        uneven.counts(8)


@pytest.mark.parametrize("group", [0, 2])
def test_a_restart_on_another_world_size_gives_the_same_batches(group):
    plan = MixturePlan(SPANS, 12)
    order = lambda: MixtureOrder(plan, seed=3, block=4, window=2, sizes=sizes, group_batches=group)  # noqa: E731

    def steps(plan_: BatchPlan, start: int, total: int = 20) -> list[list[int]]:
        per_rank = [
            list(MicroBatchSampler(0, plan_, rank, 3, total, start, mixture=order()))
            for rank in range(plan_.world)
        ]
        out = []
        for step in range(total - start):
            ids: list[int] = []
            for accum in range(plan_.accumulation):
                for rank in range(plan_.world):
                    ids += per_rank[rank][step * plan_.accumulation + accum]
            out.append(ids)
        return out

    one_rank = steps(BatchPlan(3, 4, 1), 0)
    assert one_rank == steps(BatchPlan(3, 2, 2), 0) == steps(BatchPlan(2, 2, 3), 0)
    for start in (1, 7, 19):
        assert steps(BatchPlan(3, 2, 2), start) == one_rank[start:]


def test_grouping_sorts_lengths_within_batches_and_keeps_each_window_s_draws():
    plan = MixturePlan(SPANS, BATCH)
    plain = MixtureOrder(plan, seed=1, block=4, window=2)
    grouped = MixtureOrder(plan, seed=1, block=4, window=2, sizes=sizes, group_batches=4)
    for first in range(0, 16, 4):
        window = range(first, first + 4)
        assert sorted(np.concatenate(batches(plain, window))) == sorted(
            np.concatenate(batches(grouped, window))
        )
        for batch in batches(grouped, window):
            assert (np.diff(sizes(batch)) <= 0).all()  # longest first: micro batches of similar lengths


def test_a_plan_from_an_origin_continues_each_source_where_it_stopped():
    plan = MixturePlan(SPANS, BATCH)
    at = plan.counts(9)
    moved = MixturePlan(
        [replace(SPANS[0], weight=1.0), SPANS[1]], BATCH, Origin(9, tuple(int(c) for c in at))
    )
    assert moved.counts(9).tolist() == at.tolist()
    assert moved.composition(9).tolist() == [4, 4] and moved.composition(100).tolist() == [4, 4]
    before, after = MixtureOrder(plan, seed=1), MixtureOrder(moved, seed=1)
    rag_next = [i for i in after.batch(9) if i < 60]
    assert rag_next == [i for i in np.concatenate(batches(before, range(9, 12))) if i < 60][:4]
    with pytest.raises(IndexError):
        moved.counts(8)
