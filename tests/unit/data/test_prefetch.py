"""The prefetch thread: same items in the same order, errors at their place, fetches held while paused."""

from __future__ import annotations

import threading
import time

import pytest

from dstrain.data.prefetch import Prefetcher, paused, prefetched


def test_yields_every_item_in_order_then_stops():
    fetched = Prefetcher(iter(range(100)), depth=3)
    assert list(fetched) == list(range(100))
    with pytest.raises(StopIteration):
        next(fetched)


def test_an_error_is_raised_where_it_happened():
    def source():
        yield 1
        yield 2
        raise KeyError("record 3")

    fetched = Prefetcher(source(), depth=2)
    assert next(fetched) == 1 and next(fetched) == 2
    with pytest.raises(KeyError, match="record 3"):
        next(fetched)
    with pytest.raises(StopIteration):
        next(fetched)


def test_it_fetches_ahead_but_no_further_than_its_depth():
    taken = []

    def source():
        for i in range(10):
            taken.append(i)
            yield i

    fetched = Prefetcher(source(), depth=2)
    deadline = time.monotonic() + 60  # hang guard, not a speed test: the thread fills the queue at once
    while len(taken) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    # two waiting in the queue, and one more fetched that waits for room
    assert len(taken) == 3
    assert next(fetched) == 0


def test_no_fetch_runs_while_paused():
    busy = threading.Event()

    def source():
        for i in range(300):
            busy.set()
            time.sleep(0.001)  # slow enough that fetching is still going on when the pause starts
            yield i

    fetched = Prefetcher(source(), depth=1000)
    with fetched.paused():
        busy.clear()
        time.sleep(0.1)
        assert not busy.is_set()  # the tokenizer is the main thread's alone in here
    assert list(fetched) == list(range(300))


def test_workers_or_depth_zero_mean_no_thread():
    assert not isinstance(prefetched([1, 2], num_workers=2, depth=2), Prefetcher)
    assert not isinstance(prefetched([1, 2], num_workers=0, depth=0), Prefetcher)
    assert isinstance(prefetched([1, 2], num_workers=0, depth=2), Prefetcher)
    with paused(iter([1])):  # a plain iterator: nothing to pause
        pass
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=0)
