"""What a user waits for: whole-job wall time from the shell and time to the first optimizer step, at the
defaults, for dstrain and HF Trainer (plain and grouped), next to steady-state tokens/s, in one run.

    python bench/startup_bench.py            # issue 19's job: 2,000 records, one epoch, 2 ranks (~6 min idle)
    python bench/startup_bench.py --quick    # 96 records, 8 steps: checks every row works

The workload is sft_bench's (random-init Qwen2 shape, hidden 256 x 4 layers, vocab 3,000; generated sft-rag
records; ZeRO-2, micro 4 x 2 ranks, LoRA r16 all-linear, fp32 on CPU). Rows:

  dstrain        the defaults (no data options): what `dstrain train` does for a new user
  dstrain-plain  data.group_by_length=false (the default before 0.2.0)
  hf             transformers.Trainer(deepspeed=<same dict>), dynamic padding
  hf-grouped     the same with HF's length grouping
  trl            trl.SFTTrainer on the same records as prompt/completion pairs (its defaults)

whole job: `deepspeed --num_gpus N ...` launch to exit, measured here around the launch. first step: process
start to the end of optimizer step 1 on rank 0 (dstrain's startup_total_s; a callback in the HF worker).
tokens/s: sft_bench's steady-state measure (after --warmup steps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc
import bench_report as br
import bench_workload as bw

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dstrain": ("dstrain", {}),
    "dstrain-plain": ("dstrain", {"data.group_by_length": False}),
    "hf": ("sft-hf", {}),
    "hf-grouped": ("sft-hf", {"group_by_length": True}),
    "trl": ("sft-trl", {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="96 records, 8 steps")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps; 0: one epoch")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of tokens/s")
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    bc.add_run_arguments(parser, list(VARIANTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.warmup, args.steps = min(args.records, 96), 2, args.steps or 8
    return args


def timed_row(name: str, args: argparse.Namespace, work: Any, work_dir: Path) -> dict[str, Any] | None:
    runner, options = VARIANTS[name]
    began = time.perf_counter()
    result = bc.run_variant(name, runner, work, work_dir, options, args.nproc, args.timeout)
    wall = time.perf_counter() - began
    if result is None:
        return None
    return {"wall_s": wall, "first_step_s": result.first_step_s, "tokens_per_s": result.tokens_per_s}


def report(rows: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    table = []
    for name, row in rows.items():
        if row is None:
            table.append([name, "failed", "", ""])
            continue
        first = f"{row['first_step_s']:.1f}" if row["first_step_s"] is not None else ""
        table.append([name, f"{row['wall_s']:.1f}", first, f"{row['tokens_per_s']:,.0f}"])
    br.print_table("whole job at the defaults", ["variant", "whole job s", "first step s", "tokens/s"], table)
    ratios = {}
    ours = rows.get("dstrain")
    for base in ("hf", "hf-grouped", "trl"):
        theirs = rows.get(base)
        if ours and theirs:
            ratios[f"whole job {base}/dstrain"] = f"{theirs['wall_s'] / ours['wall_s']:.2f}x"
            if ours["first_step_s"] and theirs["first_step_s"]:
                ratios[f"first step dstrain/{base}"] = f"{ours['first_step_s'] / theirs['first_step_s']:.2f}"
            ratios[f"tokens/s dstrain/{base}"] = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print("(targets: whole job >= 1.3x HF Trainer; first step <= HF Trainer's, i.e. a ratio <= 1)")
    return ratios


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dstrain-startup-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = bw.write_sft_records(work_dir / "sft.jsonl", args.records, seed=0)
        print(br.machine_line())
        _, work, global_batch = bc.prepare_workload(args.vocab, args, work_dir, data, args.records)
        print(
            f"== {work.steps} steps of {global_batch} rows, {args.records} records, {args.nproc} ranks",
            flush=True,
        )
        rows = {
            name: timed_row(name, args, work, work_dir) for name in br.run_order(args.variants, args.order)
        }
        report(rows)


if __name__ == "__main__":
    main()
