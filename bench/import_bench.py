"""Start-up cost of deepspeed's unused imports (dstrain/lean_imports.py): the same tiny `dstrain train` job from
the shell with the refusal on (the default) and off (DSTRAIN_ALLOW_UNUSED_IMPORTS=1), alternated in one run.

    python bench/import_bench.py [--repeats 3] [--ranks 1|2] [--steps 2]

The job: builtin:tiny, 64 records of the bundled sft-rag set, ZeRO-2, `--steps` optimizer steps, no eval, no save
but the last. Reported per variant: the median wall time of the whole command and the median CPU time of it and
its children (user + sys, every rank), and off/on ratios. Where mlflow is not installed only the Muon half
applies.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dstrain.config.demo import asset  # noqa: E402

VARIANTS = {"refused (default)": {}, "allowed": {"DSTRAIN_ALLOW_UNUSED_IMPORTS": "1"}}


def write_job(root: Path, steps: int) -> Path:
    lines = Path(asset("data", "sft_rag_train.jsonl")).read_text(encoding="utf-8").splitlines()[:64]
    data = root / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": {"train": [str(data)], "format": "sft-rag", "max_seq_len": 256, "max_passage_tokens": 160},
        "train": {"max_steps": steps, "global_batch_size": 8, "log_every": 1, "save_every": steps},
        "ds_config": "ds_configs/zero2.json",
        "output_dir": str(root / "run"),
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def timed(config: Path, ranks: int, extra_env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the command and every process under it) for one job."""
    env = {k: v for k, v in os.environ.items() if k != "DSTRAIN_ALLOW_UNUSED_IMPORTS"}
    env.update(OMP_NUM_THREADS="1", **extra_env)
    cmd = [sys.executable, "-m", "dstrain.cli", "train", "--config", str(config)]
    if ranks > 1:
        cmd += ["--num-gpus", str(ranks)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"import_bench: the job failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        config = write_job(Path(tmp), args.steps)
        for repeat in range(args.repeats):
            for name, extra in VARIANTS.items():
                shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
                results[name].append(timed(config, args.ranks, extra))
                print(
                    f"repeat {repeat}: {name}: wall {results[name][-1][0]:.1f} s, cpu {results[name][-1][1]:.1f} s"
                )
    print(f"\n| ranks {args.ranks}, {args.steps} steps | wall s (median) | CPU s (median) |")
    print("|---|---|---|")
    medians = {
        name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in results.items()
    }
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    on, off = medians["refused (default)"], medians["allowed"]
    print(f"| allowed / refused | {off[0] / on[0]:.2f}x | {off[1] / on[1]:.2f}x |")


if __name__ == "__main__":
    main()
