"""Per-rank log files in the run dir, and a console that only rank 0 talks to.

With 16 ranks printing the same banner, warning and progress line, the console of a multi-node job is
unreadable, and the one line that matters (which rank failed, and why) scrolls by. So:
- every rank appends everything it prints to `RUN_DIR/logs/rank-NNNNN.log` (one header line per attempt);
- rank 0 also prints to the console (its Python-level output is teed);
- other ranks print to their log only: their stdout/stderr file descriptors point at the log, so output of
  C++ code (gloo, NCCL, DeepSpeed's ops) lands there too. Their *errors* still reach the console, through
  `error()`, prefixed with the rank.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO


def log_path(run_dir: Path | str, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank-{rank:05d}.log"


class _Tee(io.TextIOBase):
    """Write to the console and the rank's log; the console decides what a terminal is (rich asks)."""

    def __init__(self, console: TextIO, log: TextIO) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        with contextlib.suppress(OSError):  # a full disk must not silence the console (dstrain.storage)
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        with contextlib.suppress(OSError):
            self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", "utf-8")


class RankLog:
    def __init__(self, run_dir: Path, rank: int, world: int) -> None:
        self.rank, self.run_dir, self.path = rank, Path(run_dir), log_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
        self.file.write(
            f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}/{world} on {socket.gethostname()} "
            f"pid {os.getpid()} =====\n"
        )
        self._saved_streams = (sys.stdout, sys.stderr)
        self._saved_fds: tuple[int, int] | None = None
        self.console_fd = sys.stderr.fileno() if rank == 0 else os.dup(2)
        if rank == 0:
            sys.stdout = _Tee(sys.stdout, self.file)
            sys.stderr = _Tee(sys.stderr, self.file)
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved_fds = (os.dup(1), os.dup(2))
            os.dup2(self.file.fileno(), 1)
            os.dup2(self.file.fileno(), 2)

    def error(self, text: str) -> None:
        """One error message on the console (any rank) and in this rank's log."""
        line = text if text.endswith("\n") else text + "\n"
        if self.rank == 0:
            sys.stderr.write(line)  # the tee: console and log
            sys.stderr.flush()
            return
        os.write(self.console_fd, line.encode())  # first: the log's disk may be the one that is full
        self.log_only(line)

    def log_only(self, text: str) -> None:
        with contextlib.suppress(OSError):
            self.file.write(text if text.endswith("\n") else text + "\n")
            self.file.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # on ranks other than 0 these write to the log file
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved_streams
        if self._saved_fds is not None:
            os.dup2(self._saved_fds[0], 1)
            os.dup2(self._saved_fds[1], 2)
            for fd in (*self._saved_fds, self.console_fd):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.file.close()


_current: RankLog | None = None


def start(run_dir: Path, rank: int, world: int) -> RankLog:
    global _current
    stop()
    _current = RankLog(run_dir, rank, world)
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


def peer_log(rank: int) -> Path | None:
    """Where rank `rank` of this run logs (None before this rank's log is open)."""
    return None if _current is None else log_path(_current.run_dir, rank)


def error(text: str) -> None:
    """Print an error so that the user sees it: on the console from any rank, and in the rank's log."""
    if _current is None:
        print(text, file=sys.stderr, flush=True)
    else:
        _current.error(text)


def log_traceback(exc: BaseException) -> None:
    """A traceback for the rank's log only (the console gets the one-line message)."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    if _current is None:
        print(text, file=sys.stderr, end="", flush=True)
    else:
        _current.log_only(text)
