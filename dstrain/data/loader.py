"""One global sample order per epoch, cut into global batches and split across ranks.

The position in the data is global (step -> epoch, offset), never per rank: sample k of a global batch lands
on rank (k // micro) % world in accumulation slot k // (micro * world). A 2-rank run and a 1-rank run with
twice the accumulation therefore see the same samples in each optimizer step, and a run can restart at any
step on any world size that keeps the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dstrain.data.batches import IGNORE, Example, collate
from dstrain.ds_config import BatchPlan
from dstrain.errors import DataError
from dstrain.stop import ignore_in_worker


class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def steps_per_epoch(num_samples: int, plan: BatchPlan) -> int:
    steps = num_samples // plan.global_batch
    if steps == 0:
        raise DataError(
            f"data.train has {num_samples} usable samples, fewer than one global batch of {plan.global_batch} "
            f"(micro {plan.micro} x accumulation {plan.accumulation} x world {plan.world}): add data or shrink "
            "the batch in the ZeRO JSON"
        )
    return steps


class MicroBatchSampler(Sampler[list[int]]):
    """This rank's micro batches for steps [start_step, total_steps), `plan.accumulation` per step."""

    def __init__(
        self, num_samples: int, plan: BatchPlan, rank: int, seed: int, total_steps: int, start_step: int = 0
    ) -> None:
        self.num_samples, self.plan, self.rank, self.seed = num_samples, plan, rank, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.per_epoch = steps_per_epoch(num_samples, plan)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.plan.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        order: list[int] = []
        current_epoch = -1
        micro, world = self.plan.micro, self.plan.world
        for step in range(self.start_step, self.total_steps):
            epoch, slot = divmod(step, self.per_epoch)
            if epoch != current_epoch:
                order, current_epoch = epoch_order(self.num_samples, self.seed, epoch), epoch
            base = slot * self.plan.global_batch
            for accum in range(self.plan.accumulation):
                offset = base + (accum * world + self.rank) * micro
                yield order[offset : offset + micro]


def train_loader(
    examples: Sequence[Example],
    plan: BatchPlan,
    rank: int,
    seed: int,
    total_steps: int,
    pad_id: int,
    num_workers: int = 0,
    start_step: int = 0,
) -> DataLoader:
    sampler = MicroBatchSampler(len(examples), plan, rank, seed, total_steps, start_step)
    # A private generator: creating the iterator draws a worker seed from it, and drawing from the global
    # one would shift dropout after a resume (the resumed run creates its iterator at another step).
    return DataLoader(
        ExampleDataset(examples),
        generator=torch.Generator().manual_seed(seed),
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_id=pad_id),
        num_workers=num_workers,
        worker_init_fn=ignore_in_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def eval_batches(
    examples: Sequence[Example], micro: int, rank: int, world: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the eval set, in the same number of batches on every rank.

    Equal counts matter: under ZeRO-3 every forward is a collective. Short shards are topped up with a
    copy of an example whose labels are all ignored, so it adds nothing to the loss.
    """
    shard = list(examples[rank::world])
    per_rank = -(-len(examples) // world)
    filler = Example(examples[0].input_ids, [IGNORE] * len(examples[0].input_ids))
    shard += [filler] * (per_rank - len(shard))
    for start in range(0, per_rank, micro):
        yield collate(shard[start : start + micro], pad_id)
