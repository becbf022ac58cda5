"""Heartbeat cost: the same 2-rank `dstrain train --num-gpus 2` job with the failure watch on and off.

    python bench/heartbeat_bench.py --steps 60 --repeats 2

Each repeat runs both variants back to back (order alternating, so drift in the machine's speed hits both):
    on    distributed.heartbeat_timeout_s=90 (the default: a daemon thread per rank bumps a counter in the
          TCPStore every second, rank 0 reads every rank's, every rank watches its local peers' pids)
    off   distributed.heartbeat_timeout_s=0
Reported: the median step time over the steps after the first `--skip` (warm-up), per variant, and on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"on": 90, "off": 0}


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
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's deepspeed
    proc = subprocess.run([*cmd, *sets], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step_time_s"] for row in rows if "step_time_s" in row]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
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
