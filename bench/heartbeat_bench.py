"""Heartbeat cost, and how fast a frozen rank ends the job.

Cost: the same 2-rank `dstrain train --num-gpus 2` job with the failure watch on and off.

    python bench/heartbeat_bench.py --steps 60 --repeats 2

Each repeat runs both variants back to back (order alternating, so drift in the machine's speed hits both):
    on    distributed.heartbeat_timeout_s=90 (the default: a daemon thread per rank bumps a counter in the
          TCPStore every second, rank 0 reads every rank's, every rank watches its local peers' pids)
    off   distributed.heartbeat_timeout_s=0
Reported: the median step time over the steps after the first `--skip` (warm-up), per variant, and on/off.

Frozen rank: a 2-rank job (the bundled demo, `distributed.heartbeat_timeout_s=--timeout`, no saves) has one
rank stopped with SIGSTOP once step 5 is logged, as `kill -STOP` would; reported is the time from the
SIGSTOP to the exit of the other rank and of the launcher(s) that must end (on two nodes: the other node's),
the machine's load average, and the error line.

    python bench/heartbeat_bench.py --freeze --timeout 10 --repeats 2

    one node   `dstrain train --num-gpus 2` (the deepspeed launcher), rank 0 (which serves the rendezvous
               store) or rank 1 frozen
    two nodes  one `deepspeed --hostfile H --no_ssh --node_rank N` per node, one rank each, on this machine;
               the node of rank 0 (the store's) or of rank 1 frozen
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"on": 90, "off": 0}
FREEZE_CASES = {  # name -> (nodes, frozen rank)
    "1 node, rank 0 frozen (it serves the store)": (1, 0),
    "1 node, rank 1 frozen": (1, 1),
    "2 nodes, node 0 frozen (it serves the store)": (2, 0),
    "2 nodes, node 1 frozen": (2, 1),
}
HANG_GUARD_S = 600


def bench_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's deepspeed
    return env


def run_job(work: Path, name: str, heartbeat_s: int, steps: int) -> list[float]:
    """One job; the per-step wall time of every logged step (log_every=1)."""
    out = work / name
    overrides = {
        "output_dir": str(out),
        "train.max_steps": steps,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "distributed.heartbeat_timeout_s": heartbeat_s,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    cmd = [sys.executable, "-m", "dstrain.cli", "train", "--config", "configs/demo.yaml", "--num-gpus", "2"]
    proc = subprocess.run([*cmd, *sets], cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step_time_s"] for row in rows if "step_time_s" in row]


def freeze_jobs(out: Path, nodes: int, timeout_s: int) -> list[subprocess.Popen]:
    """A long 2-rank job, each launcher in its own process group (so nothing outlives the case)."""
    overrides = {
        "output_dir": str(out),
        "train.max_steps": 100000,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "distributed.heartbeat_timeout_s": timeout_s,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    if nodes == 1:
        cli = [sys.executable, "-m", "dstrain.cli", "train", "--num-gpus", "2"]
        cmds = [[*cli, "--config", "configs/demo.yaml", *sets]]
    else:
        hostfile = out.parent / f"{out.name}.hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        where = [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
        ]
        entry = ["--module", "dstrain.train", "--config", "configs/demo.yaml", *sets]
        cmds = [["deepspeed", *where, "--node_rank", str(n), *entry] for n in range(nodes)]
    return [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=bench_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]


def rank_pid(out: Path, rank: int) -> int:
    """From the newest header of the rank's log: `===== ... rank R/W on HOST pid N =====`."""
    return int(re.findall(r"pid (\d+) =====", (out / "logs" / f"rank-{rank:05d}.log").read_text())[-1])


def when_ranks_end(pids: list[int], since: float, ended: list[float]) -> None:
    """Appends the seconds from `since` until every process in `pids` has exited (a zombie has)."""

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    while not all(gone(pid) for pid in pids):
        time.sleep(0.05)
    ended.append(time.monotonic() - since)


def freeze_once(work: Path, name: str, nodes: int, rank: int, timeout_s: int) -> tuple[float, float, str]:
    """Seconds from the SIGSTOP to the exit of the other rank(s) and to the end of the launchers that must
    end, and the error line they printed."""
    out = work / name
    jobs = freeze_jobs(out, nodes, timeout_s)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (out / "metrics.jsonl").is_file() or '"step": 5' not in (out / "metrics.jsonl").read_text():
            if any(job.poll() is not None for job in jobs) or time.monotonic() > deadline:
                sys.exit(
                    f"{name}: the job ended or stalled before step 5:\n{jobs[0].communicate()[1][-3000:]}"
                )
            time.sleep(0.2)
        others, ranks_ended = [rank_pid(out, r) for r in (0, 1) if r != rank], []
        os.kill(rank_pid(out, rank), signal.SIGSTOP)
        frozen_at = time.monotonic()
        threading.Thread(target=when_ranks_end, args=(others, frozen_at, ranks_ended), daemon=True).start()
        ending = jobs if nodes == 1 else [jobs[1 - rank]]  # a frozen node's launcher waits on its rank
        output = "".join(part for job in ending for part in job.communicate(timeout=HANG_GUARD_S))
        took = time.monotonic() - frozen_at
    finally:
        for job in jobs:  # SIGKILL ends the stopped rank too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    lines = [line for line in output.splitlines() if "error:" in line]
    line = lines[0] if len(lines) == 1 else f"{len(lines)} error lines: {lines}"
    return (ranks_ended[0] if ranks_ended else float("nan")), took, line


def freeze_bench(args: argparse.Namespace) -> None:
    bound = args.timeout + 15
    with tempfile.TemporaryDirectory(prefix="dstrain-freeze-bench-") as tmp:
        for name, (nodes, rank) in FREEZE_CASES.items():
            for repeat in range(args.repeats):
                load = os.getloadavg()[0]
                ranks, took, line = freeze_once(
                    Path(tmp), f"n{nodes}-r{rank}-{repeat}", nodes, rank, args.timeout
                )
                print(
                    f"{name}: the other rank exited {ranks:.1f} s after the SIGSTOP, the job ended {took:.1f} s "
                    f"after it (bound {bound} s; load average {load:.1f})\n    {line}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--freeze", action="store_true", help="time a frozen rank's ending instead")
    parser.add_argument("--timeout", type=int, default=10, help="--freeze: distributed.heartbeat_timeout_s")
    args = parser.parse_args()
    if args.freeze:
        freeze_bench(args)
        return
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="dstrain-hb-bench-") as tmp:
        for repeat in range(args.repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                steps = run_job(Path(tmp), f"{name}-{repeat}", VARIANTS[name], args.steps)
                times[name] += steps[args.skip :]
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>4}: median step {value * 1000:.1f} ms over {len(times[name])} steps")
    print(f"on/off step time: {medians['on'] / medians['off']:.3f}")


if __name__ == "__main__":
    main()
