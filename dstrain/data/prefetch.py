"""Read and collate the next micro batches in a background thread while the current one trains.

Without DataLoader worker processes (data.num_workers=0), reading, tokenising and collating would run
between steps with the accelerator idle. A thread overlaps them with forward/backward, which release the
GIL in their kernels; on a GPU that is the whole data time. Worker processes prefetch by themselves, so
this is used only without them.

The training tokenizer is also used by the generation eval in the main thread, and a fast tokenizer's
state is not safe to use from two threads at once ("Already borrowed"): `paused()` holds the thread
between fetches for as long as the main thread needs it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Yields `source`'s items in order, up to `depth` of them fetched ahead by a daemon thread.

    An exception in `source` is raised from `next()` at the point it occurred in the sequence.
    """

    def __init__(self, source: Iterator[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._gate = threading.Lock()
        self._done = False
        # daemon: a run that stops early (a signal, an error) must not wait for the thread
        self._thread = threading.Thread(target=self._fill, name="dstrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._gate:
                try:
                    item: object = next(self._source)
                except StopIteration:
                    item = _END
                except BaseException as exc:  # handed to the main thread, which raises it
                    item = _Failure(exc)
            self._queue.put(item)
            if item is _END or isinstance(item, _Failure):
                return

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item  # type: ignore[return-value]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No fetch runs inside this block (one in progress is finished first)."""
        with self._gate:
            yield


def paused(batches: Iterator[object]) -> contextlib.AbstractContextManager[None]:
    """`batches.paused()` for a Prefetcher, a no-op for any other iterator."""
    return batches.paused() if isinstance(batches, Prefetcher) else contextlib.nullcontext()


def prefetched(batches: Iterable[T], num_workers: int, depth: int) -> Iterator[T]:
    """The loader's batches, fetched ahead by a thread unless worker processes already do (or depth is 0)."""
    if num_workers > 0 or depth == 0:
        return iter(batches)
    return Prefetcher(iter(batches), depth)
