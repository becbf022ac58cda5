"""Start the deepspeed launcher for `dstrain train/resume --num-gpus/--hostfile`, wait for it, and pass a
stop request on to the ranks the way Slurm does (to the ranks themselves, not the launcher).

The launcher is DeepSpeed's runner of the Python environment dstrain runs in (`sys.executable -m
deepspeed.launcher.runner`), not whatever `deepspeed` comes first on PATH: `.venv/bin/dstrain train
--num-gpus 2` works with the environment activated or not. The runner starts every rank with that same
interpreter (locally, and by its absolute path on pdsh nodes), and the environment's scripts directory goes
first on the launcher's PATH, so the tools DeepSpeed calls (ninja, to compile an op) are the ones installed
beside it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

RUNNER = "deepspeed.launcher.runner"  # what the `deepspeed` script runs


def launcher_command(
    num_gpus: int | None, hostfile: Path | None, entry_args: list[str], module: str = "dstrain.train"
) -> list[str]:
    """The deepspeed launcher line that runs `python -m MODULE` (dstrain.train, or dstrain eval's
    dstrain.eval.command) on every rank, started by this environment's interpreter."""
    cmd = [sys.executable, "-m", RUNNER]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    if hostfile is None:  # one node: any free port will do, and DeepSpeed's fixed 29500 clashes between jobs
        from dstrain.distributed.env import free_port

        cmd += ["--master_port", str(free_port())]
    return [*cmd, "--module", module, *entry_args]


def run_launcher(cmd: list[str]) -> int:
    """Run the launcher and wait for it; Ctrl-C already reaches the whole process group, SIGTERM is passed on.

    Killing the launcher here (what subprocess.call does on KeyboardInterrupt) would cut the ranks off in
    the middle of the checkpoint they write when asked to stop.
    """
    proc = subprocess.Popen(cmd, env=launcher_env())
    received: list[int] = []

    def on_sigint(signum: int, _frame: object) -> None:
        received.append(signum)

    def on_sigterm(signum: int, _frame: object) -> None:
        received.append(signum)
        signal_ranks(proc, signum)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
    }
    try:
        return exit_status(proc.wait(), received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launcher_env() -> dict[str, str]:
    """This environment, with its scripts directory (ninja, deepspeed's own tools) first on PATH."""
    from dstrain.distributed.env import first_on_path

    env = os.environ.copy()
    env["PATH"] = first_on_path(sysconfig.get_path("scripts"), env.get("PATH", ""))
    return env


def exit_status(code: int, received: list[int]) -> int:
    """The launcher's exit status, or after a stop signal the conventional 128 + signal when the launcher
    did not end cleanly: DeepSpeed's launch.py exits 1 (or dies of the SIGINT) whenever it is signalled,
    even when every rank stopped as asked, so its own status says nothing more."""
    if code != 0 and received:
        return 128 + received[0]
    return code


def signal_ranks(launcher: subprocess.Popen, signum: int) -> None:
    """Signal the local ranks themselves, as Slurm does. Not the launcher: a single-node `deepspeed` runner
    dies of SIGTERM without passing it on (leaving its ranks training, orphaned), and DeepSpeed's
    launch.py would SIGKILL the ranks 30 s after passing it on. Ranks on other nodes learn of the stop from
    these: every rank agrees to stop at the same step."""
    import psutil

    try:
        family = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    ranks = [p for p in family if is_rank(p)]
    for target in ranks or [launcher]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            target.send_signal(signum)


def is_rank(process: object) -> bool:
    """`python -m dstrain.train ...` (a DataLoader worker forked from a rank looks the same; it ignores it)."""
    import psutil

    try:
        cmd = process.cmdline()  # type: ignore[attr-defined]
    except psutil.Error:
        return False
    return any(a == "-m" and b == "dstrain.train" for a, b in itertools.pairwise(cmd))
