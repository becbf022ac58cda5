"""Hard deadlines for benchmark parts: run a command, and at its deadline (or when it ends) kill every process
it started, whatever session or process group they moved to.

`timeout CMD` signals only CMD's process group, but a benchmark launches its ranks with start_new_session (so
that the bench's own per-launch timeout can kill them as one group): a rank outlives an outer `timeout` and
keeps holding the GPU into the next part. Here the tree is found two ways, so neither a new session nor a dead
parent hides a process:
  - this process is made a child subreaper (Linux prctl), so orphans of the tree re-parent to it and stay
    descendants;
  - the command's environment carries a tag (BENCH_DEADLINE_TAG), inherited by every process it starts
    (launchers copy their environment to the ranks); /proc/PID/environ is searched for it.
Every found process is stopped (SIGSTOP: no more forks), then killed (SIGKILL), in rounds until none is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TAG_VAR = "BENCH_DEADLINE_TAG"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); False where the call is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process /proc shows."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _tagged(tag: str) -> set[int]:
    needle = f"{TAG_VAR}={tag}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
    return found


def tree(root: int, tag: str | None = None) -> set[int]:
    """Live (not zombie) processes of the tree: `root`, its descendants, and any carrying `tag`."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root, *(_tagged(tag) if tag else ())]
    while todo:
        pid = todo.pop()
        if pid not in found:  # `root` may have exited already: its children are still searched
            found.add(pid)
            todo.extend(children.get(pid, ()))
    found.discard(os.getpid())
    return {pid for pid in found if pid in table and table[pid][1] not in "ZX"}


def _reap() -> None:
    """Collect exited children (adopted orphans included), so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def kill_tree(root: int, tag: str | None = None, rounds: int = 10) -> set[int]:
    """Stop then kill every process of the tree, in rounds; returns the pids still alive after (normally none)."""
    alive: set[int] = set()
    for _ in range(rounds):
        alive = tree(root, tag)
        if not alive:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        time.sleep(0.2)
        _reap()
    return tree(root, tag)


@dataclass
class Outcome:
    """How a command under a deadline ended."""

    code: int | None  # exit status; None when it was killed at the deadline
    seconds: float
    timed_out: bool
    swept: list[int] = field(default_factory=list)  # processes it left running, killed afterwards
    survivors: list[int] = field(default_factory=list)  # processes that could not be killed (should be none)

    @property
    def status(self) -> str:
        if self.timed_out:
            return f"cut at its deadline after {self.seconds:.0f} s"
        return "ok" if self.code == 0 else f"exit {self.code}"


def run_with_deadline(
    cmd: list[str], seconds: float, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Outcome:
    """Run `cmd` (output to `log`) for at most `seconds`; then, or when it ends, kill all it left running."""
    become_subreaper()
    tag = uuid.uuid4().hex
    child_env = dict(env if env is not None else os.environ)
    child_env[TAG_VAR] = tag
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env, cwd=cwd, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=max(seconds, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
        except BaseException:  # SIGTERM/Ctrl-C of the caller: take the tree down with it
            kill_tree(proc.pid, tag)
            raise
        swept = sorted(tree(proc.pid, tag) - {proc.pid}) if not timed_out else []
        survivors = sorted(kill_tree(proc.pid, tag))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return Outcome(code, time.monotonic() - started, timed_out, swept, survivors)
