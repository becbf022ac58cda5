"""Long-context sequence parallelism: peak memory per rank and tokens/s for one long RAG row, N=1 vs N=2.

    python bench/sp_bench.py                  # 8,192-token rows, 3 steps per variant (~1-2 min each, 2 cores)
    python bench/sp_bench.py --quick          # 1,024-token rows, 2 steps: checks both paths work
    python bench/sp_bench.py --seq-len 4096 --out sp.json

Variants (each its own launch of dstrain, the same data, model and global batch of one row per step):

  N=1   1 rank, train.sequence_parallel_size=1: the whole row on one rank
  N=2   2 ranks (`deepspeed --num_gpus 2`), train.sequence_parallel_size=2: each rank runs half of the row,
        attention through Ulysses' two all-to-alls (gloo on CPU, NCCL on GPU)

Model: random-init Llama shape (hidden 256, 4 layers, 4 heads / 2 KV heads, the bundled 2,048-id tokenizer),
LoRA r16 all-linear, ZeRO-3, fp32 on CPU (bf16 with --dtype bf16 on a GPU). Data: generated sft-rag records
whose passages fill the row (max_passage_tokens = seq_len - 256).
Measured: tokens/s from dstrain's metrics (the last step's, so warm-up is excluded), and the peak
memory of each rank: on GPU torch's max_memory_allocated (dstrain's mem_gb, max over ranks), on CPU the
largest VmHWM (peak resident set) of the rank processes, polled while they run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_common import child_env, cuda_available  # noqa: E402
from bench_model import write_model  # noqa: E402
from bench_workload import _sentence, vocabulary  # noqa: E402


def write_records(path: Path, count: int, seq_len: int, seed: int = 0) -> Path:
    """sft-rag records with more passage text than `seq_len` tokens (cut to the passage budget)."""
    rng, words = random.Random(seed), vocabulary()
    passages = max(4, seq_len // 150)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count):
            record = {
                "query": _sentence(rng, words, 6, 14) + "?",
                "retrieval_result": [_sentence(rng, words, 150, 250) + "." for _ in range(passages)],
                "answer": _sentence(rng, words, 40, 80) + ".",
            }
            fh.write(json.dumps(record) + "\n")
    return path


def run_config(work: Path, model: Path, data: Path, args: argparse.Namespace, size: int) -> Path:
    import yaml

    name = f"sp{size}"
    raw = {
        "model": {"path": str(model), "dtype": args.dtype, "logits_chunk_tokens": 1024},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {
            "train": [str(data)],
            "format": "sft-rag",
            "max_seq_len": args.seq_len,
            "max_passage_tokens": args.seq_len - 256,
            "group_by_length": False,
        },
        "train": {
            "max_steps": args.steps,
            "log_every": 1,  # the last row's tokens/s is the last step's alone (warm-up excluded)
            "save_every": 0,
            "global_batch_size": 1,
            "sequence_parallel_size": size,
            "memory_check": "off",
        },
        "ds_config": str(work / "zero3.json"),
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def zero3_json(work: Path, seq_len: int) -> Path:
    ds = json.loads((REPO / "dstrain" / "ds_configs" / "zero3.json").read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["zero_optimization"]["reduce_bucket_size"] = 2**22  # holds every LoRA tensor (checked under SP)
    path = work / "zero3.json"
    path.write_text(json.dumps(ds, indent=1), encoding="utf-8")
    return path


def peak_rss_gb(proc: subprocess.Popen) -> float:
    """Poll until `proc` ends; the largest peak resident set (VmHWM) of any of its python processes."""
    peak = 0
    while proc.poll() is None:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for child in family:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.2)
    return peak / 2**30


def launch(config: Path, size: int, work: Path, timeout: int) -> dict[str, float]:
    if size == 1:
        cmd = [sys.executable, "-m", "dstrain.train", "--config", str(config)]
    else:
        from dstrain.distributed.env import free_port

        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(size)]
        cmd = [
            *runner,
            "--master_port",
            str(free_port()),
            "--module",
            "dstrain.train",
            "--config",
            str(config),
        ]
    log = work / f"sp{size}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, env=child_env(), stdout=fh, stderr=subprocess.STDOUT)
        started = time.monotonic()
        peak = peak_rss_gb(proc)
        if proc.wait(timeout=max(1, timeout - (time.monotonic() - started))) != 0:
            raise SystemExit(f"N={size} failed; see {log}")
    rows = [json.loads(line) for line in (work / f"sp{size}" / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "tokens_per_s" in row][-1]
    gpu = last.get("mem_gb") if cuda_available() else None
    return {"tokens_per_s": last["tokens_per_s"], "peak_gb_per_rank": gpu or peak, "tokens": last["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="1,024 tokens, 2 steps")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/sp"))
    parser.add_argument("--timeout", type=int, default=900, help="per launch, seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.steps = 1024, 2
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = write_model(
        work / "model",
        "llama",
        2048,
        256,
        4,
        dtype=args.dtype,
        heads=4,
        kv_heads=2,
        max_positions=args.seq_len,
    )
    data = write_records(work / "train.jsonl", args.steps * 2, args.seq_len)
    zero3_json(work, args.seq_len)
    results = {}
    for size in (1, 2):
        config = run_config(work, model, data, args, size)
        results[f"N={size}"] = launch(config, size, work, args.timeout)
        print(f"N={size}: {results[f'N={size}']}", flush=True)
    one, two = results["N=1"], results["N=2"]
    print("\n| seq len | variant | ranks | tokens/s | peak GiB per rank |\n|---|---|---|---|---|")
    for size, row in ((1, one), (2, two)):
        print(
            f"| {args.seq_len} | N={size} | {size} | {row['tokens_per_s']:.0f} | {row['peak_gb_per_rank']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"seq_len": args.seq_len, "steps": args.steps, **results}, indent=1))


if __name__ == "__main__":
    main()
