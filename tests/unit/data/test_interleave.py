"""A mixture's composition per global batch (data/interleave.py): what data/interleave.py guarantees, checked
exactly (rational arithmetic) over several periods, for the weights of the issue and a few more.

- every running count C_s(j) is within 1 of its share j * B * w_s / W (strictly);
- when the interleave is `balanced`, every window of k consecutive global batches, wherever it starts, is
  within 1 of its share k * B * w_s / W (strictly); two sources always are, 3:1 and 1:7:2 with a global
  batch of 8 are; 1:7:2 with a global batch of 3 has no balanced interleave of that form (the search is
  exhaustive), and then windows stay within 2 - 1/(S-1) (Tijdeman's chairman assignment).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from dstrain.config.sources import integer_weights
from dstrain.data.interleave import build_interleave, chairman_table


def worst_errors(weights: tuple[int, ...], batch: int) -> tuple[bool, Fraction, Fraction]:
    """(balanced, the largest running-count error, the largest window error) over three periods and a bit."""
    interleave = build_interleave(weights, batch)
    total, n = sum(weights), 3 * interleave.period + 2
    counts = np.array([interleave.counts(j) for j in range(n + 1)])
    assert (counts.sum(axis=1) == batch * np.arange(n + 1)).all(), "every batch holds exactly B records"
    assert (np.diff(counts, axis=0) >= 0).all()
    share = [[Fraction(j * batch * w, total) for w in weights] for j in range(n + 1)]
    running = max(abs(counts[j, s] - share[j][s]) for j in range(n + 1) for s in range(len(weights)))
    window = max(
        abs((counts[b, s] - counts[a, s]) - (share[b][s] - share[a][s]))
        for a in range(n)
        for b in range(a + 1, n + 1)
        for s in range(len(weights))
    )
    return interleave.balanced, running, window


@pytest.mark.parametrize(
    ("weights", "batch"),
    [((3, 1), 8), ((3, 1), 6), ((3, 1), 1), ((1, 7, 2), 8), ((1, 7, 2), 10), ((5, 2), 3)],
)
def test_every_window_of_global_batches_is_within_one_of_its_share(weights, batch):
    balanced, running, window = worst_errors(weights, batch)
    assert balanced
    assert running < 1 and window < 1


@pytest.mark.parametrize(("weights", "batch"), [((1, 7, 2), 3), ((1, 7, 2), 1), ((2, 3, 5), 7)])
def test_without_a_balanced_interleave_running_counts_stay_within_one(weights, batch):
    balanced, running, window = worst_errors(weights, batch)
    assert not balanced
    assert running < 1 - Fraction(1, 2 * len(weights) - 2) + Fraction(1, 10**9)
    assert window < 2 - Fraction(1, len(weights) - 1) + Fraction(1, 10**9)


def test_the_chairman_assignment_keeps_tijdemans_bound():
    """The fallback record by record, on random weights: |N_s(t) - t * w_s / W| <= 1 - 1/(2S-2)."""
    rng = np.random.Generator(np.random.PCG64(5))
    for _ in range(60):
        weights = tuple(int(w) for w in rng.integers(1, 20, size=int(rng.integers(3, 6))))
        table = chairman_table(weights, 1)  # one record per batch: the sequence itself
        total, bound = sum(weights), 1 - Fraction(1, 2 * len(weights) - 2)
        counts = np.cumsum(table, axis=0)
        for t, row in enumerate(counts, start=1):
            assert all(abs(row[s] - Fraction(t * w, total)) <= bound for s, w in enumerate(weights))
        assert list(counts[-1]) == list(weights)  # a period ends exactly on the shares


def test_weights_are_read_as_the_decimals_written():
    assert integer_weights([3.0, 1.0]) == (3, 1)
    assert integer_weights([0.1, 0.7, 0.2]) == (1, 7, 2)
    assert integer_weights([0.75, 0.25]) == (3, 1)
    assert integer_weights([2.5, 1]) == (5, 2)


def test_seeking_is_a_pure_function_of_the_step():
    interleave = build_interleave((1, 7, 2), 8)
    step = 10**12 + 3  # far beyond any run: no replay, the same counts as adding up the batches
    whole, rest = divmod(step, interleave.period)
    assert (
        interleave.counts(step) == whole * interleave.table.sum(axis=0) + interleave.table[:rest].sum(axis=0)
    ).all()
    for source, count in ((0, 1), (1, 5_000_001), (2, 77)):
        j = interleave.first_reaching(source, count)
        assert interleave.counts(j)[source] >= count > interleave.counts(j - 1)[source]
