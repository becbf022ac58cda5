"""Rank liveness: a rank that dies or freezes ends the whole job, with its name, instead of a hang.

A collective cannot tell "my peer is slow" from "my peer is gone": NCCL waits for the full collective
timeout, gloo fails at once but only says "Connection closed by peer [10.0.0.7]:41235", and the deepspeed
launcher then reports the exit code of the last command it started, not of the rank that failed. So each
rank runs a daemon thread that, every `INTERVAL_S`, bumps its counter in the rendezvous store (rank 0's
TCPStore, or torchrun's agent store) over a connection of its own:
- rank 0 watches every rank's counter, the other ranks watch rank 0's (so the store sees O(world) ops);
- every rank also watches the processes of the ranks on its own host: a process that is gone without having
  said goodbye died (SIGKILL, the OOM killer, a segfault), which is known at once, without waiting for
  silence (the launcher kills the survivors 30 s after such a death, too soon for a heartbeat timeout);
- a counter that stops moving for `timeout_s` means a dead or frozen rank; once any rank has reported a
  failure (its collective broke, or it raised), `FAST_S` of silence is enough to tell who died first;
- rank 0 writes the verdict under `abort`, every rank picks it up; a store that refuses or drops
  connections means rank 0 (which serves it) is gone, one that takes requests but answers none for
  `timeout_s` means rank 0 is frozen;
- no store call waits without a bound (deadlinestore.py): a frozen rank 0 keeps its sockets open and never
  answers, and a watchdog stuck in its store would notice nothing;
- a rank declared frozen is killed (SIGKILL) by its peers on the same node: a stopped process cannot act on
  the launcher's SIGTERM, and the launcher waits 30 s before its SIGKILL. Its peers' collectives then fail at
  once;
- the main thread, failing in a collective, asks for the verdict and reports it (`explain`); if the main
  thread is stuck instead (NCCL, gloo waiting on a frozen rank of another node), the watchdog prints the
  verdict and exits the process (at once for a rank frozen on another node, else after `GRACE_S`), so the
  launcher takes the job down.
So a frozen rank ends the job within `timeout_s` + 2 `INTERVAL_S`, and the launcher's own reaction (it polls
every second), whichever rank it is (README, "Timeouts and failures"; BENCHMARKS.md has the measured times).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.distributed import ranklog, verdicts
from dstrain.distributed.deadlinestore import DeadlineStore, StoreUnresponsive
from dstrain.distributed.rendezvous import Member, connect_store, key_prefix, member_key, uses_agent_store
from dstrain.distributed.verdicts import Verdict
from dstrain.errors import DistributedError

if TYPE_CHECKING:
    from dstrain.distributed.env import DistEnv

INTERVAL_S = 1.0
FAST_S = 5.0
# For the main thread to fail in its collective and report the verdict itself (a peer killed here, or one
# that died, fails it at once).
GRACE_S = 3.0
STORE_OP_TIMEOUT_S = 10.0
# What a store that refuses or drops connections says (torch's DistNetworkError): its server is gone.
GONE_MARKERS = ("refused", "reset", "broken pipe", "closed", "eof")


class Heartbeat:
    def __init__(self, env: DistEnv, timeout_s: float, run_dir: Path) -> None:
        self.env, self.timeout_s, self.run_dir = env, timeout_s, run_dir
        self.prefix = key_prefix() + "hb/"
        self.verdict: str | None = None
        self.found = threading.Event()
        self.exiting = False  # the main thread is reporting its own failure: never exit under it
        self._stopped = threading.Event()
        self._store = DeadlineStore(lambda: connect_store(env, STORE_OP_TIMEOUT_S, serve=False))
        self._watched = list(range(env.world_size)) if env.rank == 0 else [0]
        self.members = self._register()
        here = self.members[env.rank]
        # the ranks on this node: whose death the process table shows at once, and whom this rank may kill
        self._peers = {r: m for r, m in enumerate(self.members) if r != env.rank and m.node == here.node}
        self._thread = threading.Thread(target=self._run, name="dstrain-heartbeat", daemon=True)

    def _register(self) -> list[Member]:
        """Every rank's host and pid (registered at the rendezvous, so all are there); create the counters,
        so reading them never waits for a missing key."""
        keys = [member_key(r) for r in range(self.env.world_size)]
        try:
            members = [
                Member.decode(raw)
                for raw in self._store.call("multi_get", keys, deadline_s=STORE_OP_TIMEOUT_S)
            ]
            for rank in self._watched:
                self._store.call("add", self._key("beat", rank), 0, deadline_s=STORE_OP_TIMEOUT_S)
        except StoreUnresponsive as exc:
            where = f"{self.env.master_addr}:{self.env.master_port}"
            raise DistributedError(f"rank {self.env.rank}: the rendezvous store at {where} {exc}") from exc
        return members

    def _key(self, what: str, rank: int | None = None) -> str:
        return f"{self.prefix}{what}" if rank is None else f"{self.prefix}{what}/{rank}"

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Say goodbye and stop beating (before the final barrier: past it, rank 0's store may go away)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STORE_OP_TIMEOUT_S + INTERVAL_S)
        with contextlib.suppress(Exception):
            self._store.set(self._key("done", self.env.rank), "1")

    # ------------------------------------------------------------------------------------ main thread

    def report(self, exc: BaseException) -> None:
        """Tell the other ranks why this rank is failing (best effort, bounded: the store may be gone)."""
        self.exiting = True
        summary = f"{type(exc).__name__}: {exc}".strip().splitlines()
        try:
            self._store.set(self._key("error", self.env.rank), summary[0][:500] if summary else "")
            self._store.add(self._key("failures"), 1)
        except Exception:  # rank 0, and its store, may already be gone or frozen
            pass

    def explain(self, exc: BaseException) -> str | None:
        """This rank's collective failed: report it, and wait briefly for the verdict on who failed first."""
        self.report(exc)
        self.found.wait(FAST_S + 5 * INTERVAL_S)
        return self.verdict

    # ------------------------------------------------------------------------------------ watchdog thread

    def _run(self) -> None:
        last_seen: dict[int, tuple[int, float]] = {}
        failing_since: float | None = None
        while not self._stopped.wait(INTERVAL_S):
            try:
                verdict = self._beat(last_seen)
                failing_since = None
            except StoreUnresponsive as exc:  # open connection, no answer: rank 0 paused, or frozen
                verdict = self._vanished_peers() or self._store_frozen(exc.since)
            except Exception as exc:  # the store refuses or fails requests: rank 0 may be gone
                if self._stopped.is_set():
                    return
                failing_since = failing_since or time.monotonic()
                verdict = self._vanished_peers()
                if not verdict and time.monotonic() - failing_since < FAST_S:
                    continue
                verdict = verdict or self._store_lost(exc, time.monotonic() - failing_since)
            if verdict:
                self._fire(verdict)
                return

    def _beat(self, last_seen: dict[int, tuple[int, float]]) -> Verdict | None:
        store = self._store
        store.add(self._key("beat", self.env.rank), 1)
        if store.check([self._key("abort")]):
            return Verdict.decode(store.get(self._key("abort")))
        verdict = self._dead_peers() or self._silent_or_failed(last_seen)
        if verdict:
            store.set(self._key("abort"), verdict.encode())
        return verdict

    def _silent_or_failed(self, last_seen: dict[int, tuple[int, float]]) -> Verdict | None:
        store, now = self._store, time.monotonic()
        counts = store.multi_get([self._key("beat", r) for r in self._watched])
        for rank, raw in zip(self._watched, counts, strict=True):
            count = int(raw)
            if last_seen.get(rank, (None, 0.0))[0] != count:
                last_seen[rank] = (count, now)
        failures = store.add(self._key("failures"), 0)
        limit = FAST_S if failures else self.timeout_s
        silent = [r for r, (_, t) in last_seen.items() if r != self.env.rank and now - t > limit]
        failed = self._failed_ranks() if failures and self.env.rank == 0 else {}
        if not (silent or failed):
            return None
        return self._describe(silent, failed, {r: now - last_seen[r][1] for r in silent})

    def _dead_peers(self) -> Verdict | None:
        """Ranks on this node whose process is gone although they neither said goodbye nor reported an error."""
        dead = [r for r, member in self._peers.items() if process_state(member) is None]
        dead = [r for r in dead if not self._store.check([self._key("done", r)])]
        dead = [r for r in dead if not self._store.check([self._key("error", r)])]
        if not dead:
            return None
        return Verdict("; ".join(verdicts.died(r, self.members[r], self.run_dir) for r in dead))

    def _vanished_peers(self) -> Verdict | None:
        """With the store not answering: is rank 0 (which serves it) one of the processes gone from this node?"""
        if 0 in self._peers and not uses_agent_store() and process_state(self._peers[0]) is None:
            return Verdict(verdicts.owner_died(self.members[0], self.run_dir))
        return None

    def _failed_ranks(self) -> dict[int, str]:
        keys = [self._key("error", r) for r in range(self.env.world_size) if r != 0]
        return {int(k.rsplit("/", 1)[1]): self._store.get(k).decode() for k in keys if self._store.check([k])}

    def _state(self, rank: int) -> str | None:
        """The state of a rank's process where it runs on this node (None: on another node, or gone)."""
        return process_state(self._peers[rank]) if rank in self._peers else None

    def _describe(self, silent: list[int], failed: dict[int, str], quiet: dict[int, float]) -> Verdict:
        parts, frozen = [], []
        for rank in silent:
            if rank in failed:
                continue
            parts.append(
                verdicts.silent(rank, self.members[rank], quiet[rank], self._state(rank), self.run_dir)
            )
            frozen.append(rank)
        for rank, error in sorted(failed.items()):
            if rank in silent or not parts:
                parts.append(verdicts.failed(rank, self.members[rank], error, self.run_dir))
        return Verdict("; ".join(parts) if parts else "another rank failed", tuple(frozen))

    def _where(self) -> str:
        return f"{self.env.master_addr}:{self.env.master_port}"

    def _store_frozen(self, since: float) -> Verdict | None:
        """The store has not answered since `since`: past the heartbeat timeout (or FAST_S once this rank's own
        collective has failed), its server is frozen."""
        quiet = time.monotonic() - since
        if quiet < (FAST_S if self.exiting else self.timeout_s):
            return None
        if uses_agent_store():
            return Verdict(verdicts.agent_store_frozen(self._where(), quiet, self.run_dir))
        text = verdicts.store_frozen(self.members[0], self._where(), quiet, self._state(0), self.run_dir)
        return Verdict(text, frozen=(0,))

    def _store_lost(self, exc: BaseException, failing_s: float) -> Verdict:
        server = "torchrun's agent" if uses_agent_store() else f"rank 0 ({self.members[0]})"
        gone = any(marker in str(exc).lower() for marker in GONE_MARKERS)
        cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
        return Verdict(verdicts.store_lost(server, self._where(), gone, failing_s, cause, self.run_dir))

    def _fire(self, verdict: Verdict) -> None:
        self.verdict = verdict.text
        self.found.set()
        local = [self._peers[r] for r in verdict.frozen if r in self._peers]
        for member in local:  # its collectives with this rank then fail at once, naming no one
            kill(member)
        # The main thread normally fails in its next collective and reports the verdict itself. A rank frozen
        # on another node never fails it (gloo and NCCL wait out the collective timeout): end the process
        # from here, at once then.
        grace = 0.0 if verdict.frozen and not local else GRACE_S
        if self._stopped.wait(grace) or self.exiting:
            return
        prefix = f"[rank {self.env.rank}] " if self.env.rank else ""
        ranklog.error(f"{prefix}error: {verdict.text}. Stopping this rank; the job cannot go on.")
        os._exit(DistributedError.exit_code)


def process_alive(pid: int) -> bool:
    """A zombie counts as dead: the launcher reaps its children only every second or so."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_state(member: Member) -> str | None:
    """ "stopped" (SIGSTOP, a debugger), "running" (any other live state), or None: gone, a zombie, or the
    pid now names a later process."""
    import psutil

    try:
        proc = psutil.Process(member.pid)
        status = proc.status()
        if status == psutil.STATUS_ZOMBIE or abs(proc.create_time() - member.started) > 0.5:
            return None
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # cannot tell (a hardened /proc): never a reason to call a rank dead
        return "running"
    return "stopped" if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else "running"


def kill(member: Member) -> None:
    """SIGKILL a rank's process (never this one): the one signal a stopped process does not wait out."""
    import psutil

    if member.pid == os.getpid() or process_state(member) is None:
        return
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        psutil.Process(member.pid).kill()


_current: Heartbeat | None = None


def start(env: DistEnv, timeout_s: float, run_dir: Path) -> None:
    global _current
    _current = Heartbeat(env, timeout_s, run_dir).start()


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def current() -> Heartbeat | None:
    return _current
