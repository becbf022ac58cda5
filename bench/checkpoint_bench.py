"""Checkpoint benchmark: dstrain's save against DeepSpeed's own `save_checkpoint` on the same engine, and the
time from `dstrain resume` to the first trained step against a fresh `dstrain train`.

Part 1 (run under the launcher, every rank builds the same engine):
    deepspeed --num_gpus 2 bench/checkpoint_bench.py save --ds-config ds_configs/zero2.json
  One engine (random-init Llama-shaped model, LoRA r=16 on all linear layers), two optimizer steps so Adam's
  moments exist, then alternately, `--repeats` times each:
    gather       the collective part of a dstrain save alone
    dstrain      gather full adapter + optimizer state + RNG on all ranks, rank 0 writes safetensors/JSON,
                 fsync, atomic rename, manifest with sha256 (what every dstrain save does)
    ds           engine.save_checkpoint(dir): DeepSpeed's default (module state incl. frozen base weights,
                 one optimizer pickle per rank)
    ds-lora      engine.save_checkpoint(dir, exclude_frozen_parameters=True): DeepSpeed's leanest setting
  Reported: median wall seconds (rank 0, barrier before and after) and bytes on disk.

Part 2 (one local process each):
    python bench/checkpoint_bench.py resume
  `dstrain train` on a config, then `dstrain resume` of its middle checkpoint; each timed from process start
  to the first new row in metrics.jsonl (the end of the first optimizer step).

Part 3: `python bench/checkpoint_bench.py replay`: the resume-time replay of CPU Adam's step cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_model_dir(path: Path, layers: int, hidden: int) -> Path:
    """A random-init Llama-shaped HF dir (16/4 GQA heads) that uses the bundled tiny tokenizer (vocab 2,048)."""
    from bench_model import write_model

    return write_model(path, "llama", 2048, hidden, layers, heads=16, kv_heads=4, max_positions=1024)


def bench_config(work: Path, model: str, ds_config: str, steps: int, save_every: int) -> Path:
    import yaml

    from dstrain.config.demo import asset

    raw = {
        "model": {"path": model, "dtype": "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": [asset("data", "sft_rag_train.jsonl")],
            "format": "sft-rag",
            "max_seq_len": 256,
            "max_passage_tokens": 160,
        },
        "train": {
            "max_steps": steps,
            "save_every": save_every,
            "log_every": 1,
            "keep_last": 100,
            "global_batch_size": 8,
        },
        "ds_config": ds_config,
        "output_dir": str(work / "run"),
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_save(args: argparse.Namespace) -> None:
    from dstrain.checkpoint.save import gather_payload
    from dstrain.config.run import load_config
    from dstrain.distributed import collectives, group
    from dstrain.training.loop import fit, save
    from dstrain.training.setup import start

    work = Path(args.work)
    model = str(work / "model")
    if int(os.environ.get("RANK", "0")) == 0:
        make_model_dir(Path(model), args.layers, args.hidden)
    else:  # wait for rank 0 to write the model (no process group yet)
        while not (Path(model) / "model.safetensors").is_file() and not list(
            Path(model).glob("*.index.json")
        ):
            time.sleep(0.5)
        time.sleep(2)
    cfg = load_config(bench_config(work, model, args.ds_config, steps=2, save_every=0))
    session, tally, state = start(cfg)
    state = fit(session, tally, state)  # two optimizer steps; saves step-2 once (warm-up of the save path)
    rank = session.rank
    results: dict[str, list[float]] = {"dstrain": [], "gather": [], "ds": [], "ds-lora": []}
    sizes: dict[str, int] = {}
    out = work / "ds"
    for i in range(args.repeats):
        for name in results:
            collectives.barrier()
            started = time.perf_counter()
            if name == "gather":  # the collective part of a dstrain save alone (no file written)
                gather_payload(session.engine, session.peft_model)
                path = None
            elif name == "dstrain":
                state.step += 1  # a new checkpoint name each time
                path = save(session, state)  # exactly the loop's save (keep_last 100 in the bench config)
            else:
                tag = f"{name}-{i}"
                session.engine.save_checkpoint(str(out), tag=tag, exclude_frozen_parameters=name == "ds-lora")
                path = out / tag
            collectives.barrier()
            results[name].append(time.perf_counter() - started)
            if rank == 0 and path is not None:
                sizes[name] = dir_bytes(path)
    if rank == 0:
        from dstrain.model.build import count_parameters

        trainable, total = count_parameters(session.peft_model)
        report = {
            "world": session.plan.world,
            "ds_config": args.ds_config,
            "params": total,
            "trainable": trainable,
            **{f"{k}_s": statistics.median(v) for k, v in results.items()},
            **{f"{k}_bytes": v for k, v in sizes.items()},
        }
        print("RESULT " + json.dumps(report))
    session.sink.close()
    group.shutdown()


def first_new_row(cmd: list[str], run_dir: Path, after_step: int) -> float:
    """Seconds from starting `cmd` to the first metrics row past `after_step`; lets the run finish."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen = None
    while seen is None:
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                if (
                    line.endswith("}")
                    and json.loads(line).get("step", 0) > after_step
                    and "loss" in json.loads(line)
                ):
                    seen = time.perf_counter() - started
                    break
        if seen is None and proc.poll() is not None:
            raise SystemExit(f"{cmd} ended before a step: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    proc.communicate()
    return seen


def bench_resume(args: argparse.Namespace) -> None:
    from dstrain.metrics.sinks import keep_rows_up_to

    work = Path(args.work)
    model = str(make_model_dir(work / "model", args.layers, args.hidden))
    bin_dir = Path(sys.executable).parent
    rows = []
    for _ in range(args.repeats):
        shutil.rmtree(work / "run", ignore_errors=True)
        cfg = bench_config(
            work, model, args.ds_config, steps=2 * args.resume_step, save_every=args.resume_step
        )
        fresh = first_new_row([str(bin_dir / "dstrain"), "train", "--config", str(cfg)], work / "run", 0)
        # The state a crash right after the middle checkpoint leaves: no later checkpoint, no later rows.
        shutil.rmtree(work / "run" / "checkpoints" / f"step-{2 * args.resume_step:08d}")
        keep_rows_up_to(work / "run" / "metrics.jsonl", args.resume_step)
        resumed = first_new_row(
            [str(bin_dir / "dstrain"), "resume", str(work / "run")], work / "run", args.resume_step
        )
        rows.append((fresh, resumed))
    report = {
        "fresh_train_to_first_step_s": statistics.median(r[0] for r in rows),
        "resume_to_first_step_s": statistics.median(r[1] for r in rows),
        "resume_step": args.resume_step,
    }
    print("RESULT " + json.dumps(report))


def bench_replay(args: argparse.Namespace) -> None:
    """Cost of rebuilding the CPU Adam kernels' cached beta**t on resume, per `--replay-steps` steps."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    from dstrain.checkpoint.optim import replay_cpu_adam_step_cache

    class Engine:  # the two attributes replay_cpu_adam_step_cache reads
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer, self.device = optimizer, torch.device("cpu")

    report = {"steps": args.replay_steps}
    for cls in (FusedAdam, DeepSpeedCPUAdam):
        engine = Engine(cls([torch.nn.Parameter(torch.zeros(4))]))
        started = time.perf_counter()
        replay_cpu_adam_step_cache(engine, args.replay_steps)
        report[f"{cls.__name__}_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["save", "resume", "replay"])
    parser.add_argument("--ds-config", default="ds_configs/zero2.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resume-step", type=int, default=5)
    parser.add_argument("--replay-steps", type=int, default=100_000)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dstrain-ckpt-bench"))
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"save": bench_save, "resume": bench_resume, "replay": bench_replay}[args.part](args)


if __name__ == "__main__":
    main()
