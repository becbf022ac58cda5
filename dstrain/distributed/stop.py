"""Graceful stop on SIGTERM / SIGINT (Slurm preemption, `scancel`, Ctrl-C), in every phase of a run.

The handler is installed first thing on every rank and only sets a flag; the code checks it where it can
stop cleanly, and every rank agrees (a signal may reach only some ranks):
- before the first optimizer step (data index, model and engine build, reference pass, step-0 eval): the
  phase ends, nothing was trained, so nothing is saved; `StopRequested` exits 128 + the signal number
  (130 for SIGINT, 143 for SIGTERM) with one line naming the phase. `python -m dstrain.slurm --requeue`
  counts that as a clean stop and requeues the job;
- while training, or during an eval or a save: the step (the save) finishes, a checkpoint is written and
  the process exits 0 so the job can be resumed with `dstrain resume`.
A second signal stops at once (KeyboardInterrupt), without a save, for a user who means it; one that
follows the first within `ECHO_S` is the same event echoed (Ctrl-C reaches the ranks directly and again
through the deepspeed launcher, which forwards it as SIGTERM) and is ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ECHO_S = 2.0


class StopRequested(Exception):  # noqa: N818 (a request honoured, not an error)
    """A stop honoured before the first optimizer step: nothing was trained, so nothing is saved."""

    def __init__(self, signum: int, phase: str, agreed: bool = True) -> None:
        self.signum, self.phase = signum, phase
        self.agreed = agreed  # False: this rank stopped alone (its phase failed), the others were not asked
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} during {phase}: nothing was trained, no checkpoint was written")


class SecondSignal(KeyboardInterrupt):
    """A second stop signal: stop at once, without a save. Exits 128 + its signal (Slurm's second SIGTERM
    at the time limit must read as a stop, not a failure)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class EvalInterrupted(Exception):  # noqa: N818 (a request honoured, not an error)
    """Every rank agreed to stop in the middle of an eval; its partial result is dropped."""


def interruptible(items: Iterable[T], interrupted: Callable[[], bool] | None) -> Iterator[T]:
    """`items`, asking `interrupted()` before each one. When that agrees across ranks it is a collective:
    every rank must draw the same number of items, which the eval batches guarantee (data/sharding.py)."""
    for item in items:
        if interrupted is not None and interrupted():
            raise EvalInterrupted
        yield item


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        self.at = 0.0
        self.phase = "training"  # where a stop request would take effect, for the handler's message
        self.arrived_in: str | None = None  # the phase the first signal arrived in
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            if time.monotonic() - self.at < ECHO_S:
                return
            raise SecondSignal(signum)
        self.signal, self.at, self.arrived_in = signum, time.monotonic(), self.phase
        name = signal.Signals(signum).name
        # os.write, not print: print inside a signal handler can fail with "reentrant call" on stderr.
        then = (
            "stopping after this step and saving a checkpoint"
            if self.phase == "training"
            else f"stopping when {self.phase} can be interrupted (nothing trained yet: no checkpoint)"
        )
        os.write(sys.stderr.fileno(), f"{name} received: {then}\n".encode())


_installed: StopRequest | None = None


def install() -> StopRequest:
    """The process's stop request, installed once, first thing (a signal during start-up is not lost);
    a fresh one when the last was uninstalled (a library caller running a second run in one process)."""
    global _installed
    if _installed is None or not _installed.installed:
        _installed = StopRequest().install()
    return _installed


def current() -> StopRequest | None:
    return _installed


def uninstall() -> None:
    global _installed
    if _installed is not None:
        _installed.uninstall()
        _installed = None


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader workers leave stopping to the main process: a worker killed by SIGTERM/SIGINT would make
    the main process fail in the middle of the step (or the save) it was asked to finish."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
