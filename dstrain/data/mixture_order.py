"""The records of each global batch of a mixture: which of each source's records, in which slots.

Global batch j takes, from source s, its draws C_s(j) .. C_s(j+1)-1 (data/mixture.py). Draw k of a source is
position k mod n of its epoch k // n (n: its records), in its own shuffled order (`EpochOrder`, seeded per
source): a small source that runs out starts its next epoch in a fresh order. Everything is a function of
(seeds, step): a resume on any world size with the same global batch computes the same batches directly.

Within a batch the sources' records are spread evenly over its slots (each source's i-th of n at slot key
(i + 1/2) / n), so every rank and accumulation slot sees the mixture. With length grouping, windows of
`group_batches` global batches are regrouped per source: each source's draws in the window are sorted by
size and dealt, in a shuffled batch order that all sources share, to the batches as each one's count says;
inside a batch the records are then sorted by size, so micro batches hold similar lengths and the ranks of
an accumulation slot get similar work. Each batch keeps exactly its composition, each draw is used once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dstrain.config.run import DataConfig
from dstrain.config.zero import BatchPlan
from dstrain.data.mixture import MixturePlan, SourceSpan
from dstrain.data.stream import Corpus, EpochOrder


class SourceOrder:
    """Draws of one source across its epochs, as corpus indices; O(records / block) memory."""

    def __init__(self, span: SourceSpan, block: int, window: int) -> None:
        self.span, self.block, self.window = span, block, window
        self._order: EpochOrder | None = None

    def draws(self, first: int, stop: int) -> np.ndarray:
        """Corpus indices of draws [first, stop) of this source."""
        n, out = self.span.records, []
        k = first
        while k < stop:
            epoch, offset = divmod(k, n)
            take = min(stop - k, n - offset)
            if self._order is None or self._order.epoch != epoch:
                self._order = EpochOrder(n, self.span.seed, epoch, self.block, self.window)
            out.append(np.asarray(self._order.ids(offset, offset + take), dtype=np.int64))
            k += take
        return self.span.start + (np.concatenate(out) if out else np.zeros(0, dtype=np.int64))


class MixtureOrder:
    """Global batch `step`'s corpus indices, in slot order (sample k goes where MicroBatchSampler puts it)."""

    def __init__(
        self,
        plan: MixturePlan,
        seed: int,
        block: int = 128,
        window: int = 64,
        sizes: Callable[[np.ndarray], np.ndarray] | None = None,
        group_batches: int = 0,
    ) -> None:
        self.plan, self.seed = plan, seed
        self.sources = [SourceOrder(span, block, window) for span in plan.spans]
        self.sizes, self.group_batches = sizes, group_batches  # sizes: record sizes by corpus index
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def batch(self, step: int) -> np.ndarray:
        if self.sizes is None or self.group_batches < 1:
            return spread(self.parts(step, step + 1)[0])
        first = self.plan.origin.step
        w = (step - first) // self.group_batches
        if self._cached is None or self._cached[0] != w:
            start = first + w * self.group_batches
            stop = start + self.group_batches
            if self.plan.end is not None:
                stop = min(stop, self.plan.end)
            self._cached = (w, self.grouped(start, stop, w))
        return self._cached[1][step - first - w * self.group_batches]

    def parts(self, start: int, stop: int) -> list[list[np.ndarray]]:
        """For each batch in [start, stop): each source's draws in it (corpus indices)."""
        before = self.plan.counts(start)
        out = []
        for step in range(start, stop):
            after = self.plan.counts(step + 1)
            out.append(
                [src.draws(int(a), int(b)) for src, a, b in zip(self.sources, before, after, strict=True)]
            )
            before = after
        return out

    def grouped(self, start: int, stop: int, window: int) -> list[np.ndarray]:
        """The window's batches, length-grouped per source (see the module docstring)."""
        assert self.sizes is not None
        parts = self.parts(start, stop)
        order = np.random.Generator(np.random.PCG64([self.seed, 3, window])).permutation(len(parts))
        dealt: list[list[np.ndarray]] = [[] for _ in parts]
        for s in range(len(self.sources)):
            drawn = np.concatenate([batch[s] for batch in parts])
            # stable: equal sizes keep their draw order, so ties do not depend on record numbers
            drawn = drawn[np.argsort(-self.sizes(drawn), kind="stable")]
            at = 0
            for b in order:
                count = len(parts[b][s])
                dealt[b].append(drawn[at : at + count])
                at += count
        batches = []
        for batch in dealt:
            ids = np.concatenate(batch)
            batches.append(ids[np.argsort(-self.sizes(ids), kind="stable")])
        return batches


def spread(parts: list[np.ndarray]) -> np.ndarray:
    """One batch's records, each source's spread evenly over the slots: the i-th of a source's n records
    at key (i + 1/2) / n, ties by source order."""
    keys = np.concatenate([(np.arange(len(p)) + 0.5) / max(len(p), 1) for p in parts])
    owners = np.concatenate([np.full(len(p), s) for s, p in enumerate(parts)])
    ids = np.concatenate(parts)
    return ids[np.lexsort((owners, keys))]


def order_for_run(plan: MixturePlan, data: DataConfig, batch: BatchPlan, corpus: Corpus) -> MixtureOrder:
    """The run's mixture order: data.seed, its shuffle blocks, and length grouping over windows of about
    `length_group_window` micro batches (whole global batches), as for a single corpus (data/grouping.py)."""
    group = max(1, -(-batch.micro * data.length_group_window // batch.global_batch))
    return MixtureOrder(
        plan,
        data.seed,
        data.shuffle_block,
        data.shuffle_window,
        corpus.sizes_of if data.group_by_length else None,
        group if data.group_by_length else 0,
    )
