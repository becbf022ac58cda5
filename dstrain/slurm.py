"""`python -m dstrain.slurm [--requeue] --config RUN.yaml [--set k=v ...]`: the per-node step of launch/*.sbatch.

Run as one `srun` task per node; it starts the node's ranks and watches them. Everything comes from Slurm:
- node count and node rank: `SLURM_NTASKS` and `SLURM_PROCID` (one task per node);
- rendezvous: the first host of `SLURM_JOB_NODELIST` (expanded by `scontrol show hostnames`), on a port
  derived from the job id (`MASTER_ADDR` / `MASTER_PORT` override both);
- ranks per node: `--nproc-per-node`, else `SLURM_GPUS_ON_NODE`, else the visible GPUs, else 1.
If the run dir already holds a checkpoint (a requeued job, a resubmission), the ranks resume from it instead
of starting over. With `--requeue`, a job stopped by a signal (preemption, `scancel --signal=TERM`, the
`--signal=TERM@SECONDS` time-limit warning) saves, then node 0 puts the job back in the queue.

Why not the deepspeed launcher or torchrun per node: both SIGKILL their ranks 30 s after passing on a
SIGTERM, which can cut the checkpoint a preempted job is writing; here the ranks get all the time Slurm
gives (its KillWait / the preemption GraceTime). A rank that fails still takes the node's others down.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dstrain.errors import DstrainError

PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class NodePlan:
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc: int


def slurm_var(name: str, environ: dict[str, str]) -> str:
    value = environ.get(name)
    if not value:
        raise DstrainError(
            f"{name} is not set: `python -m dstrain.slurm` runs inside a Slurm job step, one task per node "
            "(srun in launch/multi_node.sbatch); outside Slurm use `deepspeed --hostfile` or torchrun"
        )
    return value


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu-[01-02]` -> ["gpu-01", "gpu-02"], by Slurm itself (its range syntax has more corners than it shows)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DstrainError(f"could not expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {exc}") from exc
    return out.split()


def plan_node(environ: dict[str, str], nproc: int | None = None) -> NodePlan:
    nodes = int(slurm_var("SLURM_NTASKS", environ))
    node_rank = int(slurm_var("SLURM_PROCID", environ))
    job_id = int(slurm_var("SLURM_JOB_ID", environ))
    hosts = expand_nodelist(slurm_var("SLURM_JOB_NODELIST", environ))
    return NodePlan(
        nodes=nodes,
        node_rank=node_rank,
        master_addr=environ.get("MASTER_ADDR") or hosts[0],
        master_port=int(environ.get("MASTER_PORT") or PORT_BASE + job_id % PORT_SPAN),
        nproc=nproc or ranks_per_node(environ),
    )


def ranks_per_node(environ: dict[str, str]) -> int:
    if environ.get("SLURM_GPUS_ON_NODE"):
        return int(environ["SLURM_GPUS_ON_NODE"])
    import torch

    return torch.cuda.device_count() or 1


def train_args(config: str | None, overrides: list[str]) -> list[str]:
    """`--resume RUN_DIR` when the run dir has a checkpoint already, else `--config RUN.yaml`."""
    from dstrain.train import resolve_config

    output_dir = Path(resolve_config(config, overrides, None).output_dir)
    sets = [arg for item in overrides for arg in ("--set", item)]
    if (output_dir / "checkpoints" / "latest").is_file():
        return ["--resume", str(output_dir), *resume_sets(overrides)]
    return (["--config", config] if config else []) + sets


def resume_sets(overrides: list[str]) -> list[str]:
    """On resume only non-structural keys may change; the others are fixed by the checkpoint anyway."""
    from dstrain.checkpoint.resume import mutable_on_resume

    kept = [item for item in overrides if mutable_on_resume(item)]
    return [arg for item in kept for arg in ("--set", item)]


def rank_env(plan: NodePlan, local_rank: int, environ: dict[str, str]) -> dict[str, str]:
    env = dict(environ)
    env.update(
        RANK=str(plan.node_rank * plan.nproc + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(plan.nodes * plan.nproc),
        MASTER_ADDR=plan.master_addr,
        MASTER_PORT=str(plan.master_port),
    )
    return env


def run_ranks(plan: NodePlan, args: list[str]) -> tuple[int, int | None]:
    """Start this node's ranks and wait for all of them. Returns (exit code, stop signal received or None).

    A stop signal is passed on (Slurm may signal only this task; the ranks ignore an echo) and then the
    ranks are waited for, however long their checkpoint takes. A rank that fails makes the others stop.
    """
    cmd = [sys.executable, "-m", "dstrain.train", *args]
    procs = [subprocess.Popen(cmd, env=rank_env(plan, i, dict(os.environ))) for i in range(plan.nproc)]
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for proc in procs:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = supervise(plan, procs, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, received[0] if received else None


def stopped_before_training(code: int, received: list[int]) -> bool:
    """A rank's exit status after a stop signal that it honoured before training (128 + the signal):
    nothing was trained or lost, so it is a clean stop, not a failure (dstrain.distributed.stop)."""
    return bool(received) and code in {128 + signum for signum in received}


def supervise(plan: NodePlan, procs: list[subprocess.Popen], received: list[int]) -> int:
    first_failure = 0
    while [proc for proc in procs if proc.poll() is None]:  # a list: poll every one, no short cut
        for local, proc in enumerate(procs):
            clean = proc.returncode is not None and stopped_before_training(proc.returncode, received)
            if proc.returncode and not first_failure and not clean:
                first_failure = proc.returncode
                rank = plan.node_rank * plan.nproc + local
                how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
                print(
                    f"dstrain.slurm: rank {rank} ended with {how}; stopping this node's ranks",
                    file=sys.stderr,
                )
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
        time.sleep(0.5)
    codes = [proc.returncode for proc in procs]
    return first_failure or next((c for c in codes if c), 0)


def requeue(job_id: str) -> None:
    print(f"dstrain.slurm: stopped by a signal after saving; requeueing job {job_id}", file=sys.stderr)
    subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dstrain.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run YAML (omit for the bundled demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nproc-per-node", type=int, help="ranks per node (default: GPUs on the node)")
    parser.add_argument("--requeue", action="store_true", help="requeue the job when a signal stopped it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = plan_node(dict(os.environ), args.nproc_per_node)
        entry = train_args(args.config, args.overrides)
    except DstrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if plan.node_rank == 0:
        print(
            f"dstrain.slurm: {plan.nodes} node(s) x {plan.nproc} rank(s), rendezvous "
            f"{plan.master_addr}:{plan.master_port}, python -m dstrain.train {' '.join(entry)}",
            file=sys.stderr,
        )
    code, stopped_by = run_ranks(plan, entry)
    clean = stopped_by is not None and (code == 0 or stopped_before_training(code, [stopped_by]))
    if args.requeue and clean:
        # The requeue contract: exit 0 so Slurm does not count the job failed, whether the ranks saved a
        # checkpoint (stopped while training) or had nothing to save (stopped during start-up).
        if plan.node_rank == 0:
            requeue(os.environ["SLURM_JOB_ID"])
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
