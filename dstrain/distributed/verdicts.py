"""What the heartbeat says when a rank fails: one sentence per culprit, naming its rank, host and pid, what
was seen, and the path of its log. Every rank that ends because of it prints the same words."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.distributed import ranklog

if TYPE_CHECKING:
    from dstrain.distributed.rendezvous import Member

# What a process that does not answer although it exists may be doing, by its state on its host.
FROZEN_BECAUSE = {
    "stopped": "its process is stopped (SIGSTOP, or a debugger holds it)",
    "running": "its process is still there but makes no progress (frozen: a hung file system read, a stuck "
    "driver call, or a node swapping itself to death)",
}


@dataclass(frozen=True)
class Verdict:
    """The message, and the ranks it declares frozen: their peers on the same node kill them (SIGKILL), since
    a stopped process cannot act on the launcher's SIGTERM and the launcher would wait 30 s for it."""

    text: str
    frozen: tuple[int, ...] = ()

    def encode(self) -> str:
        return json.dumps({"text": self.text, "frozen": list(self.frozen)})

    @classmethod
    def decode(cls, raw: bytes | str) -> Verdict:
        fields = json.loads(raw)
        return cls(fields["text"], tuple(fields["frozen"]))


def log_of(run_dir: Path, rank: int) -> str:
    return f"Its log: {ranklog.log_path(run_dir, rank)}"


def died(rank: int, member: Member, run_dir: Path) -> str:
    return (
        f"rank {rank} ({member}) died: its process is gone and it reported no error, so it was killed (by a "
        f"signal or the OOM killer) or crashed in native code. {log_of(run_dir, rank)}"
    )


def silent(rank: int, member: Member, quiet_s: float, state: str | None, run_dir: Path) -> str:
    """No heartbeat for `quiet_s`; `state` is the process's state where it runs on this node, else None."""
    seen = (
        f"rank {rank} ({member}) stopped responding: no heartbeat for {quiet_s:.0f} s and no error reported"
    )
    if state is None:
        cause = "so it was killed (by a signal, the OOM killer or a node failure) or is frozen"
    else:
        cause = f"{FROZEN_BECAUSE[state]}, so it was ended with SIGKILL"
    return f"{seen}, {cause}. {log_of(run_dir, rank)}"


def failed(rank: int, member: Member, error: str, run_dir: Path) -> str:
    return f"rank {rank} ({member}) failed: {error}. {log_of(run_dir, rank)}"


def store_frozen(owner: Member, where: str, quiet_s: float, state: str | None, run_dir: Path) -> str:
    """Rank 0's store takes requests (the connection is open) but answers none: rank 0 is frozen."""
    seen = (
        f"rank 0 ({owner}) stopped responding: the rendezvous store it serves at {where} has not answered for "
        f"{quiet_s:.0f} s (store unresponsive, its connection still open)"
    )
    if state is None:
        cause = "so rank 0 is frozen or its node hangs"
    else:
        cause = f"{FROZEN_BECAUSE[state]}, so it was ended with SIGKILL"
    return f"{seen}, {cause}. {log_of(run_dir, 0)}"


def agent_store_frozen(where: str, quiet_s: float, run_dir: Path) -> str:
    """torchrun's agent serves the store: its silence says the node that runs it hangs, not which rank."""
    return (
        f"the rendezvous store at {where} (served by torchrun's agent on the first node) has not answered for "
        f"{quiet_s:.0f} s although its connection is open: that node is frozen or hangs. Rank 0's "
        f"{log_of(run_dir, 0).lower()}"
    )


def store_lost(server: str, where: str, gone: bool, failing_s: float, cause: str, run_dir: Path) -> str:
    """The store's server (`rank 0 (host, pid)` or torchrun's agent) refuses or drops connections (`gone`:
    its process is gone), or keeps failing otherwise."""
    what = (
        f"the rendezvous store it serves at {where} has failed every request for {failing_s:.0f} s ({cause})"
    )
    if gone:
        return (
            f"{server} died: {what}; its connections are closed, so its process is gone: killed (by a signal "
            f"or the OOM killer), crashed, or its node restarted. {log_of(run_dir, 0)}"
        )
    return f"{server} stopped answering: {what}, so it exited or its node is down. {log_of(run_dir, 0)}"


def owner_died(owner: Member, run_dir: Path) -> str:
    return (
        f"rank 0 ({owner}) died, and with it the rendezvous store it served: it was killed (by a signal or the "
        f"OOM killer) or crashed. {log_of(run_dir, 0)}"
    )
