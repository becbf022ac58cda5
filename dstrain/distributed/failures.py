"""How a failing rank reports: one message per failure, on the console and in the rank's log.

- A user error (`DstrainError`) is printed once: by rank 0 when every rank has it (bad config, bad data),
  by every rank that has it otherwise, prefixed with the rank.
- A broken collective is usually not this rank's fault: the heartbeat is asked which rank failed first, and
  that is the message; without a culprit, a timeout is named as such, with the knob that sets it.
- Anything else is a bug and keeps its traceback (in the rank's log; rank 0's also on the console).
"""

from __future__ import annotations

import os
import re
import signal
import traceback
from typing import TYPE_CHECKING

from dstrain.distributed import heartbeat, ranklog
from dstrain.distributed.env import env_rank
from dstrain.distributed.stop import StopRequested
from dstrain.errors import ConfigError, DataError, DistributedError

if TYPE_CHECKING:
    from dstrain.config.run import DistributedConfig

COMM_MARKERS = ("gloo", "nccl", "connection", "broken pipe", "timed out", "socket", "peer")


def report_error(exc: BaseException, debug: bool) -> int:
    """Print a user error once (rank 0, or any rank for a rank-specific failure) and return the exit code."""
    shared = isinstance(exc, (ConfigError, DataError))  # identical on every rank: say it once
    if env_rank() == 0 or not shared:
        prefix = f"[rank {env_rank()}] " if env_rank() else ""
        if debug:
            traceback.print_exception(exc)
        ranklog.error(f"{prefix}error: {exc}")
    return getattr(exc, "exit_code", 1)


def report_stop(exc: StopRequested) -> None:
    """A stop before training: one line, from rank 0 (every rank stopped at the same point), or from the
    rank that stopped alone."""
    if env_rank() == 0 or not exc.agreed:
        ranklog.error(f"dstrain: {exc}")


def diagnose(exc: BaseException, timeouts: DistributedConfig) -> DistributedError | None:
    """The real cause of a failure in a multi-rank run, or None when it is not a distributed failure."""
    watch = heartbeat.current()
    if not is_comm_failure(exc) or (watch is None and not in_multi_rank_group()):
        return None
    signal.signal(
        signal.SIGTERM, signal.SIG_IGN
    )  # the launcher SIGTERMs a dead rank's survivors: report first
    verdict = watch.explain(exc) if watch is not None else None
    cause = short_cause(exc)
    ranklog.log_traceback(exc)  # the collective that broke, for the log; the console gets the message
    if verdict is not None:
        return DistributedError(f"{verdict}. (This rank then failed: {cause})")
    if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
        where = (
            f"{watch.env.master_addr}:{watch.env.master_port}"
            if watch
            else f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        )
        return DistributedError(collective_timeout(timeouts, where, watched=watch is not None, cause=cause))
    return None


def collective_timeout(timeouts: DistributedConfig, where: str, watched: bool, cause: str) -> str:
    said = (
        f"rank {env_rank()}: a collective waited longer than distributed.collective_timeout_s "
        f"({timeouts.collective_timeout_s} s)"
    )
    if watched:
        return (
            f"{said} although every rank is alive (process group at {where}): one rank is slower than the "
            "others by more than that (a long save, eval or data stall). Raise distributed.collective_timeout_s, "
            f"or look for the slow rank in RUN_DIR/logs. ({cause})"
        )
    return (
        f"{said} (process group at {where}); distributed.heartbeat_timeout_s is 0, so no rank was watched: "
        "one rank is frozen, dead, or slower than the others by more than that. Its log in RUN_DIR/logs stops "
        f"first; set distributed.heartbeat_timeout_s to have it named. ({cause})"
    )


def in_multi_rank_group() -> bool:
    import torch.distributed

    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_comm_failure(exc: BaseException) -> bool:
    """torch's DistError, or the RuntimeError gloo and NCCL raise when a peer or the network goes away."""
    import torch.distributed

    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(marker in text for marker in COMM_MARKERS)
    )


def report_crash(exc: BaseException) -> int:
    """A bug: its traceback (console for rank 0, the log for others) and, from other ranks, one line."""
    traceback.print_exception(exc)
    if env_rank() != 0:
        ranklog.error(f"[rank {env_rank()}] crashed: {type(exc).__name__}: {exc} (traceback in its log)")
    watch = heartbeat.current()
    if watch is not None:
        watch.report(exc)  # so the other ranks name this one
    return 1


def short_cause(exc: BaseException) -> str:
    """`RuntimeError: Read error [10.0.0.7]:41095: Connection reset by peer` out of gloo's/NCCL's paragraph."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).strip())  # [.../pair.cc:537]
    first = re.split(r"(?<=[^\d])\.\s", text.splitlines()[0] if text else "", maxsplit=1)[0]
    return f"{type(exc).__name__}: {first[:200]}"
