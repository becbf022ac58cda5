"""Graceful stop on SIGTERM / SIGINT (Slurm preemption, `scancel`, Ctrl-C).

The first signal only sets a flag: the loop finishes the optimizer step it is in, every rank agrees to stop
(a signal may reach only some ranks), a checkpoint is written, and the process exits 0 so the job can be
resumed with `dstrain resume`. A second signal stops at once (KeyboardInterrupt), for a user who means it;
one that follows the first within `ECHO_S` is the same event echoed (Ctrl-C reaches the ranks directly and
again through the deepspeed launcher, which forwards it as SIGTERM) and is ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ECHO_S = 2.0


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        self.at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            if time.monotonic() - self.at < ECHO_S:
                return
            raise KeyboardInterrupt
        self.signal, self.at = signum, time.monotonic()
        name = signal.Signals(signum).name
        # os.write, not print: print inside a signal handler can fail with "reentrant call" on stderr.
        os.write(
            sys.stderr.fileno(),
            f"{name} received: stopping after this step and saving a checkpoint\n".encode(),
        )


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader workers leave stopping to the main process: a worker killed by SIGTERM/SIGINT would make
    the main process fail in the middle of the step (or the save) it was asked to finish."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
