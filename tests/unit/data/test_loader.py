"""Global sample order: each step's global batch is the same whatever the world size, resume seeks."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dstrain.config.run import DataConfig, ModelConfig, RunConfig
from dstrain.config.zero import BatchPlan
from dstrain.data.batches import IGNORE, Example
from dstrain.data.loader import (
    ExampleDataset,
    LoaderOptions,
    MicroBatchSampler,
    eval_batches,
    steps_per_epoch,
    train_loader,
)
from dstrain.data.sharding import equal_rank_batches
from dstrain.data.stream import EpochOrder
from dstrain.errors import DataError

PAD = 0


def micro_batches(
    n: int, plan: BatchPlan, rank: int, total: int, start: int = 0, seed: int = 3
) -> list[list[int]]:
    return list(MicroBatchSampler(n, plan, rank, seed, total, start))


def per_step(n: int, plan: BatchPlan, total: int, start: int = 0, seed: int = 3) -> list[list[int]]:
    """The global batch of each step [start, total) as the samples in slot order: accum, then rank."""
    ranks = [micro_batches(n, plan, r, total, start, seed) for r in range(plan.world)]
    steps = []
    for step in range(total - start):
        samples: list[int] = []
        for accum in range(plan.accumulation):
            for rank in range(plan.world):
                samples += ranks[rank][step * plan.accumulation + accum]
        steps.append(samples)
    return steps


def make_examples(n: int) -> list[Example]:
    """Example i has length 1 + i % 5 and tokens/labels that encode i, so batches can be traced back."""
    return [Example([100 + i] * (1 + i % 5), [100 + i] * (1 + i % 5)) for i in range(n)]


# ------------------------------------------------------------------------------------ sample order


def epoch_order(n: int, seed: int, epoch: int, block: int = 128, window: int = 64) -> list[int]:
    return EpochOrder(n, seed, epoch, block, window).ids(0, n)


@pytest.mark.parametrize(("n", "block", "window"), [(50, 128, 64), (1000, 7, 5), (1001, 10, 4), (64, 8, 8)])
def test_epoch_order_is_a_deterministic_permutation(n: int, block: int, window: int):
    order = epoch_order(n, 1, 0, block, window)
    assert sorted(order) == list(range(n))
    assert order == epoch_order(n, 1, 0, block, window)
    assert order != epoch_order(n, 1, 1, block, window)
    assert order != epoch_order(n, 2, 0, block, window)


@pytest.mark.parametrize(("n", "block", "window"), [(1000, 7, 5), (1001, 10, 4), (257, 16, 1)])
def test_epoch_order_seeks_to_any_position(n: int, block: int, window: int):
    order = EpochOrder(n, 4, 2, block, window)
    full = order.ids(0, n)
    for start, stop in [
        (0, 1),
        (5, 90),
        (n // 3, n // 3 + 1),
        (n - 17, n),
        (block * window - 1, block * window + 3),
    ]:
        fresh = EpochOrder(n, 4, 2, block, window)  # a resumed run starts from nothing
        assert fresh.ids(start, stop) == full[start:stop]


def test_epoch_order_mixes_beyond_one_block():
    n, block, window = 4096, 16, 32
    order = epoch_order(n, 0, 0, block, window)
    first_window = order[: block * window]
    assert len({i // block for i in first_window}) == window  # 32 distinct blocks interleaved
    positions = {i: p for p, i in enumerate(order)}
    # neighbours in the file do not stay neighbours in the order
    gaps = [abs(positions[i + 1] - positions[i]) for i in range(0, n - 1, block)]
    assert sum(gap > 1 for gap in gaps) > 0.9 * len(gaps)


def test_epochs_differ_but_are_deterministic():
    plan = BatchPlan(2, 1, 2)
    n, per_epoch = 20, 5
    run = per_step(n, plan, total=3 * per_epoch)
    again = per_step(n, plan, total=3 * per_epoch)
    assert run == again
    epochs = [list(itertools.chain(*run[e * per_epoch : (e + 1) * per_epoch])) for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = per_step(n, plan, total=3 * per_epoch, seed=4)
    assert other_seed != run


@pytest.mark.parametrize(
    ("n", "plan"), [(24, BatchPlan(3, 2, 2)), (27, BatchPlan(2, 2, 2)), (10, BatchPlan(4, 1, 1))]
)
def test_one_epoch_covers_every_index_once_except_the_remainder(n: int, plan: BatchPlan):
    per_epoch = steps_per_epoch(n, plan)
    assert per_epoch == n // plan.global_batch
    ranks = [micro_batches(n, plan, r, per_epoch) for r in range(plan.world)]
    for batches in ranks:
        assert len(batches) == per_epoch * plan.accumulation
        assert all(len(b) == plan.micro for b in batches)
    seen = [i for batches in ranks for b in batches for i in b]
    assert len(seen) == len(set(seen)) == per_epoch * plan.global_batch
    dropped = set(range(n)) - set(seen)
    assert len(dropped) == n % plan.global_batch
    assert dropped == set(epoch_order(n, 3, 0)[per_epoch * plan.global_batch :])  # the tail of the order


def test_ranks_never_share_a_sample_within_a_step():
    plan = BatchPlan(2, 3, 2)
    for step in per_step(40, plan, total=12):
        assert len(step) == len(set(step)) == plan.global_batch


def test_two_ranks_equal_one_rank_with_twice_the_accumulation():
    n, total = 37, 20  # 37 // 8 = 4 steps per epoch: crosses several epochs
    two = BatchPlan(4, 1, 2)
    one = BatchPlan(4, 2, 1)
    rank0 = micro_batches(n, two, 0, total)
    rank1 = micro_batches(n, two, 1, total)
    single = micro_batches(n, one, 0, total)
    assert len(rank0) == len(rank1) == total and len(single) == 2 * total
    for step in range(total):
        assert [rank0[step], rank1[step]] == single[2 * step : 2 * step + 2]
    assert per_step(n, two, total) == per_step(n, one, total)


def test_same_global_batch_same_steps_for_other_splits():
    n, total = 50, 14
    reference = per_step(n, BatchPlan(8, 1, 1), total)
    for plan in (BatchPlan(2, 2, 2), BatchPlan(1, 4, 2), BatchPlan(4, 1, 2), BatchPlan(2, 1, 4)):
        assert per_step(n, plan, total) == reference, plan


@pytest.mark.parametrize("start", [0, 1, 4, 5, 9, 13])
def test_start_step_yields_the_tail(start: int):
    n, total = 30, 14  # 30 // 6 = 5 steps per epoch
    plan = BatchPlan(3, 1, 2)
    for rank in range(2):
        full = micro_batches(n, plan, rank, total)
        resumed = MicroBatchSampler(n, plan, rank, 3, total, start)
        assert len(resumed) == total - start
        assert list(resumed) == full[start:]


@pytest.mark.parametrize("start", [0, 3, 5, 8])
def test_resume_on_another_world_size_continues_the_order(start: int):
    n, total = 30, 12
    before = per_step(n, BatchPlan(3, 1, 2), total)  # 2 ranks
    after = per_step(n, BatchPlan(3, 2, 1), total, start=start)  # resumed on 1 rank
    assert after == before[start:]
    after4 = per_step(n, BatchPlan(1, 3, 2), total, start=start)
    assert after4 == before[start:]


def test_sampler_len_counts_micro_batches():
    sampler = MicroBatchSampler(100, BatchPlan(2, 3, 2), rank=1, seed=0, total_steps=10, start_step=4)
    assert len(sampler) == (10 - 4) * 3 == len(list(sampler))


def test_steps_per_epoch_needs_one_global_batch():
    assert steps_per_epoch(16, BatchPlan(4, 2, 2)) == 1
    with pytest.raises(DataError) as info:
        steps_per_epoch(15, BatchPlan(4, 2, 2))
    msg = str(info.value)
    assert "15 usable samples" in msg and "global batch of 16" in msg
    assert "micro 4 x accumulation 2 x world 2" in msg
    with pytest.raises(DataError):
        MicroBatchSampler(3, BatchPlan(4, 1, 1), rank=0, seed=0, total_steps=1)


# ------------------------------------------------------------------------------------------ loaders


def test_loader_batches_follow_the_sampler():
    examples = make_examples(24)
    plan = BatchPlan(3, 2, 2)
    options = LoaderOptions(pad_id=PAD, seed=5)
    loader = train_loader(ExampleDataset(examples), plan, options, rank=1, total_steps=6)
    sampler = MicroBatchSampler(24, plan, 1, 5, 6)
    batches = [b.inputs for b in loader]
    assert len(batches) == len(loader) == 12
    for batch, indices in zip(batches, sampler, strict=True):
        assert batch["input_ids"].shape[0] == 3
        first_tokens = batch["input_ids"][:, 0].tolist()
        assert first_tokens == [100 + i for i in indices]
        longest = max(len(examples[i].input_ids) for i in indices)
        assert batch["input_ids"].shape[1] == longest
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()


def test_workers_do_not_change_the_batches():
    examples = make_examples(40)
    plan = BatchPlan(4, 1, 2)
    kwargs = {"plan": plan, "rank": 0, "total_steps": 9, "start_step": 2}
    dataset = ExampleDataset(examples)
    serial_options = LoaderOptions(pad_id=PAD, seed=11, num_workers=0)
    serial = [b.inputs for b in train_loader(dataset, options=serial_options, **kwargs)]
    parallel_options = LoaderOptions(pad_id=PAD, seed=11, num_workers=2)
    parallel = [b.inputs for b in train_loader(dataset, options=parallel_options, **kwargs)]
    assert len(serial) == len(parallel) == 7
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize(("n", "world", "micro"), [(10, 2, 3), (7, 2, 2), (5, 3, 4), (1, 2, 1), (8, 2, 4)])
def test_eval_batches_equal_counts_and_every_example_once(n: int, world: int, micro: int):
    examples = make_examples(n)
    per_rank = [[b.inputs for b in eval_batches(examples, micro, rank, world, PAD)] for rank in range(world)]
    per_rank_rows = math.ceil(n / world)
    assert {len(batches) for batches in per_rank} == {math.ceil(per_rank_rows / micro)}
    real: list[int] = []
    fillers = 0
    for batches in per_rank:
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                labels = batch["labels"][row]
                if (labels == IGNORE).all():
                    fillers += 1
                    continue
                real.append(int(batch["input_ids"][row, 0]) - 100)
    assert sorted(real) == list(range(n))
    assert fillers == world * per_rank_rows - n


def test_eval_filler_rows_carry_no_labels():
    examples = make_examples(3)
    (batch,) = [b.inputs for b in eval_batches(examples, micro=2, rank=1, world=2, pad_id=PAD)]
    assert batch["input_ids"].shape[0] == 2
    assert batch["labels"][0].tolist()[: len(examples[1].labels)] == examples[1].labels
    assert (batch["labels"][1] == IGNORE).all()
    assert batch["attention_mask"][1].sum() > 0  # a real row, so every rank runs the same forward


@pytest.mark.parametrize(("n", "world", "size"), [(10, 2, 3), (7, 3, 2), (1, 2, 4), (5, 5, 1)])
def test_equal_rank_batches_without_filler_leave_short_batches(n: int, world: int, size: int):
    """The reference-table pass: no filler item, a short share's last batches are shorter or empty."""
    per_rank = [equal_rank_batches(range(n), size, rank, world) for rank in range(world)]
    assert {len(batches) for batches in per_rank} == {math.ceil(math.ceil(n / world) / size)}
    seen = [i for batches in per_rank for batch, real in batches for i in batch]
    assert all(len(batch) == real for batches in per_rank for batch, real in batches)
    assert sorted(seen) == list(range(n))


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("attention", "packing", "pack_to", "flat"),
    [("sdpa", True, 96, False), ("flash_attention_2", True, 0, True), ("sdpa", False, 0, False)],
)
def test_options_for_run(attention: str, packing: bool, pack_to: int, flat: bool):
    cfg = RunConfig(
        model=ModelConfig(attn_implementation=attention),
        data=DataConfig(
            max_seq_len=96, packing=packing, seed=4, shuffle_block=8, num_workers=2, group_by_length=False
        ),
    )
    dataset = SimpleNamespace(pairs=False, kto=0, sizes=lambda: np.arange(5))
    options = LoaderOptions.for_run(cfg, dataset, pad_id=PAD)
    assert (options.pack_to, options.flat, options.seed, options.shuffle_block) == (pack_to, flat, 4, 8)
    assert (options.num_workers, options.share_prompt, options.group) == (2, True, None)
    grouped = replace(cfg, data=replace(cfg.data, group_by_length=True, length_group_window=7))
    sizes, window = LoaderOptions.for_run(grouped, dataset, pad_id=PAD).group
    assert sizes.tolist() == [0, 1, 2, 3, 4] and window == 7
