"""Length-grouped batching: similar lengths in a batch, so less of each batch is padding.

The epoch's shuffled order is cut into windows of about `window` micro batches (a whole number of global
batches). Inside a window the records are sorted by size and cut into global batches, and the global
batches are shuffled. A whole step, not only a micro batch, then holds records of similar length: every
rank's micro batch costs about the same, so no rank waits for a longer one at the gradient all-reduce.
Everything depends only on (seed, epoch, window, global batch), never on the world size or the rank: a
global batch is the same run of records on 1 or 8 ranks, and a resume at any step computes its window
directly (no replay).

Size is the record's stored size (JSONL line bytes, Parquet text size): known from the index without
tokenising anything, and close enough to the token count to sort by.
"""

from __future__ import annotations

import numpy as np

from dstrain.data.stream import EpochOrder, ids_in_windows


class LengthGroupedOrder:
    """`EpochOrder`'s records regrouped so each run of `batch` positions (a global batch) holds records of
    similar size; windows span about `window` micro batches of `micro`."""

    def __init__(self, order: EpochOrder, sizes: np.ndarray, micro: int, window: int, batch: int) -> None:
        if len(sizes) != order.n:
            raise ValueError(f"{len(sizes)} record sizes for an epoch of {order.n} records")
        self.order, self.sizes, self.batch = order, sizes, batch
        # positions per window, a multiple of the global batch: steps never straddle two windows
        self.span = max(1, -(-micro * window // batch)) * batch
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
            full = len(ids) // self.batch
            batches = [ids[i * self.batch : (i + 1) * self.batch] for i in range(full)]
            rng = np.random.Generator(np.random.PCG64([self.order.seed, self.epoch, 2, w]))
            # Shuffled, not longest-first: sorted batches in order would make step time and the loss
            # scale drift within every window. A short remainder (the epoch's last window) stays last,
            # so every other batch keeps its step-aligned positions.
            shuffled = [batches[i] for i in rng.permutation(full)] + [ids[full * self.batch :]]
            self._cached = (w, np.concatenate(shuffled))
        return self._cached[1]

    def ids(self, start: int, stop: int) -> list[int]:
        """The records at positions [start, stop) of this epoch."""
        return ids_in_windows(start, stop, self.n, self._locate, self._window)

    def _locate(self, pos: int) -> tuple[int, int, int]:
        w = pos // self.span
        return w, w * self.span, min((w + 1) * self.span, self.n)
