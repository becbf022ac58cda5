"""How many records each source of a mixture gives each global batch: a periodic, low-discrepancy table.

Sources with whole weights w_1..w_S (W = their sum, `config.sources.integer_weights`) and a global batch of B
records: source s's share of a batch is B * w_s / W. Counts are whole, so each batch takes a whole number
from each source, and the running count C_s(j) after j global batches follows the share as closely as the
arithmetic allows. The table of one period (T = W / gcd(B, W) batches, after which every count is exactly
its share again) is built once; any batch's counts are then `counts(j)`: no replay, the same on every rank.

What is guaranteed, for every source s and every j (`Interleave.balanced` says which case a mixture is in):
- always: |C_s(j) - j * B * w_s / W| < 1 (the running count is the share rounded down or up);
- `balanced`: every window of k consecutive global batches, wherever it starts, holds within 1 of its
  share k * B * w_s / W (strictly less than 1 away). With two sources that always holds. With three or more
  it depends on the weights and the batch: 1:7:2 has such an interleave for a global batch of 8, none for
  3 (balanced sequences on three or more letters exist only for special rates, Fraenkel's conjecture). It
  is found by a search over each source's phase (`phase_table`);
- otherwise windows are within 2 - 1/(S-1) of their share: the running counts follow Tijdeman's chairman
  assignment (`chairman_table`), which keeps every running count within 1 - 1/(2S-2) of its share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

PHASE_SEARCH_BUDGET = 200_000  # phase combinations x batches tried before the chairman assignment


@dataclass(frozen=True)
class Interleave:
    """Records per source in each global batch of one period; `counts(j)` before batch j of any period."""

    weights: tuple[int, ...]
    batch: int
    table: np.ndarray  # [period, sources] records each source gives each batch of the period
    balanced: bool  # every window of consecutive batches within 1 of its share (see the module docstring)
    cumulative: np.ndarray = field(init=False, repr=False)  # [period + 1, sources]

    def __post_init__(self) -> None:
        zero = np.zeros((1, len(self.weights)), dtype=np.int64)
        object.__setattr__(self, "cumulative", np.concatenate([zero, np.cumsum(self.table, axis=0)]))

    @property
    def period(self) -> int:
        return len(self.table)

    def counts(self, j: int) -> np.ndarray:
        """Records drawn from each source before global batch j (j >= 0) of an interleave that starts at 0."""
        whole, rest = divmod(j, self.period)
        return whole * self.cumulative[-1] + self.cumulative[rest]

    def first_reaching(self, source: int, count: int) -> int:
        """The smallest j with counts(j)[source] >= count."""
        if count <= 0:
            return 0
        per_period = int(self.cumulative[-1, source])
        whole = (count - 1) // per_period
        rest = count - whole * per_period
        return whole * self.period + int(np.searchsorted(self.cumulative[:, source], rest, side="left"))


def build_interleave(weights: tuple[int, ...], batch: int) -> Interleave:
    """The balanced interleave when the phase search finds one, else the chairman assignment's."""
    if len(weights) == 1:
        return Interleave(weights, batch, np.array([[batch]], dtype=np.int64), True)
    table = phase_table(weights, batch)
    if table is not None:
        return Interleave(weights, batch, table, True)
    return Interleave(weights, batch, chairman_table(weights, batch), False)


def period_batches(weights: tuple[int, ...], batch: int) -> int:
    total = sum(weights)
    return total // np.gcd(batch, total)


def phase_table(weights: tuple[int, ...], batch: int) -> np.ndarray | None:
    """A table with C_s(j) = floor((j * B * w_s + p_s) / W) for every source, if some phases p_s make the
    counts add up to j * B in every batch; None when none do (or the search would cost too much).

    Each such C_s is a Beatty sequence: any window's count is within 1 of its share. Only the phases at
    which some C_s(j) changes need trying (p_s = -j * B * w_s mod W), and the last source's phase follows
    from the others (an interval, checked batch by batch)."""
    total = sum(weights)
    period = period_batches(weights, batch)
    j = np.arange(period, dtype=np.int64)
    steps = [j * batch * w for w in weights]  # j * B * w_s, in units of 1/W records
    phases = [np.unique((-step) % total) for step in steps[:-1]]
    if int(np.prod([len(p) for p in phases], dtype=np.float64)) * period > PHASE_SEARCH_BUDGET:
        return None
    last = steps[-1]
    for combo in itertools.product(*phases):
        counts = [(step + p) // total for step, p in zip(steps, combo, strict=False)]
        target = j * batch - sum(counts)  # what the last source must have drawn before each batch
        low = max(0, int(np.max(target * total - last)))
        high = min(total, int(np.min(target * total - last + total)))
        if low < high:
            counts.append((last + low) // total)
            return table_from_counts(np.stack(counts, axis=1), weights, batch, period)
    return None


def table_from_counts(before: np.ndarray, weights: tuple[int, ...], batch: int, period: int) -> np.ndarray:
    """Per-batch records from running counts C(0..period-1) (C(period) is the exact share of a period)."""
    end = np.array([period * batch * w // sum(weights) for w in weights], dtype=np.int64)
    table = np.diff(np.vstack([before, end]), axis=0)
    assert (table >= 0).all() and (table.sum(axis=1) == batch).all(), "an interleave table must fill batches"
    return table


def chairman_table(weights: tuple[int, ...], batch: int) -> np.ndarray:
    """Tijdeman's chairman assignment record by record over one period, cut into global batches.

    At record t, among the sources whose deficit t * w_s / W - N_s is at least 1/(2S-2), take the one whose
    deficit would reach 1 - 1/(2S-2) first, i.e. with the smallest (N_s + 1 - 1/(2S-2)) / w_s (ties: the
    first source). Every running count then stays within 1 - 1/(2S-2) of its share (R. Tijdeman, The
    chairman assignment problem, Discrete Mathematics 32, 1980); integers only, no rounding."""
    total, k = sum(weights), 2 * len(weights) - 2
    drawn = [0] * len(weights)
    sequence = np.empty(total, dtype=np.int64)
    for t in range(1, total + 1):
        best = -1
        for s, w in enumerate(weights):
            if (t * w - total * drawn[s]) * k < total:
                continue  # not yet due
            # (N_s + 1 - 1/k) / w_s, compared as fractions ((N_s + 1) * k - 1) / w_s
            if best < 0 or ((drawn[s] + 1) * k - 1) * weights[best] < ((drawn[best] + 1) * k - 1) * w:
                best = s
        drawn[best] += 1
        sequence[t - 1] = best
    period = period_batches(weights, batch)
    run = np.tile(sequence, period * batch // total).reshape(period, batch)
    return np.stack([(run == s).sum(axis=1) for s in range(len(weights))], axis=1).astype(np.int64)
