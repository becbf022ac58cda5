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
- rank 0 writes the verdict under `abort`, every rank picks it up; a store that stops answering means rank
  0 (which serves it) is gone;
- the main thread, failing in a collective, asks for the verdict and reports it (`explain`); if the main
  thread is stuck instead (NCCL, a frozen peer), the watchdog prints the verdict and exits the process
  after `GRACE_S`, so the launcher takes the job down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.distributed import ranklog
from dstrain.distributed.rendezvous import connect_store, key_prefix
from dstrain.errors import DistributedError

if TYPE_CHECKING:
    from dstrain.distributed.env import DistEnv

INTERVAL_S = 1.0
FAST_S = 5.0
GRACE_S = 10.0
STORE_OP_TIMEOUT_S = 10.0


class Heartbeat:
    def __init__(self, env: DistEnv, timeout_s: float, run_dir: Path) -> None:
        self.env, self.timeout_s, self.run_dir = env, timeout_s, run_dir
        self.prefix = key_prefix() + "hb/"
        self.verdict: str | None = None
        self.found = threading.Event()
        self.exiting = False  # the main thread is reporting its own failure: never exit under it
        self._stopped = threading.Event()
        self._store = connect_store(env, STORE_OP_TIMEOUT_S, serve=False)
        self._watched = list(range(env.world_size)) if env.rank == 0 else [0]
        self._store.set(self._key("host", env.rank), socket.gethostname())
        self._store.set(self._key("pid", env.rank), str(os.getpid()))
        self._peers: dict[int, int] | None = None  # rank -> pid of the other ranks on this host
        for rank in self._watched:  # create the counters, so reading them never blocks on a missing key
            self._store.add(self._key("beat", rank), 0)
        self._thread = threading.Thread(target=self._run, name="dstrain-heartbeat", daemon=True)

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
        """Tell the other ranks why this rank is failing (best effort: the store may be gone)."""
        self.exiting = True
        summary = f"{type(exc).__name__}: {exc}".strip().splitlines()
        try:
            self._store.set(self._key("error", self.env.rank), summary[0][:500] if summary else "")
            self._store.add(self._key("failures"), 1)
        except Exception:  # rank 0, and its store, may already be gone
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
            except Exception as exc:  # any store failure: rank 0 may be gone
                if self._stopped.is_set():
                    return
                failing_since = failing_since or time.monotonic()
                verdict = self._vanished_peers()
                if not verdict and time.monotonic() - failing_since < FAST_S:
                    continue
                verdict = verdict or self._store_lost(exc)
            if verdict:
                self._fire(verdict)
                return

    def _beat(self, last_seen: dict[int, tuple[int, float]]) -> str | None:
        store = self._store
        store.add(self._key("beat", self.env.rank), 1)
        if store.check([self._key("abort")]):
            return store.get(self._key("abort")).decode()
        verdict = self._dead_peers() or self._silent_or_failed(last_seen)
        if verdict:
            store.set(self._key("abort"), verdict)
        return verdict

    def _silent_or_failed(self, last_seen: dict[int, tuple[int, float]]) -> str | None:
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
        return self._describe(silent, failed, now, last_seen)

    def _dead_peers(self) -> str | None:
        """Ranks on this host whose process is gone although they neither said goodbye nor reported an error."""
        peers = self._local_peers()
        dead = [r for r, pid in peers.items() if not process_alive(pid)]
        dead = [r for r in dead if not self._store.check([self._key("done", r)])]
        dead = [r for r in dead if not self._store.check([self._key("error", r)])]
        if not dead:
            return None
        return "; ".join(
            f"rank {r} ({socket.gethostname()}, pid {peers[r]}) died: its process is gone and it reported no "
            "error, so it was killed (by a signal or the OOM killer) or crashed in native code. Its log: "
            f"{ranklog.log_path(self.run_dir, r)}"
            for r in dead
        )

    def _vanished_peers(self) -> str | None:
        """With the store unreachable: is rank 0 (which serves it) one of the processes gone from this host?"""
        gone = [r for r, pid in (self._peers or {}).items() if not process_alive(pid)]
        if 0 not in gone:
            return None
        return (
            f"rank 0 ({socket.gethostname()}, pid {self._peers[0]}) died, and with it the rendezvous store it "
            f"served: it was killed (by a signal or the OOM killer) or crashed. Its log: "
            f"{ranklog.log_path(self.run_dir, 0)}"
        )

    def _local_peers(self) -> dict[int, int]:
        if self._peers is None:
            keys = [self._key("pid", r) for r in range(self.env.world_size)]
            if not self._store.check(keys):  # not every rank has registered yet
                return {}
            hosts = self._store.multi_get([self._key("host", r) for r in range(self.env.world_size)])
            pids = self._store.multi_get(keys)
            here = socket.gethostname()
            self._peers = {
                r: int(pid)
                for r, (host, pid) in enumerate(zip(hosts, pids, strict=True))
                if r != self.env.rank and host.decode() == here
            }
        return self._peers

    def _failed_ranks(self) -> dict[int, str]:
        keys = [self._key("error", r) for r in range(self.env.world_size) if r != 0]
        return {int(k.rsplit("/", 1)[1]): self._store.get(k).decode() for k in keys if self._store.check([k])}

    def _host(self, rank: int) -> str:
        try:
            host, pid = self._store.multi_get([self._key("host", rank), self._key("pid", rank)])
            return f"{host.decode()}, pid {pid.decode()}"
        except Exception:
            return "host unknown"

    def _describe(
        self, silent: list[int], failed: dict[int, str], now: float, last_seen: dict[int, tuple[int, float]]
    ) -> str:
        parts = []
        for rank in silent:
            if rank in failed:
                continue
            quiet = now - last_seen[rank][1]
            parts.append(
                f"rank {rank} ({self._host(rank)}) stopped responding: no heartbeat for {quiet:.0f} s and no "
                "error reported, so it was killed (by a signal, the OOM killer or a node failure) or is "
                f"frozen. Its log: {ranklog.log_path(self.run_dir, rank)}"
            )
        for rank, error in sorted(failed.items()):
            if rank in silent or not parts:
                parts.append(
                    f"rank {rank} ({self._host(rank)}) failed: {error}. Its log: "
                    f"{ranklog.log_path(self.run_dir, rank)}"
                )
        return "; ".join(parts) if parts else "another rank failed"

    def _store_lost(self, exc: BaseException) -> str:
        where = f"{self.env.master_addr}:{self.env.master_port}"
        return (
            f"rank 0 stopped answering: the rendezvous store it serves at {where} has been unreachable for "
            f"{FAST_S:.0f} s ({type(exc).__name__}), so rank 0 exited or its node is down. Its log: "
            f"{ranklog.log_path(self.run_dir, 0)}"
        )

    def _fire(self, verdict: str) -> None:
        self.verdict = verdict
        self.found.set()
        # The main thread normally fails in its next collective and reports the verdict itself; if it is
        # stuck in one that never returns (NCCL waits for its full timeout), end the process from here.
        if self._stopped.wait(GRACE_S) or self.exiting:
            return
        prefix = f"[rank {self.env.rank}] " if self.env.rank else ""
        ranklog.error(f"{prefix}error: {verdict}. Stopping this rank; the job cannot go on.")
        os._exit(DistributedError.exit_code)


def process_alive(pid: int) -> bool:
    """A zombie counts as dead: the launcher reaps its children only every second or so."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
