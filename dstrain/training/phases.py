"""Where a stop request takes effect outside the optimizer steps: at the end of each start-up phase, between
eval batches, after a save. Every check after the process group exists is a collective, so all ranks stop
together even when the signal reached only one of them (see dstrain.distributed.stop). And how long each
start-up phase took (`StartupClock`), said in the run log at the first optimizer step."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dstrain.distributed.collectives import all_ranks_ok
from dstrain.distributed.stop import StopRequest, StopRequested


def stop_agreed(stop: StopRequest, collective: bool = True) -> bool:
    """Whether a stop was requested (on any rank, when `collective`: every rank must call it then)."""
    if not collective:
        return stop.requested
    return not all_ranks_ok(not stop.requested)


def halt_if_requested(stop: StopRequest, phase: str, collective: bool = True) -> None:
    """Before the first optimizer step a stop ends the run here: nothing was trained, nothing is saved.
    The message names the phase the signal arrived in (on a rank that got none: this one)."""
    if stop_agreed(stop, collective):
        raise StopRequested(stop.signal or signal.SIGTERM, stop.arrived_in or phase)


@contextmanager
def phase(stop: StopRequest, name: str, collective: bool = True) -> Iterator[None]:
    """A start-up phase; a stop requested during it takes effect at its end, on every rank at once.

    `collective=False` before the process group exists: the stop is not acted on there but carried to the
    end of the next phase, whose check every rank makes together. Stopping alone there would leave a peer
    that got no signal (another node) waiting out the rendezvous timeout. A phase that fails because of the
    stop (Ctrl-C reaches the whole terminal process group, so a compiler of DeepSpeed's op build dies of it
    too) is reported as the stop, not as a crash; that rank stops alone (`agreed=False`).
    """
    stop.phase = name
    try:
        yield
    except Exception as exc:
        if stop.requested:
            raise StopRequested(stop.signal or signal.SIGTERM, name, agreed=not collective) from exc
        raise
    if collective:
        halt_if_requested(stop, name)


@dataclass
class StartupClock:
    """Seconds spent in each start-up phase, from the process's start to the first optimizer step.

    Wall-clock laps: each `lap(name)` books the time since the previous one. The first lap starts when the
    process did (interpreter start-up and imports included), which is what a user waits through.
    """

    last: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def since_process_start(cls) -> StartupClock:
        import psutil

        return cls(last=psutil.Process().create_time())

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        """One log line, e.g. "start-up 6.1 s to the first step: imports 2.3 s, config 0.4 s, ..."."""
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"start-up {self.total():.1f} s to the first optimizer step: {parts}"

    def row(self) -> dict[str, float]:
        """The same as metrics fields: startup_<phase>_s (spaces as underscores) and startup_total_s."""
        fields = {f"startup_{name.replace(' ', '_')}_s": round(s, 3) for name, s in self.seconds.items()}
        return {**fields, "startup_total_s": round(self.total(), 3)}
