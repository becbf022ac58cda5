"""Length-grouped batching: similar lengths in a micro batch, so less of each batch is padding.

The epoch's shuffled order is cut into windows of `window` micro batches. Inside a window the records are
sorted by size and dealt into micro batches, and the micro batches are shuffled. Everything depends only
on (seed, epoch, window), never on the world size or the rank: a global batch is the same run of micro
batches on 1 or 8 ranks, and a resume at any step computes its window directly (no replay).

Size is the record's stored size (JSONL line bytes, Parquet text size): known from the index without
tokenising anything, and close enough to the token count to sort by.
"""

from __future__ import annotations

import numpy as np

from dstrain.data.stream import EpochOrder


class LengthGroupedOrder:
    """`EpochOrder`'s records regrouped so each run of `micro` positions holds records of similar size."""

    def __init__(self, order: EpochOrder, sizes: np.ndarray, micro: int, window: int) -> None:
        if len(sizes) != order.n:
            raise ValueError(f"{len(sizes)} record sizes for an epoch of {order.n} records")
        self.order, self.sizes, self.micro = order, sizes, micro
        self.span = micro * window  # positions per window, a multiple of micro: batches never straddle two
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return self.order.n

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def _window(self, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != w:
            start, stop = w * self.span, min((w + 1) * self.span, self.n)
            ids = np.asarray(self.order.ids(start, stop), dtype=np.int64)
            # stable: equal sizes keep their shuffled order, so ties are not broken by record number
            ids = ids[np.argsort(-self.sizes[ids], kind="stable")]
            full = len(ids) // self.micro
            batches = [ids[i * self.micro : (i + 1) * self.micro] for i in range(full)]
            rng = np.random.Generator(np.random.PCG64([self.order.seed, self.epoch, 2, w]))
            # Shuffled, not longest-first: sorted batches in order would make step time and the loss
            # scale drift within every window. A short remainder (the epoch's last window) stays last,
            # so every other batch keeps its micro-aligned positions.
            shuffled = [batches[i] for i in rng.permutation(full)] + [ids[full * self.micro :]]
            self._cached = (w, np.concatenate(shuffled))
        return self._cached[1]

    def ids(self, start: int, stop: int) -> list[int]:
        """The records at positions [start, stop) of this epoch."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"positions [{start}, {stop}) of an epoch of {self.n}")
        out: list[int] = []
        pos = start
        while pos < stop:
            w, offset = divmod(pos, self.span)
            take = min(stop, (w + 1) * self.span)
            out += self._window(w)[offset : offset + take - pos].tolist()
            pos = take
        return out
