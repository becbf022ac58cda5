"""A mixture's plan: how many records each source has given before any global batch, as a pure function of
the step (no replay), from the sources' sizes, weights and limits.

The run is cut into segments. In a segment a fixed set of sources is active and its batches follow their
interleave (data/interleave.py) from the segment's start. A segment ends with the batch in which a source
reaches its limit (`epochs` passes of its records): that batch takes only what the source has left, the
other active sources fill its freed places by their weights (largest remainder), and the next segment
continues without it, its share going to the others. When every source has stopped, the data ends: the
first batch that cannot be filled is `end` (None: the data never ends, sources start new epochs).

A plan may start at a later step (`Origin`): a resume whose sources or weights changed (`dstrain resume
--set data.train=...`) continues from the counts each source had drawn, under the new weights.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from dstrain.config.sources import integer_weights
from dstrain.data.interleave import Interleave, build_interleave


@dataclass(frozen=True)
class SourceSpan:
    """A source as the plan and the order see it: its records are corpus indices start..start+records-1."""

    name: str
    start: int
    records: int  # usable records, after max_samples
    weight: float
    epochs: int = 0  # passes after which it stops; 0: never
    seed: int = 0  # its own shuffle seed (data/mixture_order.py)

    @property
    def limit(self) -> int | None:
        return self.epochs * self.records if self.epochs else None


@dataclass(frozen=True)
class Origin:
    """Where a plan starts: the global batch, and the records each source had drawn before it."""

    step: int = 0
    drawn: tuple[int, ...] = ()


@dataclass(frozen=True)
class Segment:
    start: int  # first global batch
    base: np.ndarray  # [sources] records drawn before it
    active: tuple[int, ...]  # sources it draws from
    interleave: Interleave


@dataclass
class MixturePlan:
    spans: list[SourceSpan]
    batch: int
    origin: Origin = field(default_factory=Origin)
    segments: list[Segment] = field(init=False)
    end: int | None = field(init=False)  # the first global batch the sources cannot fill; None: never

    def __post_init__(self) -> None:
        self.segments, self.end = plan_segments(self.spans, self.batch, self.origin)
        self._starts = [seg.start for seg in self.segments]

    def counts(self, step: int) -> np.ndarray:
        """Records drawn from each source before global batch `step` (origin.step <= step <= end)."""
        if step < self.origin.step or (self.end is not None and step > self.end):
            raise IndexError(
                f"global batch {step} is outside the mixture's plan [{self.origin.step}, {self.end}]"
            )
        if not self.segments:
            return np.asarray(self.origin.drawn, dtype=np.int64)
        seg = self.segments[bisect.bisect_right(self._starts, step) - 1]
        counts = seg.base.copy()
        counts[list(seg.active)] += seg.interleave.counts(step - seg.start)
        return counts

    def composition(self, step: int) -> np.ndarray:
        """Records each source gives global batch `step`."""
        return self.counts(step + 1) - self.counts(step)

    def epochs(self, step: int) -> np.ndarray:
        """Each source's epoch (from 0) of the last record it gave before `step` (0 before its first)."""
        drawn = self.counts(step)
        sizes = np.array([s.records for s in self.spans], dtype=np.int64)
        return np.maximum(drawn - 1, 0) // sizes

    @property
    def balanced(self) -> bool:
        return all(seg.interleave.balanced for seg in self.segments)


def plan_segments(spans: list[SourceSpan], batch: int, origin: Origin) -> tuple[list[Segment], int | None]:
    base = np.asarray(origin.drawn or [0] * len(spans), dtype=np.int64)
    start, segments = origin.step, []
    while True:
        active = tuple(s for s, span in enumerate(spans) if span.limit is None or base[s] < span.limit)
        if not active:
            return segments, start
        interleave = build_interleave(integer_weights([spans[s].weight for s in active]), batch)
        segments.append(Segment(start, base, active, interleave))
        limited = [(k, s) for k, s in enumerate(active) if spans[s].limit is not None]
        if not limited:
            return segments, None
        # the first batch after which some source has reached its limit: the batch before it is the last
        reach = min(interleave.first_reaching(k, spans[s].limit - base[s]) for k, s in limited)
        before = base.copy()
        before[list(active)] += interleave.counts(reach - 1)
        crossing = np.zeros_like(base)
        crossing[list(active)] = interleave.counts(reach) - interleave.counts(reach - 1)
        filled = fill_crossing(spans, before, crossing, batch)
        if filled is None:  # every source has stopped and this batch cannot be filled: the data ends here
            return segments, start + reach - 1
        base, start = before + filled, start + reach


def fill_crossing(
    spans: list[SourceSpan], before: np.ndarray, take: np.ndarray, batch: int
) -> np.ndarray | None:
    """The batch in which sources reach their limits: each takes at most what it has left, and the places
    they free go to the sources that still have records, by weight (largest remainder, then order).
    None if no source is left to fill them."""
    take = take.copy()
    while True:
        for s, span in enumerate(spans):
            if span.limit is not None:
                take[s] = min(take[s], span.limit - before[s])
        free = batch - int(take.sum())
        if free == 0:
            return take
        open_ = [s for s, span in enumerate(spans) if span.limit is None or before[s] + take[s] < span.limit]
        if not open_:
            return None
        weights = np.array([spans[s].weight for s in open_], dtype=np.float64)
        share = free * weights / weights.sum()
        extra = np.floor(share).astype(np.int64)
        order = sorted(range(len(open_)), key=lambda k: (-(share[k] - extra[k]), k))
        for k in order[: free - int(extra.sum())]:
            extra[k] += 1
        take[open_] += extra
